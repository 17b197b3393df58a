"""The RSNA row of the detector table (issue 37): RSNA-layout synthetic data end to end, each
submission's RSNA score with its bootstrap interval and paired against Faster R-CNN.

With the real commands, into ``--out``:

1. ``cxrcam synth --format rsna`` (train, and a held-out test set with another seed) and ``prepare``;
2. ``train-classifier`` and ``calibrate --maps none`` (the CAM thresholds and box scales);
3. ``localize`` with the calibrated thresholds: the CAM boxes;
4. ``train-detector`` for Faster R-CNN, RetinaNet and RetinaNet with its global output (RSNA 2nd
   place), the same epochs, all starting from the classifier; each sweeps its NMS IoU and box
   scale against the RSNA score on its validation fold;
5. ``refine`` on the test set: each detector alone (``refine.proposals=rpn``, ``gate=none``), and
   Faster R-CNN at refine's defaults (CAM + RPN proposals, gated);
6. ``evaluate --format rsna`` of each with ``--ci``, and one paired comparison of them all.

    python scripts/bench_rsna.py --out /tmp/rsna_bench          # CPU, ~40 min
"""
from __future__ import annotations

import json
import platform
import sys

import torch

from bench_detectors import paired, row_labels, train
from cxrcam.cli import main as cli
from cxrcam.demo import TINY, Stages, bench_parser, run_command
from cxrcam.evaluation.compare import with_interval

PLAIN = ["refine.proposals=rpn", "refine.gate=none"]
DETECTORS = {"Faster R-CNN": ("fasterrcnn", ["detector.arch=fasterrcnn"]),
             "RetinaNet": ("retinanet", ["detector.arch=retinanet"]),
             "RetinaNet + global output": ("retinanet_global", ["detector.arch=retinanet", "detector.global_head=true"])}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--detector-epochs", type=int, default=5)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--seed", type=int, default=7, help="the training set's seed (the test set: + 1000)")
    parser.add_argument("--config", default=TINY, help="a shipped config's name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    a = parser.parse_args()
    common = [f"model.name={a.model}", f"train.epochs={a.epochs}", f"detector.backbone={a.model}",
              f"detector.epochs={a.detector_epochs}", "detector.warmup_iters=20", *a.overrides]
    stages = Stages(a.out, a.size, a.config, common, dataset="rsna")
    for split, n, seed in (("train", a.n_images, a.seed), ("test", a.n_test, a.seed + 1000)):
        if not (stages.cache(split) / "cache.json").is_file():
            run_command(cli, *stages.synth(split, n, seed))
            run_command(cli, *stages.prepare(split))
    if not stages.classifier.is_file():
        run_command(cli, *stages.train_classifier())
    if not stages.calibration.is_file():
        run_command(cli, *stages.calibrate("--maps", "none"))
    preds = {"CAM boxes (calibrated)": a.out / "pred" / "cam"}
    if not (preds["CAM boxes (calibrated)"] / "submission.csv").is_file():
        run_command(cli, *stages.localize(preds["CAM boxes (calibrated)"], "--threshold", stages.calibration,
                                          "--no-images"))
    seconds = {}
    for name, (run, extra) in DETECTORS.items():
        seconds[run] = train(stages, a.out / "runs", run, extra)
        folders = {name: PLAIN}
        if run == "fasterrcnn":
            folders["refined at refine's defaults (RPN + CAM, gated)"] = []
        for row, settings in folders.items():
            folder = a.out / "pred" / row.replace(" ", "_").replace("'", "").replace("(", "").replace(")", "")
            if not (folder / "submission.csv").is_file():
                run_command(cli, *stages.refine(folder, "--no-images", "--threshold", stages.calibration, *settings,
                                                detector=a.out / "runs" / run / "best.pt"))
            preds[row] = folder
    scores = {}
    for row, folder in preds.items():
        ev = folder / "eval"
        if not (ev / "metrics.json").is_file():
            run_command(cli, *stages.evaluate(folder, ev, "--format", "rsna", "--ci", "--no-control", "--no-plots"))
        scores[row] = json.loads((ev / "metrics.json").read_text())
    cmp = a.out / "comparison"
    if not (cmp / "comparison.json").is_file():
        run_command(cli, *stages.evaluate(list(preds.values()), cmp, "--format", "rsna", "--no-plots"))
    comparison = json.loads((cmp / "comparison.json").read_text())
    label = row_labels(comparison, preds)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    lines = [f"command: {' '.join(sys.argv)}", f"device: {device}, torch {torch.__version__}",
             "training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
             "| row | RSNA score [95% CI] | images scored | mAP@0.4 | against Faster R-CNN: RSNA score |",
             "|---|---|---|---|---|"]
    for row, m in scores.items():
        lines.append(f"| {row} | {with_interval(m['rsna_score'], m.get('ci', {}).get('RSNA score'))} | "
                     f"{m['rsna_images_scored']} | {m['map']:.3f} | {'-' if row == 'Faster R-CNN' else paired(comparison, label, 'Faster R-CNN', row, 'RSNA score')} |")
    lines += ["", "(* beyond noise: the paired 95% interval excludes 0)"]
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
