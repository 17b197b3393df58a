"""detector.arch=retinanet: torchvision's RetinaNet over a timm encoder, anchors sized from the data,
per-image loss weights, the optional global classification output, and the stages around it."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models.detection import RetinaNet

from conftest import DETECTOR, cxrcam
from cxrcam.detection import load_detector
from cxrcam.detection.model import CamRetinaNet, anchor_sizes, create_detector
from cxrcam.errors import CxrcamError


def test_anchor_sizes_span_the_boxes():
    sides = np.array([4, 6, 8, 10, 12, 20, 30, 40, 60, 80], float)
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], 1)
    sizes = anchor_sizes(boxes)
    assert len(sizes) == 5 and sizes[0] == pytest.approx(max(4.0, np.percentile(sides, 5)), abs=0.1)
    assert sizes[-1] == pytest.approx(np.percentile(sides, 95), abs=0.1)
    assert all(b / a == pytest.approx(sizes[1] / sizes[0], rel=0.02) for a, b in zip(sizes, sizes[1:]))  # geometric
    assert anchor_sizes(np.zeros((0, 4))) == (32.0, 64.0, 128.0, 256.0, 512.0)


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([3]), "weight": torch.tensor(1.0)},
            {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "weight": torch.tensor(1.0)}]


def test_retinanet_losses_are_torchvisions_and_pseudo_images_weigh_less():
    """At equal weights the losses are torchvision's RetinaNet's own; a weight-0.5 image counts half
    (each weight group averaged, then shared by weight x images); the global head adds its BCE."""
    torch.manual_seed(0)
    model = create_detector("resnet10t", 14, 64, arch="retinanet", anchors=(8, 12, 18, 27, 40), channels=32)
    assert isinstance(model, CamRetinaNet) and model.global_head is None
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    model.train()
    ours = model(images, _targets())
    theirs = RetinaNet.forward(model, images, _targets())
    assert ours.keys() == theirs.keys() == {"classification", "bbox_regression"}
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key
    half = _targets()
    half[1]["weight"] = torch.tensor(0.5)
    alone = [RetinaNet.forward(model, [img], [t]) for img, t in zip(images, _targets())]
    weighted = model(images, half)
    for key in ours:
        expected = (1 * alone[0][key] + 0.5 * alone[1][key]) / 1.5
        assert torch.allclose(weighted[key], expected, atol=1e-5), key
    with pytest.raises(CxrcamError, match="no proposal stage"):
        model.eval()(images, cam_boxes=[np.zeros((1, 4))] * 2)


def test_the_global_output_multiplies_the_box_scores():
    torch.manual_seed(0)
    model = create_detector("resnet10t", 14, 64, arch="retinanet", channels=32, global_head=True,
                            score_thresh=0.0).eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        model.global_head.bias.fill_(20.0)  # p = 1: the detections as without it
        sure = model(images)[0]
        model.global_head.bias.fill_(0.0)
        model.global_head.weight.zero_()  # p = 0.5 for every class
        halved = model(images)[0]
    assert len(sure["scores"]) > 0 and torch.allclose(halved["scores"], sure["scores"] * 0.5, atol=1e-6)
    model.train()
    losses = model(images, _targets()[:1])
    assert "global_classification" in losses and losses["global_classification"] > 0


def test_retinanet_trains_refines_and_says_what_refine_does(vinbig_model, tmp_path):
    """train-detector with detector.arch=retinanet (global head on): anchors from the cache's boxes
    in the checkpoint, a validation mAP; refine gates its detections and says CAM boxes cannot be
    its proposals; refine.proposals=cam and CAM training proposals are refused in one line."""
    cache, ckpt = vinbig_model
    out = tmp_path / "ret"
    arch = ["detector.arch=retinanet", "detector.global_head=true"]
    result = cxrcam("train-detector", "--data", str(cache), "--out", str(out), *DETECTOR, *arch, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["val_map"].between(0, 1).all() and {"classification", "global_classification"} <= set(metrics)
    model, saved = load_detector(out / "best.pt")
    assert isinstance(model, CamRetinaNet) and model.global_head is not None
    boxes = pd.read_csv(cache / "boxes.csv")
    assert len(saved["anchors"]) == 5 and saved["anchors"][0] < saved["anchors"][-1] <= 64
    refine = tmp_path / "refine"
    result = cxrcam("refine", "--classifier", str(ckpt), "--detector", str(out), "--data", str(cache),
                    "--out", str(refine), "--no-images", "cam.workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is a RetinaNet: CAM boxes cannot be its proposals" in result.stderr
    assert json.loads((refine / "localize.json").read_text())["detector"] == str(out)
    result = cxrcam("refine", "--classifier", str(ckpt), "--detector", str(out), "--data", str(cache),
                    "--out", str(tmp_path / "r2"), "--no-images", "cam.workers=0", "refine.proposals=cam")
    assert result.returncode == 1 and "has no proposal stage" in result.stderr and "Traceback" not in result.stderr
    result = cxrcam("train-detector", "--data", str(cache), "--out", str(tmp_path / "x"), *DETECTOR, *arch,
                    f"detector.cam_proposals_from={ckpt}")
    assert result.returncode == 1 and "needs detector.arch=fasterrcnn" in result.stderr
    assert len(boxes) > 0
