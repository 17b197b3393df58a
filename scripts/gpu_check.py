"""The GPU battery (issue 27) as one command: every figure ``docs/BENCHMARKS.md`` waits for from a GPU.

On one GPU in at most 8 minutes (``--device cuda``, the default where torch sees one), in this order:

1. **training**: ResNet-50 at 512 px, bf16 (``train.amp=auto``), channels_last, on a synthetic
   VinBigData-shaped cache: images/s, the share of time waiting for data, and the ratio of the
   pipeline's images/s to the pure model step's (the same model stepping on one batch in memory);
2. **maps**: all 14 classes' maps against a forward pass at 512 px: the closed form at the last
   layer, the gradient engine at layer3 and layer3+layer4 (batched backward and one per class),
   and pytorch-grad-cam (``scripts/bench_cam.py``'s measurement);
3. **localize**: images/s without pictures, from the trained checkpoint;
4. **quality**: the same ResNet-50's held-out AUROC, CAM MaxBoxAccV2 beside its random-map control
   and findings mAP@0.4 (synthetic data, from random weights: the hub is out of reach there);
5. **torchrun**: one epoch under ``torchrun --nproc_per_node 1`` (NCCL on a GPU, gloo on a CPU).

Prints one markdown table and, with ``--out``, writes every figure there (JSON); the scratch work
(data, caches, runs) goes to a temporary folder that is removed at the end, unless ``--work``. ``--device cpu --quick`` is
the same battery shrunk (resnet10t, 64 px, a few images) so that it runs in well under 3 minutes on
2 CPU cores; ``tests/test_gpu_check.py`` runs it, so the script cannot rot.

    python scripts/gpu_check.py --out gpu_check.json                  # on the GPU machine
    python scripts/gpu_check.py --device cpu --quick --out quick.json

On the lent H200 the image has torch, timm, torchvision, opencv, pandas, scikit-learn and
matplotlib but not pydicom, grad-cam (with ttach) or ensemble-boxes: carry them as wheels
(docs/BENCHMARKS.md, "The GPU battery").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from cxrcam.cli import main as cli  # noqa: E402
from cxrcam.demo import Stages, run_command  # noqa: E402

FULL = dict(model="resnet50", size=512, n_images=640, n_test=200, epochs=6, batch=32, cam_batch=16, workers=8)
QUICK = dict(model="resnet10t", size=64, n_images=32, n_test=12, epochs=1, batch=8, cam_batch=4, workers=0)


def pure_step_rate(model_name: str, size: int, batch: int, device: torch.device, precision: str, steps: int) -> float:
    """Images/s of the bare training step (forward, BCE, backward, AdamW) on one batch held in memory."""
    from cxrcam.models import create_classifier
    from cxrcam.runtime.dist import mixed_precision

    model = create_classifier(model_name, 14).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, scaler = mixed_precision(precision, device)
    x = torch.rand(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 14, device=device) < 0.1).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        with autocast():
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="the battery shrunk for a CPU (the test runs it)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure here (JSON); default: print only")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the scratch work (data, caches, runs) in this folder; default: a temporary one")
    a = parser.parse_args()
    if a.work is not None:
        battery(a, a.work)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            battery(a, Path(scratch))


def battery(a: argparse.Namespace, work: Path) -> None:
    """Every measurement, its scratch work in ``work``."""
    from cxrcam.runtime.dist import pick_device, resolve_precision

    device = pick_device(a.device)
    s = QUICK if a.quick else FULL
    work.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    results: dict = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
                     "quick": a.quick, "settings": s, "precision": precision}
    start = time.perf_counter()
    common = [f"model.name={s['model']}", "model.pretrained=false", f"train.batch_size={s['batch']}",
              f"train.workers={s['workers']}", f"cam.batch_size={s['cam_batch']}", f"cam.workers={s['workers']}",
              f"runtime.device={device}"]
    stages = Stages(work, s["size"], "tiny" if a.quick else "resnet50", common)  # the demo's command lines

    # 1. data and training (the quality row's classifier too)
    for split, n, seed in (("train", s["n_images"], 11), ("test", s["n_test"], 1011)):
        run_command(cli, *stages.synth(split, n, seed, split=split))
        run_command(cli, *stages.prepare(split, "--workers", 1 if a.quick else s["workers"]))  # 1: in this process
    run = stages.classifier.parent
    run_command(cli, *stages.train_classifier(f"train.epochs={s['epochs']}"))
    import pandas as pd

    history = pd.read_csv(run / "metrics.csv")
    pure = pure_step_rate(s["model"], s["size"], s["batch"], device, precision, 3 if a.quick else 20)
    trained = float(history["images_per_s"].iloc[-1])
    results["training"] = {"images_per_s": trained, "data_wait": float(history["data_wait"].iloc[-1]),
                           "pure_step_images_per_s": pure, "ratio_to_pure_step": trained / pure,
                           "precision": str(history["precision"].iloc[-1])}

    # 2. maps against a forward pass
    from bench_cam import measure
    from cxrcam.models import create_classifier

    torch.manual_seed(0)
    model = create_classifier(s["model"], 14).to(device).eval()
    images = torch.rand(s["cam_batch"], 1, s["size"], s["size"], device=device)
    maps = {}
    for layer in ("", "layer3", "layer3,layer4"):
        t = measure(model, images, layer, 14, 3, 1 if a.quick else 5, library=layer in ("", "layer3"), device=device)
        maps[layer or "pool input"] = {k: (v / t["forward"] if k not in ("forward", "diff") else v) for k, v in t.items()}
    results["maps"] = maps
    del model

    # 3-4. localize images/s without pictures, and the quality row on the held-out set
    loc = work / "localize"
    begin = time.perf_counter()
    run_command(cli, *stages.localize(loc, "--no-images"))
    results["localize_images_per_s"] = s["n_test"] / (time.perf_counter() - begin)
    run_command(cli, *stages.evaluate(loc, loc / "eval", "--no-plots"))
    from cxrcam.evaluation.evaluate import findings_map, headline

    metrics = json.loads((loc / "eval" / "metrics.json").read_text())
    row = headline(metrics)
    results["quality"] = {"mean_auroc": metrics.get("mean_auroc"), "maxboxacc": row["MaxBoxAccV2"][0],
                          "maxboxacc_control": row["MaxBoxAccV2"][1], "findings_map": findings_map(metrics["ap"]),
                          "findings_map_control": row["findings mAP@0.4"][1]}

    # 5. torchrun, one process
    begin = time.perf_counter()
    ddp = stages.train_classifier("train.epochs=1", out=work / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "cxrcam",
                           *map(str, ddp)], capture_output=True, text=True, cwd=ROOT)
    results["torchrun"] = {"backend": "nccl" if device.type == "cuda" else "gloo", "ok": proc.returncode == 0,
                           "seconds": time.perf_counter() - begin,
                           "error": None if proc.returncode == 0 else proc.stderr[-2000:]}
    results["seconds"] = time.perf_counter() - start
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=2, default=str))
    print("\n" + table(results))


def table(r: dict) -> str:
    """The battery as one markdown table."""
    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    t, q = r["training"], r["quality"]
    rows = [("device", f"{r['device']}, torch {r['torch']}{' (quick)' if r['quick'] else ''}"),
            ("training images/s", f"{f(t['images_per_s'], 1)} ({t['precision']}, {r['settings']['model']} at "
                                  f"{r['settings']['size']} px, batch {r['settings']['batch']})"),
            ("data wait", f"{100 * t['data_wait']:.0f}%"),
            ("pipeline / pure model step", f"{f(t['ratio_to_pure_step'], 2)} ({f(t['pure_step_images_per_s'], 1)} img/s)")]
    for layer, m in r["maps"].items():
        cells = ", ".join(f"{k} {v:.2f}x" for k, v in m.items() if k not in ("forward", "diff"))
        rows.append((f"maps at {layer} / forward", f"{cells} (forward {m['forward']:.3f} s)"))
    rows += [("localize images/s (no pictures)", f(r["localize_images_per_s"], 1)),
             ("held-out mean AUROC", f(q["mean_auroc"])),
             ("MaxBoxAccV2 (random-map control)", f"{f(q['maxboxacc'])} ({f(q['maxboxacc_control'])})"),
             ("findings mAP@0.4 (control)", f"{f(q['findings_map'])} ({f(q['findings_map_control'])})"),
             (f"torchrun x1 ({r['torchrun']['backend']})", f"{'ok' if r['torchrun']['ok'] else 'FAILED'}, "
                                                          f"{r['torchrun']['seconds']:.0f} s"),
             ("battery time", f"{r['seconds'] / 60:.1f} min")]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


if __name__ == "__main__":
    main()
