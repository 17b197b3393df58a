"""WBF ensembles of detectors (issue 37): the fusion settings chosen on validation, then scored on
the held-out test set against the best single member, paired.

It reuses a ``scripts/bench_detectors.py --out DET`` folder (its detector runs and calibration)
and that folder's ``--base``. For each member (``--members``, detector runs in ``DET``):

1. ``cxrcam refine`` as the plain detector (``refine.proposals=rpn``, ``gate=none``, no 2-class
   filter) on the train cache (its validation fold is scored) and on the test cache;
2. on the validation images, every member set of two or more is fused with ``cxrcam.outputs.
   postprocess.ensemble`` over WBF's IoU x ``conf_type`` x weights (equal, or each member's
   validation mAP) grid, and scored (mAP@0.4 with
   "No finding", as evaluate counts it); the best setting of each set is kept;
3. ``cxrcam ensemble`` writes each set's fused test submission at its chosen setting, and one
   ``cxrcam evaluate`` compares them all with the members, pair by pair on the same resamples.

    python scripts/bench_ensemble.py --base /tmp/levers/train_seed0 --det /tmp/det2 \\
        --members fasterrcnn_100 fasterrcnn_100_seed1 retinanet_100
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import pandas as pd

from bench_detectors import paired, row_labels
from cxrcam.cli import main as cli
from cxrcam.config import WBF_CONF_TYPES, load_config
from cxrcam.data.cache import open_cache
from cxrcam.data.splits import train_val_rows
from cxrcam.data.tables import BOX_COLUMNS, no_finding_rows
from cxrcam.demo import TINY, Stages, run_command
from cxrcam.evaluation.detection import voc_map, with_no_finding
from cxrcam.evaluation.evaluate import read_ground_truth
from cxrcam.outputs.postprocess import ensemble

PLAIN = ["refine.proposals=rpn", "refine.gate=none", "boxes.filter_low=0", "boxes.filter_high=1"]
IOUS = (0.3, 0.4, 0.5, 0.6)


def fused_map(paths: list[Path], sizes: dict, schema, truth: pd.DataFrame, iou: float, conf_type: str,
              iou_thr: float, weights: list[float] | None = None) -> float:
    """mAP@iou_thr ("No finding" counted) of the WBF of ``paths`` on the images of ``truth``."""
    found, normal, _ = ensemble(paths, sizes, schema, weights, iou=iou, conf_type=conf_type)
    ids = set(truth["image_id"])
    rows = [found[found["image_id"].isin(ids)]]
    if normal is not None:
        normal = normal[normal.index.isin(ids)]
        rows.append(no_finding_rows(normal.index, schema.no_finding_id, normal.to_numpy()))
    return voc_map(truth, pd.concat(rows, ignore_index=True), iou_thr)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="bench_detectors.py's --base")
    parser.add_argument("--det", type=Path, required=True, help="a bench_detectors.py --out folder")
    parser.add_argument("--members", nargs="+", required=True, help="detector runs in --det")
    parser.add_argument("--out", type=Path, default=None, help="default: DET/ensembles")
    parser.add_argument("--config", default=TINY, help="a shipped config's name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    a = parser.parse_args()
    out = a.out or a.det / "ensembles"
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(a.base, 0, a.config, a.overrides)
    config = load_config(a.config, a.overrides)
    calibration = a.det / "calibration.json"
    subs: dict[str, dict[str, Path]] = {"val": {}, "test": {}}
    for run in a.members:
        for split, data in (("val", "train"), ("test", "test")):
            folder = out / split / run
            if not (folder / "submission.csv").is_file():
                run_command(cli, *stages.refine(folder, "--no-images", f"boxes.calibration={calibration}", *PLAIN,
                                                data=data, detector=a.det / run / "best.pt"))
            subs[split][run] = folder / "submission.csv"

    cache = open_cache(stages.cache("train"))
    schema = cache.schema
    val_ids = list(cache.images["image_id"].iloc[train_val_rows(cache.images["fold"].to_numpy(),
                                                                config.split.val_fold, cache.root)[1]])
    train_truth = read_ground_truth(stages.cache("train"), config)
    boxes = train_truth.boxes[train_truth.boxes["image_id"].isin(set(val_ids))][["image_id", "class_id", *BOX_COLUMNS]]
    val_truth = with_no_finding(boxes, val_ids, schema.no_finding_id)
    iou_thr = config.eval.iou_thr

    chosen_file = out / "chosen.json"
    chosen = json.loads(chosen_file.read_text()) if chosen_file.is_file() else {}
    singles = {run: fused_map([subs["val"][run]], train_truth.sizes, schema, val_truth, 0.99, "max", iou_thr)
               for run in a.members}  # WBF of one member at IoU 0.99 is that member's boxes: the same scorer
    for k in range(2, len(a.members) + 1):
        for members in itertools.combinations(a.members, k):
            name = " + ".join(members)
            if name in chosen:
                continue
            weightings = {"equal": [1.0] * k, "validation mAP": [round(singles[m], 4) for m in members]}
            grid = {(iou, conf, w): fused_map([subs["val"][m] for m in members], train_truth.sizes, schema, val_truth,
                                              iou, conf, iou_thr, weightings[w])
                    for iou in IOUS for conf in WBF_CONF_TYPES for w in weightings}
            (iou, conf, w), best = max(grid.items(), key=lambda kv: kv[1])
            chosen[name] = {"members": list(members), "iou": iou, "conf_type": conf, "weights": weightings[w],
                            "weighting": w, "val_map": best, "val_map_default": grid[(0.4, "avg", "equal")],
                            "val_map_members": {m: singles[m] for m in members}}
            print(f"{name}: IoU {iou}, conf_type {conf}, {w} weights: validation mAP {best:.3f} (IoU 0.4 avg "
                  f"{grid[(0.4, 'avg', 'equal')]:.3f}; members {', '.join(f'{singles[m]:.3f}' for m in members)})", flush=True)
            chosen_file.write_text(json.dumps(chosen, indent=1))

    preds = {run: subs["test"][run] for run in a.members}
    for name, c in chosen.items():
        fused = out / "fused" / f"{name.replace(' + ', '+')}.csv"
        if not fused.is_file():
            fused.parent.mkdir(parents=True, exist_ok=True)
            run_command(cli, "ensemble", *[subs["test"][m] for m in c["members"]], "--data", stages.cache("test"),
                        "--out", fused, "--iou", c["iou"], "--conf-type", c["conf_type"], "--filter-low", 0,
                        "--filter-high", 1, *[a for w in c["weights"] for a in ("--weights", w)])
        preds[f"WBF {name}"] = fused
    cmp = out / "comparison"
    if not (cmp / "comparison.json").is_file():
        run_command(cli, *stages.evaluate(list(preds.values()), cmp, "--no-plots"))
    comparison = json.loads((cmp / "comparison.json").read_text())
    label = row_labels(comparison, preds)
    figures = {label[s["name"]]: s for s in comparison["submissions"]}

    def test_figure(row: str, key: str) -> float:
        return figures[row]["figures"][key]["value"]

    lines = [f"command: {' '.join(sys.argv)}", "",
             "| row | WBF IoU, conf_type, weights (chosen on validation) | validation mAP@0.4 | test mAP@0.4 | test findings "
             "mAP@0.4 | against its best member on test: mAP@0.4 | findings mAP@0.4 |", "|---|---|---|---|---|---|---|"]
    for row in preds:
        if row in a.members:
            lines.append(f"| {row} | - | {singles[row]:.3f} | {test_figure(row, 'mAP@0.4'):.3f} | "
                         f"{test_figure(row, 'findings mAP@0.4'):.3f} | - | - |")
            continue
        c = chosen[row.removeprefix("WBF ")]
        best = max(c["members"], key=lambda m: test_figure(m, "findings mAP@0.4"))
        lines.append(f"| {row} | {c['iou']}, {c['conf_type']}, {c['weighting']} | {c['val_map']:.3f} | {test_figure(row, 'mAP@0.4'):.3f} | "
                     f"{test_figure(row, 'findings mAP@0.4'):.3f} | {paired(comparison, label, best, row, 'mAP@0.4')} | "
                     f"{paired(comparison, label, best, row, 'findings mAP@0.4')} |")
    lines += ["", "(* beyond noise: the paired 95% interval excludes 0)"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
