"""RSNA Pneumonia end to end offline: ``synth --format rsna`` in the released layout, drawn from RSNA's
released table, through prepare, train-classifier, localize and evaluate's RSNA score with its
bootstrap interval and paired comparison; and RSNA's 2nd-place pipeline there (a RetinaNet with
its global output, bf16, resumed; its NMS and box scale swept against the RSNA score; refine)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from conftest import DETECTOR, cxrcam, shared
from cxrcam.data.profiles import compare_rsna, load_profile, rsna_figures
from cxrcam.data.readers import read_rsna
from cxrcam.data.synth import synthesize
from cxrcam.evaluation.bootstrap import weights
from cxrcam.evaluation.rsna import image_scores, rsna_score
from cxrcam.train.detector import SCORE_GRID


def test_synthetic_rsna_is_the_released_layout_and_the_releases_figures(tmp_path):
    """stage_2_train_labels.csv (one row per box, an empty Target-0 row per negative image) and 8-bit
    <patientId>.dcm, read by the RSNA reader; at 800 images the positive share, boxes per positive
    image and median box area are the release's (as its table gives them)."""
    out = synthesize("rsna", tmp_path / "rsna", 800, seed=3, size=96, progress=False)
    labels = pd.read_csv(out / "stage_2_train_labels.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert labels.loc[labels["Target"] == 0, ["x", "width"]].isna().all().all()
    assert labels.groupby("patientId").size().max() <= 4
    ds = pydicom.dcmread(next((out / "stage_2_train_images").glob("*.dcm")))
    assert ds.BitsStored == 8 and ds.PhotometricInterpretation == "MONOCHROME2" and ds.Rows == ds.Columns == 96
    tables = read_rsna(out)
    assert len(tables.images) == labels["patientId"].nunique() == 800 and tables.images["path"].notna().all()
    assert len(tables.boxes) == int(labels["Target"].sum())
    real = rsna_figures(pd.read_csv(shared("tables", "stage_2_train_labels.csv.zip")))
    assert real == load_profile("rsna")["figures"]
    for row in compare_rsna(rsna_figures(labels, side=96), real):
        assert row.ok, row
    with pytest.raises(Exception, match="takes --profile rsna"):
        synthesize("rsna", tmp_path / "u", 5, profile="uniform", progress=False)


def test_the_rsna_score_resamples_as_the_plain_metric(tmp_path):
    """Under integer image weights, the bootstrap's RSNA score is the plain metric on the images
    repeated that many times."""
    truth = pd.DataFrame({"image_id": ["a", "b"], "class_id": 0, "x_min": [0, 10], "y_min": [0, 10],
                          "x_max": [10, 30], "y_max": [10, 30]})
    dets = pd.DataFrame({"image_id": ["a", "b", "c"], "class_id": 0, "score": [0.9, 0.8, 0.5],
                         "x_min": [0, 12, 0], "y_min": [0, 10, 0], "x_max": [10, 30, 5], "y_max": [10, 30, 5]})
    ids = ["a", "b", "c", "d"]  # c: a false positive on a negative image (0); d: nothing at all (skipped)
    scores = image_scores(truth, dets, ids)
    assert np.isnan(scores[3]) and scores[2] == 0 and scores[0] == 1
    from cxrcam.evaluation.bootstrap import weighted_share

    w = weights(len(ids), 5, seed=1)
    for row, value in zip(w, weighted_share(scores, np.arange(4), w)):
        repeated = [i for i, k in zip(ids, row) for _ in range(int(k))]
        truth_r = pd.concat([truth[truth["image_id"] == i].assign(image_id=f"{i}{n}")
                             for n, i in enumerate(repeated)] or [truth.iloc[:0]])
        dets_r = pd.concat([dets[dets["image_id"] == i].assign(image_id=f"{i}{n}") for n, i in enumerate(repeated)])
        expected, _ = rsna_score(truth_r, dets_r, [f"{i}{n}" for n, i in enumerate(repeated)])
        assert value == pytest.approx(expected, nan_ok=True)


FAST = ["--config", "tiny", "train.workers=0", "cam.workers=0", "model.output_stride=32"]


@pytest.fixture(scope="module")
def rsna_run(tmp_path_factory) -> tuple:
    """synth rsna -> prepare -> train-classifier, once for this module: (cache, classifier run)."""
    tmp_path = tmp_path_factory.mktemp("rsna")
    data, cache = tmp_path / "data", tmp_path / "cache"
    for args in (["synth", "--format", "rsna", "--out", str(data), "--n-images", "80", "--size", "96", "--seed", "2"],
                 ["prepare", "--dataset", "rsna", "--root", str(data), "--out", str(cache), "--size", "64", *FAST],
                 ["train-classifier", "--data", str(cache), "--out", str(tmp_path / "run"), "train.epochs=1", *FAST]):
        result = cxrcam(*args)
        assert result.returncode == 0, result.stderr
    return cache, tmp_path / "run"


def test_the_pipeline_on_rsna_layout_data(rsna_run, tmp_path):
    """synth rsna -> prepare -> train-classifier -> localize (RSNA's submission format) -> evaluate
    --format rsna --ci; two localize folders compared pair by pair on the RSNA score."""
    cache, run = rsna_run
    folders = []
    for t in (0.5, 0.8):
        folder = tmp_path / f"loc{t}"
        result = cxrcam("localize", "--checkpoint", str(run), "--data", str(cache), "--out", str(folder),
                        "--threshold", str(t), "--no-images", "boxes.min_prob=0.2", *FAST)
        assert result.returncode == 0, result.stderr
        assert (folder / "submission.csv").read_text().startswith("patientId,PredictionString")
        folders.append(folder)
    result = cxrcam("evaluate", "--pred", str(folders[0]), "--gt", str(cache), "--out", str(tmp_path / "eval"),
                    "--format", "rsna", "--ci", "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    lo, hi = metrics["ci"]["RSNA score"]
    assert lo <= metrics["rsna_score"] <= hi and metrics["rsna_images_scored"] > 0
    result = cxrcam("evaluate", "--pred", str(folders[0]), "--pred", str(folders[1]), "--gt", str(cache),
                    "--out", str(tmp_path / "cmp"), "--format", "rsna", "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    pair = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["pairs"][0]["figures"]["RSNA score"]
    assert 0 <= pair["p"] <= 1 and pair["ci"][0] <= pair["difference"] <= pair["ci"][1]
    assert "RSNA score" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_rsnas_retinanet_trains_resumes_and_refines_on_rsna_data(rsna_run, tmp_path):
    """train-detector detector.arch=retinanet (global output, bf16 autocast) on RSNA-layout data:
    1 epoch, then --resume to 2 goes on from it; the NMS and box scale are chosen against the RSNA
    score; refine writes RSNA's submission format, which evaluate scores. (Exact resume of the
    shared training engine: tests/test_detector.py.)"""
    cache, run = rsna_run
    out = tmp_path / "retina"
    retina = [*FAST, *DETECTOR, "detector.arch=retinanet", "detector.global_head=true", f"detector.init={run}/best.pt",
              "detector.box_images=16"]  # 16 boxed training images: bf16 autocast is slow on a CPU
    for extra in (["detector.epochs=1"], ["detector.epochs=2", "--resume"]):
        result = cxrcam("train-detector", "--data", str(cache), "--out", str(out), *retina, *extra, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        if extra[-1] != "--resume":
            first = pd.read_csv(out / "metrics.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and metrics.iloc[:1].equals(first)  # epoch 1 kept, epoch 2 added
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["precision"] == "bf16" and ckpt["anchors"][0] < ckpt["anchors"][-1]
    assert ckpt["postprocess"]["metric"] == "RSNA score"
    two_class = ckpt["postprocess"]["filter"]  # chosen for its boxes with detector.init's p_normal
    assert two_class["metric"] == "RSNA score" and two_class["high"] == 1.0 and 0 <= two_class["low"] < 1
    result = cxrcam("refine", "--classifier", str(run), "--detector", str(out), "--data", str(cache),
                    "--out", str(tmp_path / "refine"), "--no-images", "refine.proposals=rpn", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "refine" / "localize.json").read_text())
    used = written["filter"]  # boxes.filter_* auto
    assert (used["low"], used["high"]) == (two_class["low"], two_class["high"])
    assert written["refine"]["min_score"] == ckpt["postprocess"]["min_score"] in SCORE_GRID  # refine.min_score auto
    def scores(name: str, floor: float) -> list[float]:  # the detector's own scores (no gate) at refine.min_score
        result = cxrcam("refine", "--classifier", str(run), "--detector", str(out), "--data", str(cache), "--out",
                        str(tmp_path / name), "--no-images", "refine.proposals=rpn", "refine.gate=none",
                        f"refine.min_score={floor}", "refine.top_k=0", *FAST)
        assert result.returncode == 0, result.stderr[-3000:]
        strings = pd.read_csv(tmp_path / name / "submission.csv", keep_default_na=False)["PredictionString"]
        return sorted(float(v) for p in strings for v in p.split()[::5])  # "score x y w h" per box

    every = scores("open", 0)
    distinct = sorted(set(every))
    floor = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # between two scores: no ties
    assert scores("strict", floor) == pytest.approx([v for v in every if v >= floor], rel=1e-5) != every
    assert (tmp_path / "refine" / "submission.csv").read_text().startswith("patientId,PredictionString")
    result = cxrcam("evaluate", "--pred", str(tmp_path / "refine"), "--gt", str(cache), "--json",
                    str(tmp_path / "m.json"), "--format", "rsna")
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["rsna_score"] <= 1
    # WBF of RSNA submissions (the detector's and the CAM boxes); the 2-class filter needs p_normal they lack
    subs = [str(tmp_path / "refine" / n) for n in ("submission.csv", "cam_submission.csv")]
    result = cxrcam("ensemble", *subs, "--data", str(cache), "--out", str(tmp_path / "fused.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    fused = pd.read_csv(tmp_path / "fused.csv", keep_default_na=False)
    assert list(fused.columns) == ["patientId", "PredictionString"] and len(fused) == len(set(fused["patientId"]))
    result = cxrcam("ensemble", *subs, "--data", str(cache), "--out", str(tmp_path / "f2.csv"), "--filter-low", "0.3")
    assert result.returncode == 1 and "RSNA submissions do not carry" in result.stderr and "Traceback" not in result.stderr
