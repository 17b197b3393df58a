"""Heat map -> boxes, overlap measures, and the submission format."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou

from cxrcam.boxes import cam_peak, cam_to_boxes, cut_map, pairwise_iobb, pairwise_iou, resize_boxes, select_boxes
from cxrcam.config import BoxConfig
from cxrcam.errors import CxrcamError
from cxrcam.data.submission import normal_scores, read_submission, submission_table


def blob_map():
    """Two separate hot rectangles and one speck on a 100 x 80 (h x w) map."""
    cam = np.zeros((100, 80), np.float32)
    cam[10:30, 5:25] = 0.9  # rows 10..29, cols 5..24
    cam[15:20, 10:15] = 1.0
    cam[60:90, 40:70] = 0.7
    cam[95, 2] = 1.0  # one pixel: below any sensible min_area
    return cam


def test_components_become_boxes_on_continuous_coordinates():
    cam = blob_map()
    boxes, scores = cam_to_boxes(cam, prob=0.5, config=BoxConfig(threshold=0.65, min_area=0.001, nms_iou=1, top_k=0))
    assert boxes.tolist() == [[5, 10, 25, 30], [40, 60, 70, 90]]  # pixel extents, x_max = last column + 1
    mean_first = cam[10:30, 5:25].mean()
    assert scores == pytest.approx([0.5 * mean_first, 0.5 * 0.7])
    # the threshold decides the components: at 0.8 only the first blob is left
    boxes, _ = cam_to_boxes(cam, 1.0, BoxConfig(threshold=0.8, min_area=0.001))
    assert boxes.tolist() == [[5, 10, 25, 30]]
    # min_area 0 keeps the one-pixel speck as a 1 x 1 box
    boxes, _ = cam_to_boxes(cam, 1.0, BoxConfig(threshold=0.65, min_area=0, top_k=0))
    assert [2, 95, 3, 96] in boxes.tolist()


def test_threshold_modes_against_their_definitions():
    """Otsu: the level of greatest between-class variance (written from Otsu 1979); percentile:
    keep the map's top 1 - t; peak: a weaker second region is cut at t x its own peak."""
    rng = np.random.default_rng(0)
    cam = np.clip(np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.1, 1000)]), 0, 1)
    cam = cam.reshape(50, 80).astype(np.float32)
    levels = np.round(cam * 255).ravel()
    best, best_var = 0, -1.0
    for k in range(255):
        low, high = levels[levels <= k], levels[levels > k]
        if len(low) and len(high):
            var = len(low) * len(high) * (low.mean() - high.mean()) ** 2
            if var > best_var + 1e-6:
                best, best_var = k, var
    assert np.array_equal(cut_map(cam, "otsu") >= 0.5, levels.reshape(cam.shape) > best)
    assert 0.2 < (cut_map(cam, "otsu") > 0).mean() < 0.3  # the brighter quarter
    for t in (0.5, 0.9):
        assert (cut_map(cam, "percentile") >= t).mean() == pytest.approx(1 - t, abs=1e-3)
        # the pixels above the t-quantile: the top (1 - t) x 4000 exactly
        assert np.array_equal(cut_map(cam, "percentile") >= t, cam > np.quantile(cam, t, method="inverted_cdf"))
    two = np.zeros((60, 60), np.float32)
    two[5:25, 5:25], two[10:20, 10:20] = 0.6, 1.0  # a strong finding, its core at 1
    two[35:55, 35:55], two[40:50, 40:50] = 0.25, 0.4  # a weak one, its core at 0.4
    fixed, _ = cam_to_boxes(two, 1.0, BoxConfig(threshold=0.7, nms_iou=1, top_k=0))
    peak, _ = cam_to_boxes(two, 1.0, BoxConfig(threshold=0.7, threshold_mode="peak", nms_iou=1, top_k=0))
    assert fixed.tolist() == [[10, 10, 20, 20]]
    assert sorted(peak.tolist()) == [[10, 10, 20, 20], [40, 40, 50, 50]]  # each core, by its own peak
    with pytest.raises(ValueError, match="unknown threshold mode"):
        cut_map(two, "mean")


def test_box_scale_about_the_centre_within_the_image():
    boxes = np.array([[10, 20, 30, 60], [0, 0, 10, 10]], np.float64)
    half = resize_boxes(boxes, 0.5, 100, 100)
    assert half.tolist() == [[15, 30, 25, 50], [2.5, 2.5, 7.5, 7.5]]
    grown = resize_boxes(boxes, 2.0, 40, 70)
    assert grown.tolist() == [[0, 0, 40, 70], [0, 0, 15, 15]]  # clipped to the image
    cam = blob_map()
    plain, _ = cam_to_boxes(cam, 1.0, BoxConfig(min_area=0.001, nms_iou=1, top_k=0))
    shrunk, _ = cam_to_boxes(cam, 1.0, BoxConfig(min_area=0.001, nms_iou=1, top_k=0, scale=0.875))
    assert shrunk == pytest.approx(resize_boxes(plain, 0.875, 80, 100))


def test_score_statistics_and_top_k():
    cam = blob_map()
    _, by_max = cam_to_boxes(cam, 0.5, BoxConfig(score="max", top_k=0))
    assert by_max == pytest.approx([0.5, 0.35])
    _, flat = cam_to_boxes(cam, 0.5, BoxConfig(score="none", top_k=0))
    assert flat == pytest.approx([0.5, 0.5])
    boxes, _ = cam_to_boxes(cam, 0.5, BoxConfig(top_k=1))
    assert boxes.tolist() == [[5, 10, 25, 30]]
    assert cam_to_boxes(np.zeros((8, 8)), 0.9)[0].shape == (0, 4)


