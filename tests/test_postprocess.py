"""The competitions' post-processing: the 2-class filter and WBF ensembles of submissions."""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest

from conftest import cxrcam as run_cxrcam
from cxrcam.data.cache import open_cache
from cxrcam.data.submission import read_submission, submission_table
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.outputs.postprocess import two_class_filter

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
    # another image set, or another dataset's format, is refused in one line
    pd.read_csv(paths[1]).head(5).to_csv(tmp_path / "few.csv", index=False)
    other = cxrcam("ensemble", paths[0], str(tmp_path / "few.csv"), "--data", str(cache), "--out",
                   str(tmp_path / "x.csv"))
    assert other.returncode != 0 and "the same image set" in other.stderr and "Traceback" not in other.stderr
    pd.DataFrame({"patientId": ids, "PredictionString": ""}).to_csv(tmp_path / "rsna.csv", index=False)
    rsna = cxrcam("ensemble", paths[0], str(tmp_path / "rsna.csv"), "--data", str(cache), "--out",
                  str(tmp_path / "x.csv"))
    assert rsna.returncode != 0 and "RSNA submission" in rsna.stderr
