"""Evaluate speed: ``cxrcam evaluate`` against a ``map-boxes`` script on one VinBigData-sized
workload, both run side by side as fresh processes (imports included), as a user runs them.

The workload (written once into ``--out``): the first ``--images`` images of the released
VinBigData ``train.csv`` (real boxes, three readers), its WBF-fused truth as ``truth.csv`` (the
truth both sides score against, read by ``cxrcam`` with ``fusion.method=reader``), and a
``submission.csv`` of about ``--per-image`` predictions per image: jittered copies of each truth
box, random boxes of random classes and a "No finding" box, with random scores.

The ``map-boxes`` side is the usual Kaggle script: read both CSVs with pandas, split the
PredictionStrings, add VinBigData's 0 0 1 1 "No finding" truth box to images without findings,
call ``mean_average_precision_for_boxes(..., iou_threshold=0.4)``. It needs ``pip install
map-boxes`` in the benchmark's environment (not a cxrcam dependency). Both mAPs are printed: the
two differ only by conventions (README, "Conventions": map-boxes counts IoU >= 0.4 a hit).

    python scripts/bench_evaluate.py --out /tmp/bench_eval --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SHARED_TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tables" / "vinbigdata-train.csv.gz"

MAP_BOXES_SCRIPT = """
import sys
import numpy as np
import pandas as pd
from map_boxes import mean_average_precision_for_boxes

truth = pd.read_csv(sys.argv[1])
sub = pd.read_csv(sys.argv[2], keep_default_na=False)
rows = []
for image_id, text in zip(sub["image_id"], sub["PredictionString"]):
    v = text.split()
    for k in range(0, len(v), 6):
        rows.append((image_id, v[k], float(v[k + 1]), float(v[k + 2]), float(v[k + 4]), float(v[k + 3]), float(v[k + 5])))
det = pd.DataFrame(rows, columns=["ImageID", "LabelName", "Conf", "XMin", "XMax", "YMin", "YMax"])
ann = truth.rename(columns={"image_id": "ImageID", "class_id": "LabelName", "x_min": "XMin", "x_max": "XMax",
                            "y_min": "YMin", "y_max": "YMax"})
