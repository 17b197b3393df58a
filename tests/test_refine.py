"""`cxrcam refine`: CAM boxes as RoI proposals, classifier gating, fusion, outputs, torchrun."""
from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models.detection import FasterRCNN

from conftest import cxrcam as run_cxrcam
from cxrcam.config import RefineConfig
from cxrcam.data.cache import open_cache
from cxrcam.data.dataset import image_tensor
from cxrcam.data.images import read_image
from cxrcam.detection.model import to_detector_input
from cxrcam.detection.refine import Refiner, merge
from cxrcam.data.submission import read_submission


cxrcam = partial(run_cxrcam, timeout=900)


def batch(cache_dir, n: int = 6) -> torch.Tensor:
    cache = open_cache(cache_dir)
    return torch.stack([image_tensor(read_image(cache.root / f).image) for f in cache.images["file"][:n]])


def by_class(dets) -> list[tuple]:
    boxes, classes, scores = dets
    order = np.lexsort((-scores, classes))
    return list(zip(classes[order], np.round(scores[order], 5), *np.round(boxes[order].T, 3)))


def test_without_cam_proposals_or_gate_it_is_the_plain_detector(vinbig_model, vinbig_detector):
    """proposals=rpn, gate=none: CamFasterRCNN's forward computes what torchvision's FasterRCNN does."""
    x = batch(vinbig_model[0])
    refiner = Refiner(vinbig_detector / "best.pt", RefineConfig(proposals="rpn", gate="none", top_k=0),
                      torch.device("cpu"))
    probs = np.full((len(x), 14), 0.5)
    ours = refiner(x, [np.zeros((0, 4))] * len(x), probs)
    with torch.no_grad():
        theirs = FasterRCNN.forward(refiner.model, to_detector_input(x))
    assert sum(len(d[0]) for d in ours) > 0
    for mine, ref in zip(ours, theirs):
        expected = (ref["boxes"].numpy().astype(np.float64), ref["labels"].numpy() - 1,
                    ref["scores"].numpy().astype(np.float64))
        assert by_class(mine) == by_class(expected)


def test_cam_boxes_join_the_proposals_and_scores_are_gated(vinbig_model, vinbig_detector):
    x = batch(vinbig_model[0], 2)
    cam_boxes = [np.array([[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 60.0, 30.0]]), np.array([[0.0, 0.0, 64.0, 64.0]])]
    seen = []
    gated = Refiner(vinbig_detector / "best.pt", RefineConfig(top_k=0), torch.device("cpu"))
    gated.model.roi_heads.score_thresh = 0.0  # a 2-epoch detector: keep every box, so there is something to gate
    gated.model.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.05, 1, (2, 14))
    with_gate = gated(x, cam_boxes, probs)
    for proposals, cam in zip(seen[0], cam_boxes):  # the CAM boxes are the last proposals of each image
        assert len(proposals) > len(cam)  # the RPN's come first
        assert torch.allclose(proposals[-len(cam):], torch.tensor(cam, dtype=torch.float32))
    plain = Refiner(vinbig_detector / "best.pt", RefineConfig(gate="none", top_k=0), torch.device("cpu"))
    plain.model.roi_heads.score_thresh = 0.0
    no_gate = plain(x, cam_boxes, probs)
    for (gb, gc, gs), (nb, nc, ns), p in zip(with_gate, no_gate, probs):
        expected = by_class((nb, nc, ns * p[nc]))
        assert by_class((gb, gc, gs)) == expected and len(expected) > 0  # same boxes, score x p(class)
    top1 = Refiner(vinbig_detector / "best.pt", RefineConfig(top_k=1), torch.device("cpu"))(x, cam_boxes, probs)
    for boxes, classes, _ in top1:
        assert len(classes) == len(set(classes.tolist()))  # one box per class


def test_cam_proposals_alone(vinbig_model, vinbig_detector):
    """proposals=cam: the RoI heads see the CAM boxes and nothing else; an image without CAM
    boxes gets no detection, one with them only boxes regressed from them."""
    x = batch(vinbig_model[0], 2)
    cam_boxes = [np.array([[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 60.0, 30.0]]), np.zeros((0, 4))]
    seen = []
    refiner = Refiner(vinbig_detector / "best.pt", RefineConfig(proposals="cam", gate="none", top_k=0),
                      torch.device("cpu"))
    refiner.model.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    refiner.model.roi_heads.score_thresh = 0.0
    found = refiner(x, cam_boxes, np.full((2, 14), 0.5))
    assert torch.equal(seen[0][0], torch.tensor(cam_boxes[0], dtype=torch.float32)) and len(seen[0][1]) == 0
    assert len(found[0][0]) > 0 and len(found[1][0]) == 0
    assert len(found[0][0]) <= 2 * 14  # at most one box per (proposal, class)


