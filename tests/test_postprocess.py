"""The competitions' post-processing: the 2-class filter and WBF ensembles of submissions."""
from __future__ import annotations

import json
from pathlib import Path
from functools import partial

import numpy as np
import pandas as pd
import pytest

from conftest import cxrcam as run_cxrcam
from cxrcam.data.cache import open_cache
from cxrcam.data.submission import read_submission, submission_table
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.outputs.postprocess import ensemble, two_class_filter
from cxrcam.schemas import VINBIG

cxrcam = partial(run_cxrcam, timeout=600)


def detections(ids) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "class_id": 3, "score": 0.5, "x_min": 10.0, "y_min": 10.0,
                         "x_max": 50.0, "y_max": 60.0})


def test_the_two_class_filter_by_its_definition():
    """p(abnormal) = 1 - p_normal: below low, "No finding" alone; above high, the detections alone;
    in between both. RSNA (no "No finding"): below low, no box."""
    normal = pd.Series({"quiet": 0.95, "unsure": 0.5, "sick": 0.01})
    kept, rows = two_class_filter(detections(normal.index), normal, 0.08, 0.95)
    assert set(kept["image_id"]) == {"unsure", "sick"} and set(rows.index) == {"quiet", "unsure"}
    assert rows["quiet"] == 0.95  # the row keeps its p_normal
    same, all_rows = two_class_filter(detections(normal.index), normal)  # the defaults change nothing
    assert len(same) == 3 and len(all_rows) == 3
    kept, rows = two_class_filter(detections(normal.index), None, 0.08, 0.95, p_normal=normal)
    assert rows is None and set(kept["image_id"]) == {"unsure", "sick"}
    with pytest.raises(CxrcamError, match="filter_low"):
        two_class_filter(detections([]), normal, 0.9, 0.1)


def test_the_filter_is_chosen_where_it_holds_on_both_halves():
    """choose_filter: confident-normal images with false boxes make a low threshold pay on each half;
    where it pays on one half only, or never, no filter. Scored with "No finding" counted."""
    from cxrcam.outputs.postprocess import choose_filter, filter_score

    sick = [f"s{k}" for k in range(8)]
    quiet = [f"q{k}" for k in range(8)]
    truth = pd.concat([detections(sick).drop(columns="score"),
                       pd.DataFrame({"image_id": quiet, "class_id": 14, "x_min": 0.0, "y_min": 0.0, "x_max": 1.0,
                                     "y_max": 1.0})], ignore_index=True)
    found = detections(sick + quiet).assign(score=[0.4] * 8 + [0.9] * 8)  # the false boxes score higher
    p_normal = pd.Series([0.3] * 8 + [0.97] * 8, index=sick + quiet)  # p(abnormal) 0.7 and 0.03
    half = lambda i: int(i[1:]) % 2  # noqa: E731
    chosen = choose_filter(found, p_normal, truth, VINBIG, 0.4, half)
    assert 0.03 < chosen["low"] <= 0.7 and chosen["value"] > chosen["off"]
    assert chosen["value"] == pytest.approx(filter_score(found, p_normal, truth, sick + quiet, VINBIG, 0.4,
                                                         chosen["low"], chosen["high"]))
    assert chosen["value"] == pytest.approx(1.0)  # the false boxes gone, and every "No finding" row ranked first
    # RSNA (no "No finding"): the low threshold drops the quiet images' boxes, which RSNA's score then skips
    from cxrcam.schemas import RSNA
    rsna = choose_filter(found.assign(class_id=0), p_normal, truth[truth["class_id"] == 3].assign(class_id=0), RSNA,
                         0.4, half)
    assert rsna["metric"] == "RSNA score" and rsna["low"] > 0.03 and rsna["high"] == 1.0
    assert rsna["value"] == pytest.approx(1.0) and rsna["off"] < 1
    # the same boxes on one half only (q1, q3, ... keep theirs; q0, q2, ... have none): no held-out gain there
    one_half = found[~found["image_id"].isin(quiet[::2])]
    none = choose_filter(one_half, p_normal, truth, VINBIG, 0.4, lambda i: int(int(i[1:]) % 2 == 1))
    assert (none["low"], none["high"]) == (0.0, 1.0) and "no held-out gain" in none["why"]