ann["LabelName"] = ann["LabelName"].astype(str)
ann = ann[["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"]].to_numpy()
value, _ = mean_average_precision_for_boxes(ann, det.to_numpy(), iou_threshold=0.4, verbose=False)
print(value)
"""


def workload(table: Path, out: Path, n_images: int, per_image: int, seed: int = 0) -> tuple[int, int]:
    """train.csv, truth.csv and submission.csv in ``out``; (predictions, truth boxes)."""
    from cxrcam.data.readers import vinbig_from_table
    from cxrcam.data.tables import NORMAL_BOX
    from cxrcam.data.submission import submission_table
    from cxrcam.schemas import VINBIG

    raw = pd.read_csv(table)
    ids = raw["image_id"].drop_duplicates().iloc[:n_images]
    raw = raw[raw["image_id"].isin(ids)]
    raw.to_csv(out / "train.csv", index=False)
    fused = vinbig_from_table(raw).boxes
    normal = sorted(set(ids) - set(fused["image_id"]))
    truth = pd.concat([fused, pd.DataFrame({"image_id": normal, "class_id": VINBIG.no_finding_id, "rad_id": "none",
                                            **dict(zip(["x_min", "y_min", "x_max", "y_max"], NORMAL_BOX))})])
    truth.insert(1, "class_name", [VINBIG.class_name(c) for c in truth["class_id"]])
    truth.to_csv(out / "truth.csv", index=False)

    rng = np.random.default_rng(seed)
    parts = []
    for copy in range(3):  # jittered copies of every truth box
        xy = fused[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
        side = np.maximum(xy[:, 2:] - xy[:, :2], 1)
        xy = xy + rng.normal(0, 0.15, xy.shape) * np.concatenate([side, side], axis=1)
        parts.append(pd.DataFrame({"image_id": fused["image_id"].to_numpy(), "class_id": fused["class_id"].to_numpy(),
                                   "score": rng.random(len(xy)), "x_min": np.minimum(xy[:, 0], xy[:, 2]),
                                   "y_min": np.minimum(xy[:, 1], xy[:, 3]), "x_max": np.maximum(xy[:, 0], xy[:, 2]),
                                   "y_max": np.maximum(xy[:, 1], xy[:, 3])}))
    n_random = max(0, per_image * len(ids) - 3 * len(fused) - len(ids))
    image = rng.choice(ids.to_numpy(), n_random)
    corner = rng.uniform(0, 2000, (n_random, 2))
    size = rng.uniform(50, 800, (n_random, 2))
    parts.append(pd.DataFrame({"image_id": image, "class_id": rng.integers(0, VINBIG.num_findings, n_random),
                               "score": rng.random(n_random) * 0.5, "x_min": corner[:, 0], "y_min": corner[:, 1],
                               "x_max": corner[:, 0] + size[:, 0], "y_max": corner[:, 1] + size[:, 1]}))
    dets = pd.concat(parts, ignore_index=True).round(1)
    scores = pd.Series(rng.random(len(ids)), index=ids.to_numpy())
    submission_table(list(ids), dets, scores).to_csv(out / "submission.csv", index=False)
    return len(dets) + len(ids), len(fused)


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", type=Path, default=SHARED_TABLE, help="VinBigData train.csv (or .csv.gz)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--per-image", type=int, default=29, help="predictions per image, about")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the median is kept")
    a = parser.parse_args()
    if importlib.util.find_spec("map_boxes") is None:
        raise SystemExit("the map-boxes side needs: pip install map-boxes")
    a.out.mkdir(parents=True, exist_ok=True)
    n_pred, n_truth = workload(a.table, a.out, a.images, a.per_image)
    (a.out / "map_boxes_script.py").write_text(MAP_BOXES_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    evaluate = [sys.executable, "-m", "cxrcam", "evaluate", "--pred", str(a.out / "submission.csv")]
    truth = ["--gt", str(a.out / "truth.csv"), "fusion.method=reader"]
    sides = {  # each prints the mAP (cxrcam: the metrics table); --json adds the metrics file, --out the plots
        "map-boxes script": [sys.executable, str(a.out / "map_boxes_script.py"), str(a.out / "truth.csv"),
                             str(a.out / "submission.csv")],
        "cxrcam evaluate": [*evaluate, *truth],
        "cxrcam evaluate --json --no-plots": [*evaluate, *truth, "--no-plots", "--json",
                                              str(a.out / "np" / "metrics.json")],
        "cxrcam evaluate --out (plots)": [*evaluate, *truth, "--out", str(a.out / "json")],
        "cxrcam evaluate --ci (1000 resamples)": [*evaluate, *truth, "--no-plots", "--ci", "--json",
                                                  str(a.out / "ci" / "metrics.json")],
        "cxrcam evaluate, train.csv (WBF)": [*evaluate, "--gt", str(a.out / "train.csv"), "--no-plots",
                                             "--json", str(a.out / "wbf" / "metrics.json")],
    }
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    outputs = {}
    for _ in range(a.repeats):  # alternating, so a busy spell hits every side alike
        for name, command in sides.items():
            s, outputs[name] = timed(command, env)
            seconds[name].append(s)
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    maps = {"map-boxes script": float(outputs["map-boxes script"].split()[-1])}
    for name, folder in (("cxrcam evaluate --json --no-plots", "np"), ("cxrcam evaluate --out (plots)", "json"),
                         ("cxrcam evaluate --ci (1000 resamples)", "ci"), ("cxrcam evaluate, train.csv (WBF)", "wbf")):
        maps[name] = json.loads((a.out / folder / "metrics.json").read_text())["map"]
    maps["cxrcam evaluate"] = maps["cxrcam evaluate --json --no-plots"]  # the same run without the file
    base = median["map-boxes script"]
    lines = [f"command: {' '.join(sys.argv)}", f"machine: {platform.node()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}",
             f"workload: {a.images} images, {n_pred} predictions, {n_truth} fused truth boxes", "",
             "| side | median s (runs) | x map-boxes | mAP@0.4 |", "|---|---|---|---|"]
    lines += [f"| {k} | {median[k]:.2f} ({', '.join(f'{s:.1f}' for s in seconds[k])}) | {median[k] / base:.2f} | "
              f"{maps[k]:.4f} |" for k in sides]
    ci = json.loads((a.out / "ci" / "metrics.json").read_text())["ci"]["mAP@0.4"]
    lines += ["", f"--ci: mAP@0.4 95% interval [{ci[0]:.4f}, {ci[1]:.4f}]; its cost against the plain evaluate: "
                  f"{median['cxrcam evaluate --ci (1000 resamples)'] / median['cxrcam evaluate --json --no-plots']:.2f}x "
                  f"(goal: at most 3x)"]
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
