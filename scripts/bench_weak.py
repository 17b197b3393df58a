"""Weak-supervision benchmark: detectors trained with boxes on 0%, 5%, 25% and 100% of the
training images (labels on all), scored on the held-out test set of a ``bench_quality`` run.

It reuses a ``scripts/bench_quality.py --out BASE`` folder: the synthetic train/test caches, the
classifier (``BASE/runs/classifier/best.pt``), its calibration (``BASE/calibration.json``) and
the calibrated CAM-only evaluation (``BASE/calibrated/eval``). For each box share it trains, with
the real ``cxrcam train-detector``:

- **plain**: the boxed images alone (``detector.box_images=K``; none at 0%);
- **weak**: every training image, truth boxes where shown, calibrated CAM pseudo-boxes elsewhere
  (``detector.pseudo_from``), with the CAM proposals in the RoI heads' training proposals
  (``detector.cam_proposals_from``); at 0% it is the label-only detector.

The CPU detector is resnet10t + a 64-channel FPN and a 256-wide box head (``detector.channels``,
``detector.head_size``: about 5x faster than torchvision's 256/1024 on CPU). Then every
detector's ``last.pt`` (best.pt would pick an epoch by validation boxes the 0-5%
rows do not have) goes through the real ``cxrcam refine`` on the test cache, with the calibrated
thresholds: ``refine.proposals`` rpn (the detector alone), cam and both, gated by the classifier
or not; ``cxrcam evaluate --ci`` scores each. Findings mAP@0.4 overall (with its 95% bootstrap
interval) and per class; the seconds each detector trained.

    python scripts/bench_quality.py --out /tmp/base --cam-only --n-images 800 --epochs 15
    python scripts/bench_weak.py --base /tmp/base --out /tmp/weak
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from cxrcam.cli import main as cli
from cxrcam.config import load_config
from cxrcam.data.cache import open_cache
from cxrcam.data.splits import train_val_rows
from cxrcam.demo import TINY, Stages, run_command
from cxrcam.evaluation.evaluate import findings_map

VARIANTS = {"detector": ("rpn", "none"), "detector, gated": ("rpn", "product"), "cam": ("cam", "none"),
            "cam, gated": ("cam", "product"), "both": ("both", "none"), "both, gated": ("both", "product")}


def train(stages: Stages, out: Path, name: str, overrides: list[str]) -> float:
    """One real ``cxrcam train-detector`` into ``out/name`` (skipped when its last epoch is there); seconds."""
    run = out / name
    done = run / "metrics.csv"
    epochs = next((o.split("=")[1] for o in overrides if o.startswith("detector.epochs=")), None)
    if done.is_file() and epochs and len(pd.read_csv(done)) == int(epochs):
        return float(json.loads((run / "seconds.json").read_text())["seconds"])
    start = time.perf_counter()
    run_command(cli, "train-detector", "--data", stages.cache("train"), "--out", run, "--overwrite",
                *stages.settings, *overrides)
    seconds = time.perf_counter() - start
    (run / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def score(stages: Stages, detector: Path, folder: Path, proposals: str, gate: str
          ) -> tuple[float, dict[str, float], tuple[float, float]]:
    """Findings mAP@0.4 (and per class, and its 95% bootstrap interval over the test images) of one
    detector with one refine setting on the test set: ``cxrcam refine`` into ``folder``, then
    ``cxrcam evaluate --ci``."""
    run_command(cli, *stages.refine(folder, "--threshold", stages.calibration, "--no-images",
                                    f"refine.proposals={proposals}", f"refine.gate={gate}", detector=detector))
    run_command(cli, *stages.evaluate(folder, folder / "eval", "--ci", "--no-control", "--no-plots"))
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    per_class = {k: v for k, v in metrics["ap"].items() if k != "No finding" and v is not None}
    return findings_map(metrics["ap"]), per_class, tuple(metrics["ci"]["findings mAP@0.4"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a scripts/bench_quality.py --out folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--config", default=TINY, help="a shipped config's name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every train-detector")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(a.base, 0, a.config, a.overrides)  # the bench_quality run's caches, classifier, calibration
    classifier = stages.classifier
    common = [f"detector.backbone={a.model}", f"detector.epochs={a.epochs}", "detector.rois_per_image=128",
              "detector.warmup_iters=20", "detector.channels=64", "detector.head_size=256",
              f"detector.init={classifier}", f"boxes.calibration={stages.calibration}"]
    train_cache = open_cache(stages.cache("train"))
    config = load_config(a.config, [*a.overrides, *common])
    n_train = len(train_val_rows(train_cache.images["fold"].to_numpy(), config.split.val_fold, train_cache.root)[0])
    cam_metrics = json.loads((a.base / "calibrated" / "eval" / "metrics.json").read_text())

    results, per_class, seconds = [], {}, {}
    for share in a.shares:
        k = round(share * n_train)
        boxes = "0" if share >= 1 else str(k) if k else "none"
        label = f"{100 * share:.0f}% ({k} boxed)"
        runs = {}
        if k:
            runs["plain"] = [f"detector.box_images={boxes}"]
        runs["weak"] = [f"detector.box_images={boxes}", f"detector.pseudo_from={classifier}",
                        f"detector.cam_proposals_from={classifier}"]
        for name, extra in runs.items():
            run = f"{name}_{100 * share:.0f}"
            seconds[run] = train(stages, a.out, run, [*common, *extra])
            variants = {"detector": VARIANTS["detector"]} if name == "plain" else VARIANTS
            for variant, (mode, gate) in variants.items():
                value, aps, ci = score(stages, a.out / run / "last.pt", a.out / f"refine_{run}_{mode}_{gate}", mode, gate)
                results.append({"boxes": label, "detector": name, "variant": variant, "findings_map": value,
                                "ci_low": ci[0], "ci_high": ci[1], "train_s": seconds[run]})
                per_class[f"{run} {variant}"] = aps
                print(f"{label:>16} {name:<5} {variant:<16} findings mAP@0.4 {value:.3f}", flush=True)
                table = pd.DataFrame(results)  # written as it grows: an interrupted run keeps its cells
                table.to_csv(a.out / "results.csv", index=False)
                pd.DataFrame(per_class).to_csv(a.out / "per_class.csv")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    cam_map = findings_map(cam_metrics["ap"])
    lines = [f"command: {' '.join(sys.argv)}", f"device: {device}, torch {torch.__version__}",
             f"CAM-only, calibrated: findings mAP@0.4 {cam_map:.3f}", "",
             "| boxes | detector | RoIs, gate | findings mAP@0.4 [95% bootstrap interval] | detector training s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.boxes} | {r.detector} | {r.variant} | {r.findings_map:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
              f"{r.train_s:.0f} |" for r in table.itertuples()]
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
