"""The whole pipeline on synthetic data, every stage run as the real ``cxrcam`` command.

``cxrcam demo`` and ``scripts/bench_quality.py`` both call :func:`run_pipeline`: a synthetic
VinBigData-layout train set and a held-out test set (another seed), prepare, train the
classifier, localize the test set, train the detector (started from the classifier), refine,
evaluate, and one table. Each stage is a subprocess ``python -m cxrcam ...`` whose command line
is printed first and whose progress bars show, so what the demo does is what a user types.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcam.errors import CxrcamError

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


def run_command(*args: Any) -> None:
    """Run one ``cxrcam`` command as a user would, its output going to the terminal."""
    args = [str(a) for a in args]
    print(f"\n$ cxrcam {shlex.join(args)}", flush=True)
    if subprocess.run([sys.executable, "-m", "cxrcam", *args]).returncode != 0:
        raise CxrcamError(f"stage failed: cxrcam {shlex.join(args)}")


def run_pipeline(s: PipelineSettings) -> dict[str, Any]:
    """Run every stage into ``s.out``; returns the summary (also ``summary.json`` there)."""
    out, start = Path(s.out), time.perf_counter()
    cfg = ["--config", s.config]
    common = [f"model.name={s.model}", f"train.epochs={s.epochs}", f"detector.backbone={s.model}",
              f"detector.epochs={s.detector_epochs}", "detector.rois_per_image=128", "detector.warmup_iters=20",
              *s.overrides]
    n_test = s.n_test or max(10, s.n_images // 2)
    for split, n, seed in (("train", s.n_images, s.seed), ("test", n_test, s.seed + 1000)):
        run_command("synth", "--out", out / "data" / split, "--n-images", n, "--seed", seed, "--size", int(s.size * 1.5))
        run_command("prepare", "--dataset", "vinbig", "--root", out / "data" / split, "--out", out / "cache" / split,
               "--size", s.size, *cfg, *common)
    classifier, detector = out / "runs" / "classifier", out / "runs" / "detector"
    test = out / "cache" / "test"
    run_command("train-classifier", "--data", out / "cache" / "train", "--out", classifier, *cfg, *common)
    no_images = [] if s.pictures else ["--no-images"]
    run_command("localize", "--checkpoint", classifier / "best.pt", "--data", test, "--out", out / "localize",
           "--threshold", 0.65, *no_images, *cfg, *common)
    run_command("train-detector", "--data", out / "cache" / "train", "--out", detector, *cfg, *common,
           f"detector.init={classifier / 'best.pt'}")
    refine = ["refine", "--classifier", classifier / "best.pt", "--detector", detector / "best.pt", "--data", test]
    run_command(*refine, "--out", out / "refine", *no_images, *cfg, *common)
    results = {"cam": out / "localize", "refined": out / "refine"}
    if s.plain:  # the ablations: the detector alone, and gated without CAM proposals
        for name, cam_proposals, gate in (("plain", "false", "none"), ("gated", "false", "product")):
            run_command(*refine, "--out", out / name, "--no-images", *cfg, *common,
                   f"refine.cam_proposals={cam_proposals}", f"refine.gate={gate}")
            results[name] = out / name
    metrics = {}
    for name, folder in results.items():
        run_command("evaluate", "--pred", folder, "--gt", test, "--out", folder / "eval", *cfg, *common,
               *([] if name == "cam" else ["--no-control"]))
        metrics[name] = json.loads((folder / "eval" / "metrics.json").read_text())
    summary = _summary(metrics, out, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(metrics: dict[str, dict], out: Path, seconds: float) -> dict[str, Any]:
    cam = metrics["cam"]
    overall = {row["source"]: row for row in cam.get("localization", []) if row["class"] == "all"}
    return {
        "mean_auroc": cam.get("mean_auroc"), "auroc": cam.get("auroc", {}),
        "map": {name: m["map"] for name, m in metrics.items()},
        "map_findings": {name: _findings_map(m["ap"]) for name, m in metrics.items()},
        "ap": {name: m["ap"] for name, m in metrics.items()},
        "localization": overall.get("model", {}), "control": overall.get("random map"), "seconds": seconds,
        "paths": {"pictures": str(out / "localize"), "refined pictures": str(out / "refine"),
                  "submission": str(out / "refine" / "submission.csv"),
                  "CAM submission": str(out / "localize" / "submission.csv")},
    }


def _findings_map(ap: dict[str, float | None]) -> float | None:
    """mAP over the 14 findings alone: "No finding" is scored from the same p_normal in every
    submission, so it only dilutes a comparison of boxes."""
    values = [v for name, v in ap.items() if name != "No finding" and v is not None]
    return sum(values) / len(values) if values else None


def summary_table(summary: dict[str, Any]) -> str:
    """The one table: classifier AUROC, CAM-only / refined (/ plain) mAP@0.4, localisation accuracy."""
    loc, control = summary["localization"], summary["control"]
    names = {"cam": "CAM-only", "refined": "refined (Faster R-CNN)", "plain": "plain detector",
             "gated": "detector + gate, no CAM proposals"}
    rows = [("classifier mean AUROC (test set)", summary["mean_auroc"])]
    rows += [(f"{names[k]} mAP@0.4", v) for k, v in summary["map"].items()]
    rows += [(f"{names[k]} mAP@0.4, findings only", v) for k, v in summary["map_findings"].items()]
    for key, label in (("iou@0.1", "T(IoU)=0.1"), ("iou@0.5", "T(IoU)=0.5"), ("iobb@0.5", "T(IoBB)=0.5"),
                       ("pointing", "pointing game")):
        rows.append((f"CAM localisation accuracy {label}", loc.get(key)))
        if control:
            rows.append((f"  random-map control {label}", control.get(key)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {'n/a' if v is None else f'{v:.3f}'}" for name, v in rows]
    return "\n".join(lines)


__all__ = ["PipelineSettings", "run_pipeline", "summary_table", "run_command"]
