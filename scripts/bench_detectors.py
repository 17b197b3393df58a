"""Detector table (issue 37): Faster R-CNN against RetinaNet, refine's settings, the 2-class filter
and a WBF ensemble, each paired against Faster R-CNN on the same bootstrap resamples.

It reuses a ``scripts/bench_quality.py --out BASE`` (or ``bench_maps``) folder: the synthetic
train/test caches and the classifier (``BASE/runs/classifier/best.pt``). It then runs, with the
real commands:

1. ``cxrcam calibrate --maps none`` on the train cache's validation fold into ``OUT``: the CAM
   thresholds and box scales, and the 2-class filter's thresholds;
2. ``cxrcam train-detector`` for each box share (``--shares``; 25% and 100% of the training images
   boxed): Faster R-CNN, and RetinaNet at 100% (``--retinanet-shares``), the same epochs;
3. ``cxrcam refine`` on the test cache for each row (``--no-images``): the plain detector
   (``refine.proposals=rpn``, ``gate=none``, no filter), the classifier's gate, CAM proposals,
   refine's defaults, RetinaNet, and the 2-class filter (auto, and the winners' 0.08 / 0.95);
   and a Faster R-CNN of the abnormal images alone (``detector.negatives=false``, as VinBigData's
   winners trained theirs), plain and with the filter (0.08 / 0.95, and auto: the thresholds
   ``train-detector`` chose for its boxes on its validation fold);
4. ``cxrcam ensemble``: WBF of the Faster R-CNN and RetinaNet submissions;
5. ``cxrcam evaluate`` of each (mAP@0.4 with "No finding", findings mAP@0.4, "No finding" AP), and
   one paired comparison of every row on the same 1000 resamples.

    python scripts/bench_detectors.py --base /tmp/levers/train_seed0 --out /tmp/det
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
from cxrcam.evaluation.compare import beyond_noise, p_text
from cxrcam.evaluation.evaluate import findings_map

NO_FILTER = ["boxes.filter_low=0", "boxes.filter_high=1"]
ABNORMAL = "Faster R-CNN of abnormal images (detector.negatives=false)"


def train(stages: Stages, out: Path, name: str, overrides: list[str]) -> float:
    """One ``cxrcam train-detector`` into ``out/name`` (kept when its last epoch is there); seconds."""
    run = out / name
    seconds = run / "seconds.json"
    if (run / "last.pt").is_file() and seconds.is_file():
        return float(json.loads(seconds.read_text())["seconds"])
    start = time.perf_counter()
    run_command(cli, *stages.train_detector(*overrides, out=run))
    took = time.perf_counter() - start
    seconds.write_text(json.dumps({"seconds": took}))
    return took


def row_labels(comparison: dict, preds: dict[str, Path]) -> dict[str, str]:
    """evaluate's submission name -> the table's row, matched by path."""
    rows = {Path(p).resolve(): row for row, p in preds.items()}
    return {s["name"]: rows[Path(s["path"]).resolve()] for s in comparison["submissions"]}


def paired(comparison: dict, label: dict[str, str], reference: str, row: str, figure: str) -> str:
    """``row`` - ``reference`` on ``figure`` from evaluate's paired comparison: "+0.012 (p 0.030) *"
    (* beyond noise), or "-" where the pair or figure is not there."""
    for pair in comparison["pairs"]:
        ends = (label[pair["a"]], label[pair["b"]])
        if set(ends) == {reference, row} and figure in pair["figures"]:
            f = pair["figures"][figure]
            sign = 1 if ends[1] == row else -1
            return f"{sign * f['difference']:+.3f} (p {p_text(f['p'])}){' *' if beyond_noise(f) else ''}"
    return "-"


def rows(shares: list[float], retinanet: list[float], abnormal: bool = True) -> list[tuple[str, str, list[str]]]:
    """(row name, detector run, refine overrides) of every refine row."""
    found = []
    for share in shares:
        s = f"{100 * share:.0f}%"
        run = f"fasterrcnn_{100 * share:.0f}"
        found += [(f"Faster R-CNN, {s}", run, ["refine.proposals=rpn", "refine.gate=none", *NO_FILTER]),
                  (f"Faster R-CNN gated (gate=product), {s}", run, ["refine.proposals=rpn", "refine.gate=product",
                                                                     *NO_FILTER]),
                  (f"refined: RPN + CAM, no gate, {s}", run, ["refine.proposals=both", "refine.gate=none",
                                                              *NO_FILTER]),
                  (f"refined: CAM proposals, gated, {s}", run, ["refine.proposals=cam", "refine.gate=product",
                                                                *NO_FILTER]),
                  (f"refined at refine's defaults (RPN + CAM, gated), {s}", run, NO_FILTER)]
        if share == max(shares):
            found += [(f"Faster R-CNN + 2-class filter (auto: the detector's choice, else calibrate's), {s}", run,
                       ["refine.proposals=rpn", "refine.gate=none"]),
                      (f"Faster R-CNN + 2-class filter (0.08 / 0.95), {s}", run,
                       ["refine.proposals=rpn", "refine.gate=none", "boxes.filter_low=0.08",
                        "boxes.filter_high=0.95"])]
    for share in retinanet:
        s = f"{100 * share:.0f}%"
        run = f"retinanet_{100 * share:.0f}"
        found += [(f"RetinaNet, {s}", run, ["refine.proposals=rpn", "refine.gate=none", *NO_FILTER]),
                  (f"RetinaNet gated (gate=product), {s}", run, ["refine.proposals=rpn", "refine.gate=product",
                                                                  *NO_FILTER])]
    if abnormal:  # the VinBigData winners' setting: detectors of abnormal images + the filter
        s = f"{100 * max(shares):.0f}%"
        plain = ["refine.proposals=rpn", "refine.gate=none"]
        found += [(f"{ABNORMAL}, {s}", "fasterrcnn_abnormal", [*plain, *NO_FILTER]),
                  (f"{ABNORMAL} + 2-class filter (0.08 / 0.95), {s}", "fasterrcnn_abnormal",
                   [*plain, "boxes.filter_low=0.08", "boxes.filter_high=0.95"]),
                  (f"{ABNORMAL} + 2-class filter train-detector chose for its boxes (auto), {s}",
                   "fasterrcnn_abnormal", plain)]
    return found


def figures(metrics: dict) -> dict[str, float]:
    ap = metrics["ap"]
    return {"mAP@0.4": metrics["map"], "findings mAP@0.4": findings_map(ap), "No finding AP": ap.get("No finding")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a scripts/bench_quality.py --out folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--retinanet-shares", type=float, nargs="*", default=[1.0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--no-abnormal", action="store_true",
                        help="skip the detector of abnormal images alone and its 2-class filter rows")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--config", default=TINY, help="a shipped config's name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base = Stages(a.base, 0, a.config, a.overrides)  # its caches and classifier; calibration and runs in --out
    calibration = a.out / "calibration.json"
    if not calibration.is_file():
        run_command(cli, "calibrate", "--checkpoint", base.classifier, "--data", base.cache("train"), "--out",
                    calibration, "--maps", "none", *base.settings)
    common = [f"detector.backbone={a.model}", f"detector.epochs={a.epochs}", "detector.warmup_iters=20"]
    train_cache = open_cache(base.cache("train"))
    config = load_config(a.config, a.overrides)
    n_train = len(train_val_rows(train_cache.images["fold"].to_numpy(), config.split.val_fold, train_cache.root)[0])
    seconds = {}
    for arch, shares in (("fasterrcnn", a.shares), ("retinanet", a.retinanet_shares)):
        for share in shares:
            k = round(share * n_train)
            seconds[f"{arch}_{100 * share:.0f}"] = train(base, a.out, f"{arch}_{100 * share:.0f}", [
                *common, f"detector.arch={arch}", f"detector.box_images={0 if share >= 1 else k}"])

    if not a.no_abnormal:  # its 2-class filter: train-detector's choice for its boxes, which refine's auto reads
        top = max(a.shares)
        seconds["fasterrcnn_abnormal"] = train(base, a.out, "fasterrcnn_abnormal", [
            *common, "detector.arch=fasterrcnn", "detector.negatives=false",
            f"detector.box_images={0 if top >= 1 else round(top * n_train)}"])

    preds: dict[str, Path] = {}
    for name, run, extra in rows(a.shares, a.retinanet_shares, not a.no_abnormal):
        folder = a.out / "pred" / name.replace(" ", "_").replace("/", "-").replace(",", "").replace("%", "")
        if not (folder / "submission.csv").is_file():
            run_command(cli, *base.refine(folder, "--no-images", f"boxes.calibration={calibration}", *extra,
                                          detector=a.out / run / "best.pt"))
        preds[name] = folder
    top = f"{100 * max(a.shares):.0f}%"
    if a.retinanet_shares:
        fused = a.out / "pred" / "ensemble.csv"
        if not fused.is_file():
            run_command(cli, "ensemble", preds[f"Faster R-CNN, {top}"] / "submission.csv",
                        preds[f"RetinaNet, {top}"] / "submission.csv", "--data", base.cache("test"), "--out", fused,
                        "--filter-low", "0", "--filter-high", "1")
        preds[f"WBF ensemble of Faster R-CNN + RetinaNet, {top}"] = fused

    results = {}
    for name, pred in preds.items():
        ev = a.out / "eval" / (pred.name if pred.is_dir() else pred.stem)  # a row name may hold a "."
        if not (ev / "metrics.json").is_file():
            run_command(cli, *base.evaluate(pred, ev, "--no-control", "--no-plots"))
        results[name] = figures(json.loads((ev / "metrics.json").read_text()))
    cmp = a.out / "comparison"
    if not (cmp / "comparison.json").is_file():
        run_command(cli, *base.evaluate(list(preds.values()), cmp, "--no-plots"))
    comparison = json.loads((cmp / "comparison.json").read_text())
    label = row_labels(comparison, preds)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    lines = [f"command: {' '.join(sys.argv)}", f"device: {device}, torch {torch.__version__}",
             "training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
             "| row | mAP@0.4 | findings mAP@0.4 | No finding AP | against Faster R-CNN (same boxes; a filter row: "
             "the same detector unfiltered): mAP@0.4 | findings mAP@0.4 |", "|---|---|---|---|---|---|"]
    for name, f in results.items():
        share = name.rsplit(", ", 1)[-1]
        reference = f"{ABNORMAL}, {share}" if name.startswith(f"{ABNORMAL} +") else f"Faster R-CNN, {share}"
        lines.append(f"| {name} | {f['mAP@0.4']:.3f} | {f['findings mAP@0.4']:.3f} | "
                     f"{f['No finding AP'] if f['No finding AP'] is None else round(f['No finding AP'], 3)} | "
                     + (" - | - |" if name == reference else
                        f" {paired(comparison, label, reference, name, 'mAP@0.4')} | "
                        f"{paired(comparison, label, reference, name, 'findings mAP@0.4')} |"))
    lines += ["", "(* beyond noise: the paired 95% interval excludes 0)"]
    text = "\n".join(lines)
    pd.DataFrame(results).T.to_csv(a.out / "results.csv")
    (a.out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
