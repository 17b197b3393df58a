"""Training truth from disagreeing readers (issue 35, item 4): what each ``fusion.method`` does to
the classifier and to the detector, scored against a consensus test truth.

One synthetic VinBigData train set drawn from the released table (three readers who disagree as
the release's do: 43% of findings marked by one reader) and a held-out test set with one consensus
reading per finding (``synth --split test``). For each method (``wbf``, ``majority``, ``reader``,
``union``) the train set is cached with it, a classifier is trained on its labels (any reader, or
2 of 3 for ``majority``: the other three share one classifier; ``--soft`` adds WBF with the share of
readers as soft targets), and a Faster R-CNN on its boxes, started from that classifier. Scored on the test set: the classifier's
mean AUROC (``cxrcam predict``), the plain detector's findings mAP@0.4 (``refine`` with
``refine.proposals=rpn refine.gate=none``, ``evaluate --ci``).

    python scripts/bench_fusion.py --out /tmp/fusion --n-images 800 --n-test 400
"""
from __future__ import annotations

import json
import sys
import time

import pandas as pd

from cxrcam.cli import main as cli
from cxrcam.data.cache import open_cache
from cxrcam.data.tables import target_columns
from cxrcam.demo import TINY, Stages, bench_parser, run_command
from cxrcam.evaluation.classification import auroc_per_class, mean_auroc
from cxrcam.evaluation.evaluate import findings_map

METHODS = ("wbf", "majority", "reader", "union")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--detector-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=35, help="the synthetic sets' seed (the tests use others)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--soft", action="store_true", help="also WBF with soft targets (train.soft_targets=true)")
    a = parser.parse_args()
    start = time.perf_counter()
    common = ["model.name=resnet10t", f"train.epochs={a.epochs}", "detector.backbone=resnet10t",
              f"detector.epochs={a.detector_epochs}"]
    stages = Stages(a.out, a.size, TINY, common)
    for split, n, seed in (("train", a.n_images, a.seed), ("test", a.n_test, a.seed + 1000)):
        if not (stages.data(split) / f"{split}.csv").is_file():
            run_command(cli, *stages.synth(split, n, seed, split=split))
    run_command(cli, *stages.prepare("test"))
    test = open_cache(stages.cache("test"))
    labels = test.images.set_index("image_id")[target_columns(test.schema)]
    runs = [(m, m, []) for m in a.methods] + ([("wbf, soft targets", "wbf", ["train.soft_targets=true"])]
                                             if a.soft else [])
    rows, trained = [], {}
    for name, method, extra in runs:
        key = name.replace(", ", "_").replace(" ", "_")
        cache, det = f"train_{key}", a.out / "runs" / f"det_{key}"
        run_command(cli, *stages.prepare(cache, f"fusion.method={method}", data="train"))
        # wbf, reader and union share their labels (any reader marked the finding): one classifier serves them
        labelled = ("share of readers (soft)" if extra else "2 of 3 readers" if method == "majority"
                    else "any reader", *extra)
        if labelled not in trained:
            clf = a.out / "runs" / f"clf_{key}"
            run_command(cli, *stages.train_classifier(*extra, data=cache, out=clf))
            probs = a.out / f"probs_{key}.csv"
            run_command(cli, "predict", "--checkpoint", clf / "best.pt", "--data", stages.cache("test"), "--out",
                        probs, "--workers", 0)
            p = pd.read_csv(probs, dtype={"image_id": str}).set_index("image_id").loc[labels.index]
            trained[labelled] = clf, mean_auroc(auroc_per_class(labels.to_numpy(),
                                                                p[list(test.schema.findings)].to_numpy()))
        clf, auroc = trained[labelled]
        row = {"truth": name, "labels": labelled[0], "classifier mean AUROC": auroc,
               "boxes": len(open_cache(stages.cache(cache)).boxes)}
        if not extra:  # the detector trains on boxes, which soft targets do not change
            run_command(cli, *stages.train_detector(data=cache, out=det, init=clf / "best.pt"))
            folder = a.out / f"detector_{key}"
            run_command(cli, *stages.refine(folder, "--no-images", "refine.proposals=rpn", "refine.gate=none",
                                            detector=det / "best.pt", classifier=clf / "best.pt"))
            run_command(cli, *stages.evaluate(folder, folder / "eval", "--ci", "--no-control", "--no-plots"))
            metrics = json.loads((folder / "eval" / "metrics.json").read_text())
            row |= {"detector findings mAP@0.4": findings_map(metrics["ap"]),
                    "ci": metrics["ci"]["findings mAP@0.4"]}
        rows.append(row)
        (a.out / "fusion.json").write_text(json.dumps(rows, indent=2))
    lines = [f"command: {' '.join(sys.argv)}", f"{(time.perf_counter() - start) / 60:.1f} min", "",
             "| training truth | labels | truth boxes | classifier mean AUROC | detector findings mAP@0.4 [95% CI] |",
             "|---|---|---|---|---|"]
    for r in rows:
        det = r.get("detector findings mAP@0.4")
        cell = "-" if det is None else f"{det:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        lines.append(f"| {r['truth']} | {r['labels']} | {r['boxes']} | {r['classifier mean AUROC']:.3f} | {cell} |")
    text = "\n".join(lines)
    (a.out / "fusion.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
