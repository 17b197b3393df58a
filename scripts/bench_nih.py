"""The NIH localisation table in the literature's format, on the synthetic ``nih`` profile.

The published NIH ChestX-ray14 tables (ChestX-ray8, CLARiTy, ThoraX-PriorNet, PCAN) give, per
boxed class, the share of truth boxes hit at T(IoU) = 0.1 ... 0.7 and T(IoBB) = 0.1 ... 0.9, with
the class given (its map is cut whatever the classifier predicts). This runs the pipeline on the
``nih`` profile (synth --format nih --profile nih, the tiny config, cam-only), localises the held-out
set with every class mapped (``boxes.min_prob=0``, the calibrated thresholds), and prints our table
beside the published rows and a random-map control. Ours is synthetic: findings drawn from the
released tables' statistics on phantoms (or real normals with --backgrounds), not radiologists' boxes
on real disease; the published rows are for orientation, not a comparison.

    python scripts/bench_nih.py --out /tmp/nih --n-images 800 --n-test 400 --train-seeds 0 1 2
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.calibration import box_rules
from cxrcam.cli import main as cli
from cxrcam.config import load_config
from cxrcam.demo import TINY, PipelineSettings, bench_parser, pipeline_stages, run_command, run_pipeline
from cxrcam.evaluation.evaluate import score
from cxrcam.evaluation.weak import LITERATURE_IOBB, LITERATURE_IOU, literature_table, mean_table, random_truth_detections

# published means over the 8 boxed classes (../shared/docs/REFERENCE.md); T(IoU) 0.1-0.5
PUBLISHED_IOU = {"CLARiTy (2025)": (.81, .69, .59, .47, .32), "ThoraX-PriorNet (2024)": (.80, .63, .49, .33, .22),
                 "PCAN (2022)": (.78, .57, .36, .21, .10)}
# ChestX-ray8 (Wang et al. 2017), per class: T(IoBB)=0.1, 0.5, T(IoU)=0.1, 0.5
CHESTXRAY8 = {"Atelectasis": (.73, .28, .69, .05), "Cardiomegaly": (.99, .88, .94, .18),
              "Effusion": (.71, .33, .66, .11), "Infiltration": (.79, .42, .71, .07), "Mass": (.44, .14, .40, .01),
              "Nodule": (.16, .01, .14, .01), "Pneumonia": (.75, .38, .63, .03), "Pneumothorax": (.46, .18, .38, .03)}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backgrounds", type=Path, default=None, help="normal radiographs to insert findings into")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every stage")
    a = parser.parse_args()
    start = time.perf_counter()
    ours, controls, aurocs = [], [], []
    for seed in a.train_seeds:
        out = a.out / f"train_seed{seed}"
        settings = PipelineSettings(out, a.n_images, a.size, a.epochs, 1, a.data_seed, "resnet10t", TINY,
                                    [*a.overrides, f"train.seed={seed}"], pictures=False, n_test=a.n_test,
                                    cam_only=True, reuse=(out / "summary.json").is_file(), profile="nih",
                                    backgrounds=a.backgrounds, dataset="nih")
        aurocs.append(run_pipeline(cli, settings)["mean_auroc"])
        stages = pipeline_stages(settings)
        folder = out / "every_class"  # the literature's protocol: each truth class's map cut, predicted or not
        if not (folder / "localize.json").is_file():
            run_command(cli, *stages.localize(folder, "--threshold", stages.calibration, "--no-images",
                                              "boxes.min_prob=0"))
        scored = score(folder, stages.cache("test"), control=False)
        truth = scored.truth
        ours.append(literature_table(truth.boxes, scored.detections, truth.schema))
        rules = box_rules(load_config(TINY, [f"boxes.calibration={stages.calibration}"]).boxes, truth.schema)[0]
        controls.append(mean_table([literature_table(sub, dets, truth.schema) for dets, _, sub in
                                    random_truth_detections(truth.boxes, truth.sizes, rules)]))
    columns = [f"T(IoU)={t}" for t in LITERATURE_IOU] + [f"T(IoBB)={t}" for t in LITERATURE_IOBB]
    lines = [f"command: {' '.join(sys.argv)}", f"machine: {platform.machine()}, {platform.processor() or 'cpu'}",
             f"{len(a.train_seeds)} trainings, {(time.perf_counter() - start) / 60:.1f} min; classifier mean AUROC "
             f"{np.mean(aurocs):.3f}", "",
             "Ours: the mean (+- sd where several trainings) (random-map control in brackets); synthetic nih profile.",
             "",
             "| class | boxes | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for k, name in enumerate(ours[0]["class"]):
        cells = []
        for col in columns:
            values = np.array([t.iloc[k][col] for t in ours])
            control = np.mean([c.iloc[k][col] for c in controls])
            spread = f" +- {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread} ({control:.2f})")
        lines.append(f"| {name} | {int(ours[0].iloc[k]['n_boxes'])} | " + " | ".join(cells) + " |")
    lines += ["", "Published, real NIH boxes (mean over the 8 classes, T(IoU) = 0.1 ... 0.5):", "",
              "| method | " + " | ".join(f"T(IoU)={t}" for t in LITERATURE_IOU[:5]) + " |", "|---|" + "---|" * 5]
    lines += [f"| {m} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for m, row in PUBLISHED_IOU.items()]
    lines += ["", "ChestX-ray8 (Wang et al. 2017), real NIH boxes:", "",
              "| class | T(IoBB)=0.1 | T(IoBB)=0.5 | T(IoU)=0.1 | T(IoU)=0.5 |", "|---|---|---|---|---|"]
    lines += [f"| {c} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for c, row in CHESTXRAY8.items()]
    text = "\n".join(lines)
    (a.out / "nih_table.md").write_text(text + "\n")
    pd.concat([t.assign(training=s) for s, t in zip(a.train_seeds, ours)]).to_csv(a.out / "nih_table.csv", index=False)
    print("\n" + text)


if __name__ == "__main__":
    main()