def test_wbf_merges_by_the_definition():
    """Weighted Boxes Fusion of one model: a cluster becomes its score-weighted mean box,
    scored with the mean score; other classes and distant boxes are kept."""
    boxes = np.array([[10, 10, 30, 30], [12, 11, 32, 31], [40, 40, 50, 50], [10, 10, 30, 30]], float)
    classes = np.array([3, 3, 3, 5])
    scores = np.array([0.9, 0.3, 0.5, 0.4])
    b, c, s = merge(boxes, classes, scores, RefineConfig(fusion="wbf", iou=0.5, top_k=0), size=64)
    rows = sorted(zip(c.tolist(), s.tolist(), b.tolist()))
    assert [r[0] for r in rows] == [3, 3, 5]
    fused = next(r for r in rows if r[0] == 3 and r[1] == pytest.approx(0.6))
    assert fused[2] == pytest.approx(((boxes[0] * 0.9 + boxes[1] * 0.3) / 1.2).tolist(), abs=1e-4)
    assert next(r for r in rows if r[0] == 3 and r[1] == pytest.approx(0.5))[2] == pytest.approx([40, 40, 50, 50])
    b, c, s = merge(boxes, classes, scores, RefineConfig(fusion="wbf", iou=0.5, top_k=1), size=64)
    assert sorted(c.tolist()) == [3, 5] and s[c == 3][0] == pytest.approx(0.6)


COMMON = ["boxes.min_prob=0.3", "cam.workers=0", "refine.fusion=wbf"]


@pytest.fixture(scope="module")
def refined(vinbig_model, vinbig_detector, tmp_path_factory):
    """`cxrcam refine` on the whole cache, with pictures: (its folder, its stdout)."""
    cache, classifier = vinbig_model
    out = tmp_path_factory.mktemp("refined") / "refine"
    result = cxrcam("refine", "--classifier", str(classifier), "--detector", str(vinbig_detector / "best.pt"),
                    "--data", str(cache), "--out", str(out), *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_refine_command_outputs(vinbig_model, refined, tmp_path):
    cache, classifier = vinbig_model
    folder, stdout = refined
    assert "refined 160 images" in stdout
    localized = cxrcam("localize", "--checkpoint", str(classifier), "--out", str(tmp_path / "loc"), "--no-images",
                       "--data", str(cache), *COMMON)
    assert localized.returncode == 0, localized.stderr[-3000:]
    # the CAM stage is localize itself; the refined boxes are the detector's
    assert (folder / "cam_submission.csv").read_text() == (tmp_path / "loc" / "submission.csv").read_text()
    sub = read_submission(folder / "submission.csv")
    cam = read_submission(tmp_path / "loc" / "submission.csv")
    assert sub["image_id"].nunique() == cam["image_id"].nunique() == 160
    findings = sub[sub["class_id"] < 14]
    assert len(findings) > 0 and not findings.equals(cam[cam["class_id"] < 14])
    assert findings.groupby(["image_id", "class_id"]).size().max() <= 5  # refine.top_k
    normal = sub[sub["class_id"] == 14].set_index("image_id")["score"]
    assert normal.equals(cam[cam["class_id"] == 14].set_index("image_id")["score"])  # p_normal from the classifier
    bb = pd.read_csv(folder / "bb_results.csv")
    assert bb["gt_x_min"].notna().sum() == len(open_cache(cache).boxes)
    assert len(list(folder.glob("pred_*.png"))) == 160
    settings = json.loads((folder / "localize.json").read_text())
    assert settings["detector"].endswith("best.pt") and settings["config"]["refine"]["gate"] == "product"
    evaluated = cxrcam("evaluate", "--pred", str(folder), "--gt", str(cache), "--no-control",
                       "--json", str(tmp_path / "m.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["map"] <= 1


def test_refine_user_errors(vinbig_model, tmp_path):
    cache, classifier = vinbig_model
    wrong = cxrcam("refine", "--classifier", str(classifier), "--detector", str(classifier), "--data", str(cache),
                   "--out", str(tmp_path / "x"))
    assert wrong.returncode != 0 and "not a cxrcam detector checkpoint" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_torchrun_refine_uneven_shards_and_batch_one(vinbig_model, vinbig_detector, uneven_folder, tmp_path):
    """refine at batch 1, and under torchrun with 3 images on 2 ranks at batch 2 (rank 1: a normal
    image that needs no class map and has no CAM proposal): the same detections."""
    folder, min_prob = uneven_folder
    args = ["refine", "--classifier", str(vinbig_model[1]), "--detector", str(vinbig_detector / "best.pt"),
            "--data", str(folder), "--no-images", "cam.workers=0", f"boxes.min_prob={min_prob}"]
    single = cxrcam(*args, "--out", str(tmp_path / "one"), "--batch-size", "1")
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "cxrcam", *args, "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    key = ["image_id", "class_id", "x_min", "y_min", "x_max", "y_max"]
    for name in ("submission.csv", "cam_submission.csv"):
        one, other = (read_submission(d / name).sort_values(key).reset_index(drop=True)
                      for d in (tmp_path / "one", tmp_path / "two"))
        assert sorted(one["image_id"].unique()) == ["a", "b", "c"] and len(one) > 3
        if name == "cam_submission.csv":  # b predicts no class: no CAM box (its detections are only gated)
            assert set(one.loc[one["class_id"] < 14, "image_id"]) == {"a", "c"}
        pd.testing.assert_frame_equal(one, other, check_exact=False, atol=1e-4)
