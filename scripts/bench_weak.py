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
rows do not have) goes through ``Refiner``, the class ``cxrcam refine`` runs, with the test
images' calibrated CAM proposals and the classifier's probabilities computed once:
``proposals`` rpn (the detector alone), cam and both, gated by the classifier or not. Findings
mAP@0.4 overall and per class; the seconds each detector trained.

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

import numpy as np
import pandas as pd
import torch

from cxrcam.boxes import scale_boxes
from cxrcam.config import RefineConfig, load_config
from cxrcam.data.cache import open_cache
from cxrcam.data.dataset import image_tensor
from cxrcam.data.images import read_image
from cxrcam.data.splits import train_val_rows
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.detection.pseudo import cam_training_boxes
from cxrcam.detection.refine import Refiner
from cxrcam.evaluation.bootstrap import Inputs, bootstrap, match_classes
from cxrcam.evaluation.detection import voc_map
from cxrcam.cli import main as cli
from cxrcam.pipeline import TINY, run_command

VARIANTS = {"detector": ("rpn", "none"), "detector, gated": ("rpn", "product"), "cam": ("cam", "none"),
            "cam, gated": ("cam", "product"), "both": ("both", "none"), "both, gated": ("both", "product")}


def train(base: Path, out: Path, name: str, config: Path, overrides: list[str]) -> float:
    """One real ``cxrcam train-detector`` into ``out/name`` (skipped when its last epoch is there); seconds."""
    run = out / name
    done = run / "metrics.csv"
    epochs = next((o.split("=")[1] for o in overrides if o.startswith("detector.epochs=")), None)
    if done.is_file() and epochs and len(pd.read_csv(done)) == int(epochs):
        return float(json.loads((run / "seconds.json").read_text())["seconds"])
    start = time.perf_counter()
    run_command(cli, "train-detector", "--data", base / "cache" / "train", "--out", run, "--overwrite", "--config", config,
                *overrides)
    seconds = time.perf_counter() - start
    (run / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def score(detector: Path, test, images: torch.Tensor, proposals: list[np.ndarray], probs: np.ndarray,
          truth: pd.DataFrame, proposals_mode: str, gate: str, save: Path | None = None
          ) -> tuple[float, dict[int, float], tuple[float, float]]:
    """Findings mAP@0.4 (and per class, and its 95% bootstrap interval over the test images) of one
    detector with one refine setting on the test set; the detections to ``save``."""
    refiner = Refiner(detector, RefineConfig(proposals=proposals_mode, gate=gate), torch.device("cpu"))
    rows = []
    for start in range(0, len(images), 32):
        found = refiner(images[start:start + 32], proposals[start:start + 32], probs[start:start + 32])
        for k, (boxes, classes, scores) in enumerate(found, start):
            row = test.images.iloc[k]
            boxes = scale_boxes(boxes, 1 / row["scale_x"], 1 / row["scale_y"])
            rows += [(row["image_id"], int(c), float(s), *b) for b, c, s in zip(boxes, classes, scores)]
    found = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    if save is not None:
        found.to_csv(save, index=False)
    value, per_class = voc_map(truth, found)
    ids = list(test.images["image_id"])
    x = Inputs(match_classes(truth, found, ids, 0.4), list(range(test.schema.num_findings)),
               dict(enumerate(test.schema.findings)))
    ci = bootstrap([x], len(ids), 1000, seed=0)["submissions"][0]["mAP@0.4"]["ci"]  # findings only in this truth
    return value, {r.class_id: r.ap for r in per_class if r.n_truth > 0}, ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a scripts/bench_quality.py --out folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--config", type=Path, default=TINY)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every train-detector")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    classifier, calibration = a.base / "runs" / "classifier" / "best.pt", a.base / "calibration.json"
    common = [f"detector.backbone={a.model}", f"detector.epochs={a.epochs}", "detector.rois_per_image=128",
              "detector.warmup_iters=20", "detector.channels=64", "detector.head_size=256",
              f"detector.init={classifier}", f"boxes.calibration={calibration}",
              *a.overrides]
    train_cache = open_cache(a.base / "cache" / "train")
    config = load_config(a.config, common)
    n_train = len(train_val_rows(train_cache.images["fold"].to_numpy(), config.split.val_fold, train_cache.root)[0])

    # the test set once: images, calibrated CAM proposals of the predicted classes, probabilities
    test = open_cache(a.base / "cache" / "test")
    images = torch.stack([image_tensor(read_image(test.root / f).image) for f in test.images["file"]])
    _, frame = cam_training_boxes(classifier, test, config, torch.device("cpu"),
                                  proposal_rows=np.arange(len(test.images)))
    groups = {k: g[["cx_min", "cy_min", "cx_max", "cy_max"]].to_numpy() for k, g in frame.groupby("image_id")}
    proposals = [groups.get(i, np.zeros((0, 4))) for i in test.images["image_id"]]
    probs = pd.read_csv(a.base / "calibrated" / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    probs = probs.loc[test.images["image_id"]].to_numpy()
    truth = test.boxes[test.boxes["class_id"] < test.schema.num_findings][["image_id", "class_id", *BOX_COLUMNS]]
    cam_metrics = json.loads((a.base / "calibrated" / "eval" / "metrics.json").read_text())
    cam_ap = {k: v for k, v in cam_metrics["ap"].items() if k != "No finding" and v is not None}

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
            seconds[run] = train(a.base, a.out, run, a.config, [*common, *extra])
            variants = {"detector": VARIANTS["detector"]} if name == "plain" else VARIANTS
            for variant, (mode, gate) in variants.items():
                value, aps, ci = score(a.out / run / "last.pt", test, images, proposals, probs, truth, mode, gate,
                                       a.out / f"detections_{run}_{mode}_{gate}.csv")
                results.append({"boxes": label, "detector": name, "variant": variant, "findings_map": value,
                                "ci_low": ci[0], "ci_high": ci[1], "train_s": seconds[run]})
                per_class[f"{run} {variant}"] = aps
                print(f"{label:>16} {name:<5} {variant:<16} findings mAP@0.4 {value:.3f}", flush=True)
                table = pd.DataFrame(results)  # written as it grows: an interrupted run keeps its cells
                table.to_csv(a.out / "results.csv", index=False)
                classes = test.schema.findings
                pd.DataFrame({run: {classes[c]: ap for c, ap in aps.items()} for run, aps in per_class.items()}
                             ).to_csv(a.out / "per_class.csv")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    cam_map = float(np.mean(list(cam_ap.values())))
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
