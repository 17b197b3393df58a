"""`cxrcam train-detector`: Faster R-CNN factory, classifier initialisation, training on truth
boxes and on CAM pseudo-boxes."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

from cxrcam.config import load_config
from cxrcam.data.cache import open_cache
from cxrcam.detection import create_detector, load_detector, to_detector_input
from cxrcam.detection.pseudo import pseudo_boxes
from cxrcam.errors import CxrcamError
from cxrcam.io import save_checkpoint
from cxrcam.models import create_classifier


def test_resnet50_detector_starts_from_the_classifier(tmp_path):
    """timm's and torchvision's ResNet-50 share the layout: every backbone weight carries over."""
    torch.manual_seed(0)
    clf = create_classifier("resnet50", 14)
    save_checkpoint(tmp_path / "clf.pt", {
        "model_name": "resnet50", "in_chans": 3, "classes": [str(i) for i in range(14)], "schema": "vinbig",
        "input_size": 64, "mean": clf.mean.flatten().tolist(), "std": clf.std.flatten().tolist(), "config": {},
        "model": clf.state_dict()})
    det = create_detector("resnet50", 14, 64, init=tmp_path / "clf.pt")
    body = det.backbone.body
    for name, value in clf.backbone.state_dict().items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body.state_dict()[name], value), name
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad  # 3 trainable stages
    assert det.transform.image_mean == pytest.approx(clf.mean.flatten().tolist())
    with pytest.raises(CxrcamError, match="is a resnet50 classifier"):
        create_detector("resnet10t", 14, 64, init=tmp_path / "clf.pt")


def test_timm_backbone_detects_in_the_input_frame():
    det = create_detector("resnet10t", 3, 96).eval()
    with torch.no_grad():
        out = det(to_detector_input(torch.rand(2, 1, 96, 96)))
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    assert (out[0]["boxes"] <= 96).all() and (out[0]["labels"] >= 1).all() and (out[0]["labels"] <= 3).all()


def detector_config(*extra):
    return ["detector.backbone=resnet10t", "detector.epochs=2", "detector.batch_size=8", "detector.workers=0",
            "detector.warmup_iters=5", "detector.rois_per_image=64", *extra]


def test_train_on_truth_boxes(vinbig_model, tmp_path):
    cache, _ = vinbig_model
    result = subprocess.run([sys.executable, "-m", "cxrcam", "train-detector", "--data", str(cache), "--out",
                             str(tmp_path / "det"), *detector_config()], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "det" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and metrics["val_map"].between(0, 1).all()
    assert metrics["loss_classifier"].iloc[1] < metrics["loss_classifier"].iloc[0]  # it learns
    model, ckpt = load_detector(tmp_path / "det" / "last.pt")
    assert ckpt["truth"] == "truth" and ckpt["input_size"] == 64 and len(ckpt["classes"]) == 14
    with pytest.raises(CxrcamError, match="not a cxrcam detector checkpoint"):
        load_detector(vinbig_model[1])


def test_cam_pseudo_boxes_cover_every_labelled_class(nih_model):
    cache_dir, ckpt = nih_model
    cache = open_cache(cache_dir)
    config = load_config(overrides=["cam.workers=0"])
    boxes = pseudo_boxes(ckpt, cache, config, torch.device("cpu"))
    labelled = cache.images.melt(id_vars="image_id", value_vars=[f"y_{i}" for i in range(14)])
    labelled = labelled[labelled["value"] == 1]
    assert len(boxes) == len(labelled) > 0  # one box per (image, labelled class)
    assert ((boxes["cx_max"] - boxes["cx_min"]) >= 1).all() and (boxes["cx_max"] <= cache.size).all()
    merged = boxes.merge(cache.images[["image_id", "scale_x"]])
    assert (merged["x_min"] * merged["scale_x"] - merged["cx_min"]).abs().max() < 1e-6
