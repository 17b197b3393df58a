"""Benchmark: classifier training throughput and how much of a step waits for data.

Synthesizes a VinBigData-layout set, prepares a cache at --size, trains --epochs with
--workers loader processes, and reports images/s and the share of step time spent waiting
for the DataLoader (goal: under 10% with 2 workers on the cache). On a GPU, use
--model resnet50 --size 512 (AMP bf16 and channels_last come from the config defaults).

    python scripts/bench_train.py [--model resnet10t] [--size 128] [--n 480] [--epochs 2] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cxrcam.config import load_config  # noqa: E402
from cxrcam.data.cache import prepare  # noqa: E402
from cxrcam.data.synth import synthesize  # noqa: E402
from cxrcam.train.classifier import train_classifier  # noqa: E402


def loader_capacity(data: Path, size: int, workers: int, batch_size: int) -> float:
    """Images/s the training DataLoader alone delivers (decode + augment) at ``size`` px."""
    import time

    from torch.utils.data import DataLoader

    from cxrcam.config import AugmentConfig
    from cxrcam.data.cache import open_cache
    from cxrcam.data.dataset import CacheDataset, train_transforms

    prepare("vinbig", data, data.parent / "cache_big", load_config(overrides=[f"prepare.size={size}"]),
            progress=False)
    dataset = CacheDataset(open_cache(data.parent / "cache_big"), transform=train_transforms(AugmentConfig()))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True)
    next(iter(loader))  # start-up is not throughput
    start, seen = time.perf_counter(), 0
    for x, _, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-size", type=int, default=512, help="image side for the loader-only figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize("vinbig", root / "data", args.n, seed=0, size=int(args.size * 1.5), progress=False)
        prepare("vinbig", root / "data", root / "cache", load_config(overrides=[f"prepare.size={args.size}"]),
                progress=False)
        config = load_config(overrides=[f"model.name={args.model}", f"train.epochs={args.epochs}",
                                        f"train.workers={args.workers}", f"train.batch_size={args.batch_size}"])
        train_classifier(config, root / "cache", root / "run", progress=False)
        metrics = pd.read_csv(root / "run" / "metrics.csv")
        loader_rate = loader_capacity(root / "data", args.loader_size, args.workers, args.batch_size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"machine: {platform.machine()}, {device}, torch {torch.__version__}")
    print(f"model {args.model}, {args.size} px, batch {args.batch_size}, {args.workers} loader workers, "
          f"{args.n} images ({int(args.n * 0.8)} train)")
    print("| epoch | images/s | data wait (% of step time) |")
    print("|---|---|---|")
    for row in metrics.itertuples():
        print(f"| {row.epoch} | {row.images_per_s:.1f} | {100 * row.data_wait:.1f} |")
    print(f"loader alone at {args.loader_size} px with {args.workers} workers (decode + augment): {loader_rate:.0f} images/s")


if __name__ == "__main__":
    main()