def test_nms_drops_overlapping_lower_scores():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], float)
    kept, scores = select_boxes(boxes, np.array([0.5, 0.9, 0.4]), top_k=0, nms_iou=0.5)
    assert kept.tolist() == [[1, 1, 11, 11], [20, 20, 30, 30]] and scores.tolist() == [0.9, 0.4]
    kept, _ = select_boxes(boxes, np.array([0.5, 0.9, 0.4]), top_k=0, nms_iou=1.0)
    assert len(kept) == 3


def test_overlaps_against_torchvision_and_the_definition():
    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(0, 100, (20, 2, 2)), axis=1).transpose(0, 2, 1).reshape(20, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.uniform(0, 100, (15, 2, 2)), axis=1).transpose(0, 2, 1).reshape(15, 4)[:, [0, 2, 1, 3]]
    assert np.allclose(pairwise_iou(a, b), box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy())
    truth, pred = np.array([[0, 0, 10, 10]]), np.array([[5, 5, 10, 10], [5, 0, 25, 10]])
    assert pairwise_iou(truth, pred)[0].tolist() == [0.25, 50 / 250]
    assert pairwise_iobb(truth, pred)[0].tolist() == [1.0, 0.25]  # intersection / predicted area
    assert pairwise_iou(np.zeros((0, 4)), pred).shape == (0, 2)


def test_peak():
    cam = np.zeros((10, 20))
    cam[7, 3] = 1
    assert cam_peak(cam) == (3.5, 7.5)


def detections():
    return pd.DataFrame({"image_id": ["a", "a", "b"], "class_id": [3, 0, 10], "score": [0.25, 0.75, 0.5],
                         "x_min": [10.5, 0, 1], "y_min": [20, 0, 2], "x_max": [30.25, 5, 3], "y_max": [40, 6, 4]})


def test_submission_lists_every_image_once_with_no_finding(tmp_path):
    normal = pd.Series({"a": 0.1, "b": 0.6})
    table = submission_table(["b", "a", "c"], detections(), normal, no_finding_id=14)
    assert table["image_id"].tolist() == ["b", "a", "c"]
    assert table.set_index("image_id").at["c", "PredictionString"] == ""  # unread image: visible, empty
    assert table.set_index("image_id").at["a", "PredictionString"] == "0 0.75 0 0 5 6 3 0.25 10.5 20 30.25 40 14 0.1 0 0 1 1"
    path = tmp_path / "submission.csv"
    table.to_csv(path, index=False)
    back = read_submission(path, image_ids={"a", "b", "c"})
    assert len(back) == 5 and set(back.loc[back["class_id"] == 14, "score"]) == {0.1, 0.6}
    merged = back.merge(detections(), on=["image_id", "class_id"], suffixes=("", "_in"))
    for col in ["score", "x_min", "y_min", "x_max", "y_max"]:
        assert np.allclose(merged[col], merged[col + "_in"])
    assert normal_scores([[0.2, 0.5]], "max") == pytest.approx([0.5])
    assert normal_scores([[0.2, 0.5]], "product") == pytest.approx([0.4])


@pytest.mark.parametrize("text,message", [
    ("3 0.5 1 2 3", "not groups of 6"),
    ("3 0.5 1 2 x 4", "non-number"),
    ("3 0.5 10 2 5 4", "x_max < x_min"),
    ("15 0.5 1 2 3 4", "unknown class"),
    ("2.5 0.5 1 2 3 4", "unknown class"),
])
def test_malformed_prediction_strings_name_the_row(tmp_path, text, message):
    path = tmp_path / "s.csv"
    pd.DataFrame({"image_id": ["ok", "bad"], "PredictionString": ["1 0.9 0 0 2 2", text]}).to_csv(path, index=False)
    with pytest.raises(CxrcamError, match=f"row 3 \\(bad\\).*{message}"):
        read_submission(path)
    with pytest.warns(UserWarning, match=message):
        lenient = read_submission(path, lenient=True)
    assert lenient["image_id"].tolist() == ["ok"]


def test_an_image_listed_twice_is_refused_or_merged(tmp_path):
    path = tmp_path / "s.csv"
    pd.DataFrame({"image_id": ["a", "b", "a"], "PredictionString": ["1 0.9 0 0 2 2", "", "2 0.5 1 1 3 3"]}
                 ).to_csv(path, index=False)
    with pytest.raises(CxrcamError, match="rows 2, 4: image id 'a' is listed more than once"):
        read_submission(path)
    with pytest.warns(UserWarning, match="merged"):
        merged = read_submission(path, lenient=True)
    assert merged["image_id"].tolist() == ["a", "a"] and merged["class_id"].tolist() == [1, 2]


def test_unknown_image_id_and_missing_columns(tmp_path):
    path = tmp_path / "s.csv"
    pd.DataFrame({"image_id": ["zzz"], "PredictionString": ["14 1 0 0 1 1"]}).to_csv(path, index=False)
    with pytest.raises(CxrcamError, match="row 2 \\(zzz\\): image id not in the ground truth"):
        read_submission(path, image_ids={"a"})
    pd.DataFrame({"id": ["a"], "boxes": [""]}).to_csv(path, index=False)
    with pytest.raises(CxrcamError, match="expected columns image_id,PredictionString"):
        read_submission(path)
