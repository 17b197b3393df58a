"""Per-class operating points against one 0.5 for every class (issue 35: re-measured on the world of
the real tables), on the trainings of a ``scripts/bench_maps.py`` run.

For each ``train_seed*`` folder: the calibrated CAM boxes at ``boxes.min_prob=auto`` (each class above
its operating point from the checkpoint; bench_maps' "calibrated" row) against the same calibration
at ``boxes.min_prob=0.5``, localized on the same held-out test set, each evaluated, and paired on the
same bootstrap resamples (``evaluate --pred A --pred B``). Table: findings mAP@0.4, MaxBoxAccV2,
T(IoBB)=0.5, mean sensitivity and specificity as mean +- sd over the trainings, and each training's
paired difference in findings mAP.

    python scripts/bench_operating.py --maps /tmp/maps_vinbig
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cxrcam.cli import main as cli
from cxrcam.demo import TINY, Stages, run_command
from cxrcam.evaluation.compare import pair_sentence
from cxrcam.evaluation.evaluate import headline

FIGURES = ("findings mAP@0.4", "MaxBoxAccV2", "T(IoBB)=0.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=Path, required=True, help="a scripts/bench_maps.py --out folder")
    parser.add_argument("--min-prob", type=float, default=0.5)
    parser.add_argument("--config", default=TINY)
    a = parser.parse_args()
    rows: dict[str, list[dict]] = {"operating points (auto)": [], f"min_prob {a.min_prob}": []}
    pairs = []
    for run in sorted(a.maps.glob("train_seed*")):
        stages = Stages(run, 0, a.config)
        fixed = run / f"calibrated_min_prob_{a.min_prob}"
        if not (fixed / "eval" / "metrics.json").is_file():
            run_command(cli, *stages.localize(fixed, "--threshold", stages.calibration, "--no-images",
                                              f"boxes.min_prob={a.min_prob}"))
            run_command(cli, *stages.evaluate(fixed, fixed / "eval"))
        compared = run / "operating_comparison"
        if not (compared / "comparison.json").is_file():
            run_command(cli, *stages.evaluate([run / "calibrated", fixed], compared, "--no-plots"))
        for name, folder in zip(rows, (run / "calibrated", fixed)):
            m = json.loads((folder / "eval" / "metrics.json").read_text())
            rows[name].append({**{k: v[0] for k, v in headline(m).items()},
                               "sensitivity": m.get("mean_sensitivity"), "specificity": m.get("mean_specificity")})
        pair = json.loads((compared / "comparison.json").read_text())["pairs"][0]
        pairs.append(f"{run.name}: " + pair_sentence(pair["a"], pair["b"], pair["figures"]["findings mAP@0.4"]))
    columns = [*FIGURES, "sensitivity", "specificity"]
    lines = [f"command: {' '.join(sys.argv)}", "", "| decision thresholds | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, runs in rows.items():
        cells = []
        for k in columns:
            v = np.array([np.nan if r[k] is None else r[k] for r in runs], float)
            cells.append(f"{np.nanmean(v):.3f} +- {np.nanstd(v, ddof=1) if len(v) > 1 else 0:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *pairs]
    text = "\n".join(lines)
    (a.maps / "operating.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