def random_validation(seed: int, schema):
    """Random detections, truth and p_normal on 30 images: overlapping boxes, tied scores, normal images."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(30)]
    classes = [0] if schema.no_finding_id is None else [0, 3, 5]

    def boxes(n):
        xy = rng.integers(0, 60, (n, 2)).astype(float)
        return xy, xy + rng.integers(10, 40, (n, 2))

    sick = ids[:18]
    tb = boxes(40)
    truth = pd.DataFrame({"image_id": rng.choice(sick, 40), "class_id": rng.choice(classes, 40),
                          "x_min": tb[0][:, 0], "y_min": tb[0][:, 1], "x_max": tb[1][:, 0], "y_max": tb[1][:, 1]})
    db = boxes(120)
    found = pd.DataFrame({"image_id": rng.choice(ids, 120), "class_id": rng.choice(classes, 120),
                          "score": rng.choice([0.2, 0.5, 0.9], 120),
                          "x_min": db[0][:, 0], "y_min": db[0][:, 1], "x_max": db[1][:, 0], "y_max": db[1][:, 1]})
    p_normal = pd.Series(rng.choice([0.05, 0.3, 0.6, 0.95], 30), index=ids)
    if schema.no_finding_id is not None:
        from cxrcam.evaluation.detection import with_no_finding
        truth = with_no_finding(truth, ids, schema.no_finding_id)
    return found, p_normal, truth, ids


@pytest.mark.parametrize("dataset", ["vinbig", "rsna"])
def test_filter_scores_equal_the_definition(dataset):
    """filter_scores (one matching, cumulative sums) gives filter_score's value (a VOC or RSNA pass
    per pair) for every pair of the grid, on every subset of images."""
    from cxrcam.outputs.postprocess import filter_grid, filter_score, filter_scores
    from cxrcam.schemas import RSNA

    schema = RSNA if dataset == "rsna" else VINBIG
    for seed in range(3):
        found, p_normal, truth, ids = random_validation(seed, schema)
        grid = filter_grid(1 - p_normal.to_numpy(), rsna=schema.no_finding_id is None) + [(0.5, 0.5)]
        masks = [np.ones(len(ids), bool), np.arange(len(ids)) % 3 == 0]
        fast = filter_scores(found, p_normal, truth, schema, 0.4, grid, masks)
        for k, mask in enumerate(masks):
            keep = [i for i, m in zip(ids, mask) if m]
            sub = [t[t["image_id"].isin(keep)] for t in (found, truth)]
            slow = [filter_score(sub[0], p_normal.loc[keep], sub[1], keep, schema, 0.4, lo, hi) for lo, hi in grid]
            np.testing.assert_allclose(fast[:, k], slow, atol=1e-12)
        assert np.ptp(fast[:, 0]) > 0  # the grid's pairs score differently: the comparison is not vacuous


def test_filter_range_reads_auto_from_the_calibration(tmp_path):
    from cxrcam.calibration import CalibrationFile, filter_range
    from cxrcam.config import BoxConfig

    chosen = CalibrationFile(tmp_path / "c.json", {}, {}, filter={"low": 0.08, "high": 0.95})
    assert filter_range(BoxConfig(), chosen) == (0.08, 0.95)  # "auto" by default
    assert filter_range(BoxConfig(), None) == (0.0, 1.0)  # no calibration: no filter
    assert filter_range(BoxConfig(filter_low=0.2), chosen) == (0.2, 0.95)  # a number wins over the calibration
    # refine: the detector's own choice (train-detector's, for its boxes) wins over the calibration's for CAM boxes
    assert filter_range(BoxConfig(), chosen, {"low": 0.5, "high": 1.0}) == (0.5, 1.0)
    assert filter_range(BoxConfig(filter_high=0.9), chosen, {"low": 0.5, "high": 1.0}) == (0.5, 0.9)
    with pytest.raises(CxrcamError, match="c.json"):
        filter_range(BoxConfig(filter_low=0.99), chosen)


def test_localize_applies_the_filter(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / "l"),
                    "--no-images", "cam.workers=0", "boxes.min_prob=0.3", "boxes.filter_low=0.5",
                    "boxes.filter_high=0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    sub = read_submission(tmp_path / "l" / "submission.csv")
    probs = pd.read_csv(tmp_path / "l" / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    abnormal = probs.max(axis=1)  # p(abnormal) = 1 - p_normal, p_normal = 1 - max p
    normal_rows = set(sub.loc[sub["class_id"] == 14, "image_id"])
    boxed = set(sub.loc[sub["class_id"] != 14, "image_id"])
    assert normal_rows == set(abnormal.index[abnormal <= 0.5]) and boxed <= set(abnormal.index[abnormal >= 0.5])
    assert boxed and not normal_rows & boxed
    bad = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / "x"),
                 "boxes.filter_low=0.9", "boxes.filter_high=0.1")
    assert bad.returncode != 0 and "must not exceed the high" in bad.stderr


def test_an_ensemble_is_wbf_of_the_submissions(vinbig_model, tmp_path):
    cache, _ = vinbig_model
    c = open_cache(cache)
    truth = c.boxes[["image_id", "class_id", *BOX_COLUMNS]].groupby(["image_id", "class_id"]).head(1)
    ids = list(c.images["image_id"])
    paths = []
    side = {"x_min": truth["x_max"] - truth["x_min"], "y_min": truth["y_max"] - truth["y_min"]}
    side |= {"x_max": side["x_min"], "y_max": side["y_min"]}
    for k, (shift, p_normal) in enumerate(((0.05, 0.2), (-0.05, 0.8))):  # each box moved by 5% of its side
        moved = truth.assign(score=0.9, **{col: truth[col] + shift * side[col] for col in BOX_COLUMNS})
        path = tmp_path / f"s{k}.csv"
        submission_table(ids, moved, pd.Series(p_normal, index=ids)).to_csv(path, index=False)
        paths.append(str(path))
    result = cxrcam("ensemble", *paths, "--data", str(cache), "--out", str(tmp_path / "fused.csv"),
                    "--weights", "3", "--weights", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    fused = read_submission(tmp_path / "fused.csv")
    assert set(fused["image_id"]) == set(ids)
    normal = fused[fused["class_id"] == 14]
    assert np.allclose(normal["score"], (3 * 0.2 + 1 * 0.8) / 4)  # the weighted mean of p_normal
    boxes = fused[fused["class_id"] != 14].merge(truth, on=["image_id", "class_id"], suffixes=("", "_truth"))
    assert len(boxes) == len(truth)  # one fused box per finding
    # WBF's box: the mean of the boxes weighted by score x weight, 0.9 x 3 and 0.9 x 1 (away from the edges,
    # where a shifted box is clipped to the image)
    sizes = c.images.set_index("image_id")[["width", "height"]]
    b = boxes.join(sizes, on="image_id")
    wb, hb = b["x_max_truth"] - b["x_min_truth"], b["y_max_truth"] - b["y_min_truth"]
    inside = ((b["x_min_truth"] > 0.06 * wb) & (b["y_min_truth"] > 0.06 * hb) & (b["x_max_truth"] + 0.06 * wb < b["width"])
              & (b["y_max_truth"] + 0.06 * hb < b["height"]))
    assert inside.sum() > 10
    for col, length in zip(BOX_COLUMNS, (wb, hb, wb, hb)):
        expected = (3 * 0.05 - 1 * 0.05) / 4 * length
        assert np.allclose((b[col] - b[f"{col}_truth"])[inside], expected[inside], atol=0.01)
    # WBF's conf_type: a box that one of two equal members found scores half its 0.9 under "avg", 0.9 under "max"
    empty = tmp_path / "empty.csv"
    submission_table(ids, truth.iloc[:0].assign(score=0.0), pd.Series(0.5, index=ids)).to_csv(empty, index=False)
    sizes = {i: (float(h), float(w)) for i, h, w in c.images[["image_id", "height", "width"]].itertuples(index=False)}
    for conf_type, score in (("avg", 0.45), ("max", 0.9)):
        found, _, _ = ensemble([Path(paths[0]), empty], sizes, VINBIG, conf_type=conf_type)
        assert len(found) == len(truth) and np.allclose(found["score"], score)
    # the 2-class filter calibrate chose (--calibration): p(abnormal) 0.65 is below its low 0.7, "No finding" alone
    (tmp_path / "cal.json").write_text(json.dumps({"schema": "vinbig", "classes": {}, "filter": {"low": 0.7, "high": 1}}))
    result = cxrcam("ensemble", *paths, "--data", str(cache), "--out", str(tmp_path / "quiet.csv"), "--weights", "3",
                    "--weights", "1", "--calibration", str(tmp_path / "cal.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    quiet = read_submission(tmp_path / "quiet.csv")
    assert set(quiet["class_id"]) == {14} and set(quiet["image_id"]) == set(ids)
    # another image set, or another dataset's format, is refused in one line
    pd.read_csv(paths[1]).head(5).to_csv(tmp_path / "few.csv", index=False)
    other = cxrcam("ensemble", paths[0], str(tmp_path / "few.csv"), "--data", str(cache), "--out",
                   str(tmp_path / "x.csv"))
    assert other.returncode != 0 and "the same image set" in other.stderr and "Traceback" not in other.stderr
    pd.DataFrame({"patientId": ids, "PredictionString": ""}).to_csv(tmp_path / "rsna.csv", index=False)
    rsna = cxrcam("ensemble", paths[0], str(tmp_path / "rsna.csv"), "--data", str(cache), "--out",
                  str(tmp_path / "x.csv"))
    assert rsna.returncode != 0 and "RSNA submission" in rsna.stderr
