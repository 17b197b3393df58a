"""The whole pipeline on synthetic data, every stage run as the real ``cxrcam`` command.

``cxrcam demo`` and ``scripts/bench_quality.py`` both call :func:`run_pipeline`: a synthetic
VinBigData-layout train set and a held-out test set (another seed), prepare, train the
classifier, calibrate its thresholds on the training cache's validation fold, localize the test
set at 0.65 and calibrated, train the detector (started from the classifier; with ``cam_proposals``
its RoI heads also train on the calibrated CAM proposals), refine with the calibrated thresholds, evaluate, and
one table. Each stage is the ``cxrcam`` command a user would type, printed first and run through
the same command line parser (:func:`cxrcam.cli.run_in_process`), with its progress bars.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcam.errors import CxrcamError
from cxrcam.evaluation.evaluate import findings_map, headline

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@dataclass
class PipelineSettings:
    out: Path
    n_images: int = 200  # training images
    size: int = 128  # cache side in pixels
    epochs: int = 8  # classifier epochs
    detector_epochs: int = 4
    seed: int = 0  # the test set uses seed + 1000
    model: str = "resnet10t"  # timm name of the classifier and the detector's backbone
    config: Path = TINY
    overrides: list[str] = field(default_factory=list)  # section.key=value for every stage
    plain: bool = False  # also run the plain detector (no CAM proposals, no gating) and gating alone
    pictures: bool = True
    n_test: int = 0  # held-out test images; 0 = half as many as n_images (at least 10)
    cam_only: bool = False  # stop after the CAM rows (no detector)
    reuse: bool = False  # keep the data, caches and classifier already in ``out``
    # the detector's RoI heads also train on the classifier's calibrated CAM proposals
    # (detector.cam_proposals_from): off, as with truth boxes on every image it cost 0.02 mAP (BENCHMARKS)
    cam_proposals: bool = False
    normal_fraction: float | None = None  # share of normal images in both synthetic sets (None: synth's default)


def run_command(*args: Any) -> None:
    """Run one ``cxrcam`` command as a user would type it, printed first, in this process."""
    from cxrcam.cli import run_in_process

    args = [str(a) for a in args]
    line = f"cxrcam {shlex.join(args)}"
    print(f"\n$ {line}", flush=True)
    code = run_in_process(args)
    sys.stdout.flush()
    if code != 0:
        raise CxrcamError(f"stage failed: {line}")


def run_pipeline(s: PipelineSettings) -> dict[str, Any]:
    """Run every stage into ``s.out``; returns the summary (also ``summary.json`` there)."""
    out, start = Path(s.out), time.perf_counter()
    cfg = ["--config", s.config]
    common = [f"model.name={s.model}", f"train.epochs={s.epochs}", f"detector.backbone={s.model}",
              f"detector.epochs={s.detector_epochs}", *s.overrides]
    n_test = s.n_test or max(10, s.n_images // 2)
    classifier, detector = out / "runs" / "classifier", out / "runs" / "detector"
    train, test = out / "cache" / "train", out / "cache" / "test"
    normal = [] if s.normal_fraction is None else ["--normal-fraction", s.normal_fraction]
    for split, n, seed in (("train", s.n_images, s.seed), ("test", n_test, s.seed + 1000)):
        if not (s.reuse and (out / "cache" / split / "cache.json").is_file()):
            run_command("synth", "--out", out / "data" / split, "--n-images", n, "--seed", seed,
                        "--size", int(s.size * 1.5), "--split", split, *normal, "--overwrite")
            run_command("prepare", "--dataset", "vinbig", "--root", out / "data" / split, "--out", out / "cache" / split,
                        "--size", s.size, *cfg, *common)
    if not (s.reuse and (classifier / "best.pt").is_file()):
        run_command("train-classifier", "--data", train, "--out", classifier, "--overwrite", *cfg, *common)
    no_images = [] if s.pictures else ["--no-images"]
    calibration = out / "calibration.json"
    run_command("calibrate", "--checkpoint", classifier / "best.pt", "--data", train, "--out", calibration,
                *cfg, *common)
    localize = ["localize", "--checkpoint", classifier / "best.pt", "--data", test]
    run_command(*localize, "--out", out / "localize", "--threshold", 0.65, *no_images, *cfg, *common)
    run_command(*localize, "--out", out / "calibrated", "--threshold", calibration, "--no-images", *cfg, *common)
    results = {"cam": out / "localize", "calibrated": out / "calibrated"}
    if not s.cam_only:
        weak = [f"detector.cam_proposals_from={classifier / 'best.pt'}"] if s.cam_proposals else []
        run_command("train-detector", "--data", train, "--out", detector, "--overwrite", *cfg, *common,
                    f"detector.init={classifier / 'best.pt'}", f"boxes.calibration={calibration}", *weak)
        refine = ["refine", "--classifier", classifier / "best.pt", "--detector", detector / "best.pt", "--data", test,
                  "--threshold", calibration]
        run_command(*refine, "--out", out / "refine", *no_images, *cfg, *common)
        results["refined"] = out / "refine"
        if s.plain:  # the ablations: the detector alone, and gated without CAM proposals
            for name, gate in (("plain", "none"), ("gated", "product")):
                run_command(*refine, "--out", out / name, "--no-images", *cfg, *common, "refine.proposals=rpn",
                            f"refine.gate={gate}")
                results[name] = out / name
    metrics = {}
    for name, folder in results.items():
        run_command("evaluate", "--pred", folder, "--gt", test, "--out", folder / "eval", *cfg, *common,
                    *([] if name in ("cam", "calibrated") else ["--no-control"]))
        metrics[name] = json.loads((folder / "eval" / "metrics.json").read_text())
    summary = _summary(metrics, out, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(metrics: dict[str, dict], out: Path, seconds: float) -> dict[str, Any]:
    cam = metrics["cam"]
    return {
        "mean_auroc": cam.get("mean_auroc"), "auroc": cam.get("auroc", {}),
        "map": {name: m["map"] for name, m in metrics.items()},
        "map_findings": {name: findings_map(m["ap"]) for name, m in metrics.items()},
        "ap": {name: m["ap"] for name, m in metrics.items()},
        "cam_rows": {name: headline(m) for name, m in metrics.items() if name in ("cam", "calibrated")},
        "seconds": seconds,
        "paths": {"pictures": str(out / "localize"), "refined pictures": str(out / "refine"),
                  "submission": str(out / "refine" / "submission.csv"),
                  "CAM submission": str(out / "localize" / "submission.csv"),
                  "calibration": str(out / "calibration.json")},
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def summary_table(summary: dict[str, Any]) -> str:
    """The tables: classifier AUROC and mAP@0.4 of every submission; then the CAM figures at 0.65
    and calibrated, each with its random-map control in brackets."""
    names = {"cam": "CAM-only, threshold 0.65", "calibrated": "CAM-only, calibrated thresholds",
             "refined": "refined (Faster R-CNN)", "plain": "plain detector", "gated": "detector + gate, no CAM proposals"}
    rows = [("classifier mean AUROC (test set)", _fmt(summary["mean_auroc"]), "")]
    rows += [(names[k], _fmt(v), _fmt(summary["map_findings"][k])) for k, v in summary["map"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'submission':<{width}}  mAP@0.4  findings mAP@0.4", f"{'-' * width}  -------  ----------------"]
    lines += [f"{a:<{width}}  {b:>7}  {c:>16}" for a, b, c in rows]
    cam_rows = summary.get("cam_rows", {})
    if cam_rows:
        labels = list(next(iter(cam_rows.values())))
        lines += ["", "CAM localisation (random-map control in brackets):", "",
                  "| CAM boxes | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for key, row in cam_rows.items():
            cells = [f"{_fmt(m)} ({_fmt(c)})" for m, c in row.values()]
            lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["PipelineSettings", "run_pipeline", "summary_table", "run_command"]
