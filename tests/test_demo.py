"""`cxrcam demo`: every stage runs as the real command and the table reports their metrics."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxrcam.data.cache import open_cache
from cxrcam.data.tables import target_columns
from cxrcam.data.submission import read_submission


ROOT = Path(__file__).resolve().parents[1]


def install_wheel(tmp_path: Path) -> Path:
    """Build the wheel a user would get (from a copy of the source tree, so no stale build/ of the
    clone goes in) and install it, without -e, into a folder of its own; that folder."""
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "demo", "runs", ".pytest_cache"))
    def pip(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("cxrcam-*.whl")
    pip("install", "--no-deps", "-q", "--target", str(site), str(wheel))
    return site


def test_demo_runs_every_stage_and_reports_their_metrics(tmp_path):
    """The demo from a wheel install, outside the clone (configs ship in the package), on the field's
    shape: 70% normal images (VinBigData's share), heat maps one image at a time and a strict
    operating point (boxes.min_prob=0.99), so most CAM batches of every stage need no class map."""
    site, elsewhere = install_wheel(tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-m", "cxrcam", "demo", "--out", str(out), "--n-images", "20",
                             "--n-test", "10", "--size", "64", "--epochs", "2", "--detector-epochs", "1",
                             "--normal-fraction", "0.7", "train.workers=0", "cam.workers=0",
                             "cam.batch_size=1", "boxes.min_prob=0.99", "detector.workers=0"],
                            capture_output=True, text=True, timeout=900, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the installed package ran, with the config it ships (a clone's configs/ is nowhere on its path)
    assert f"--config {(site / 'cxrcam' / 'configs' / 'tiny.yaml').resolve()} " in result.stdout
    assert not (site / "configs").exists() and not list(elsewhere.iterdir())
    assert "\r" not in result.stderr and len(result.stderr) < 40_000  # a log: lines, not bar redraws
    for stage in ("synth", "prepare", "train-classifier", "calibrate", "localize", "train-detector", "refine",
                  "evaluate", "report"):
        assert f"$ cxrcam {stage} " in result.stdout, stage  # each stage is the command a user would type
        assert re.search(rf"^cxrcam {stage}: \d+\.\d s$", result.stdout, re.M), stage  # and its wall time
    # a re-run into the same folder starts afresh (another --size or --seed included); 20 images: 2 folds
    prepares = [line for line in result.stdout.splitlines() if line.startswith("$ cxrcam prepare ")]
    assert len(prepares) == 2 and all("--overwrite" in line and "split.n_folds=2" in line for line in prepares)
    summary = json.loads((out / "summary.json").read_text())
    for name, folder in (("cam", "localize"), ("calibrated", "calibrated"), ("refined", "refine")):
        metrics = json.loads((out / folder / "eval" / "metrics.json").read_text())
        assert summary["map"][name] == pytest.approx(metrics["map"])
        assert f"{metrics['map']:.3f}" in result.stdout
    assert summary["mean_auroc"] == pytest.approx(
        json.loads((out / "localize" / "eval" / "metrics.json").read_text())["mean_auroc"])
    test_images = set(open_cache(out / "cache" / "test").images["image_id"])
    train_images = set(open_cache(out / "cache" / "train").images["image_id"])
    assert len(test_images) == 10 and not test_images & train_images  # held out
    assert set(read_submission(out / "refine" / "submission.csv")["image_id"]) == test_images
    assert str(out / "refine" / "submission.csv") in result.stdout
    assert len(list((out / "localize").glob("gtimage_*.png"))) == 10
    # honest folder names: the held-out images are not in a folder named train
    assert sorted(p.name for p in (out / "data" / "test").iterdir()) == ["test", "test.csv"]
    for split in ("train", "test"):  # the field's share of normal images, as asked
        assert "--normal-fraction 0.7" in result.stdout
        cache = open_cache(out / "cache" / split)
        assert cache.images[target_columns(cache.schema)].sum(axis=1).eq(0).mean() >= 0.5
    # it ends with the report, summary first, and says to open it
    assert f"open first: {out / 'report.html'}" in result.stdout
    page = (out / "report.html").read_text()
    assert '<section id="summary">' in page
    # refined against CAM-only on the same bootstrap resamples: in the table, the summary and the report
    assert summary["refined_vs_cam"]["figure"] == "findings mAP@0.4" and "refined against CAM-only" in result.stdout
    assert "refined (Faster R-CNN) against CAM-only, calibrated (paired, same resamples)" in page
    assert summary["ci"]["refined"]["mAP@0.4"][0] <= summary["map"]["refined"] <= summary["ci"]["refined"]["mAP@0.4"][1]
