"""`cxrcam train-detector`: Faster R-CNN factory, classifier initialisation, training on truth
boxes and on CAM pseudo-boxes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DETECTOR
from conftest import cxrcam as run_cxrcam
from cxrcam.config import load_config
from cxrcam.data.cache import open_cache
from cxrcam.detection import create_detector, load_detector, to_detector_input
from cxrcam.detection.pseudo import pseudo_boxes
from cxrcam.errors import CxrcamError
from cxrcam.files import save_checkpoint
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


cxrcam = partial(run_cxrcam, timeout=900)


def test_train_on_truth_boxes(vinbig_model, vinbig_detector):
    metrics = pd.read_csv(vinbig_detector / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and metrics["val_map"].between(0, 1).all()
    assert metrics["loss_classifier"].iloc[1] < metrics["loss_classifier"].iloc[0]  # it learns
    model, ckpt = load_detector(vinbig_detector / "last.pt")
    assert ckpt["truth"] == "truth" and ckpt["input_size"] == 64 and len(ckpt["classes"]) == 14
    with pytest.raises(CxrcamError, match="not a cxrcam detector checkpoint"):
        load_detector(vinbig_model[1])


def test_killed_mid_epoch_resumes_exactly(vinbig_model, vinbig_detector, tmp_path):
    """Kill a real run during epoch 2; --resume ends with the weights of the uninterrupted
    2-epoch run (the RPN/RoI samplers' random state is in last.pt)."""
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cxrcam", "train-detector", "--data", str(vinbig_model[0]), "--out", str(run),
           *DETECTOR]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.02)
    time.sleep(1.0)  # inside epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(pd.read_csv(run / "metrics.csv")) == 1, "the kill should land in epoch 2"
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(vinbig_detector / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-5), key
    straight, again = (pd.read_csv(r / "metrics.csv") for r in (vinbig_detector, run))
    assert np.allclose(straight["loss_classifier"], again["loss_classifier"], atol=1e-5)
    wrong = cxrcam("train-detector", "--data", str(vinbig_model[0]), "--out", str(run), *DETECTOR,
                   "detector.backbone=test_resnet", "--resume")
    assert wrong.returncode != 0 and "the config asks for test_resnet" in wrong.stderr


def test_torchrun_trains_with_two_processes(vinbig_model, tmp_path):
    """2 gloo processes: each takes half of every global batch, rank 0 alone validates and writes.
    detector.box_images=40 trains on a seeded sample of 40 training-fold images, recorded in the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "-m", "cxrcam", "train-detector", "--data", str(vinbig_model[0]),
                          "--out", str(tmp_path / "ddp"), *DETECTOR, "detector.epochs=1", "detector.box_images=40"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and np.isfinite(metrics["loss_box_reg"]).all()
    assert 0 <= metrics["val_map"].iloc[0] <= 1
    model, ckpt = load_detector(tmp_path / "ddp" / "best.pt")  # strict load: the unwrapped model was saved
    images = open_cache(vinbig_model[0]).images
    train_ids = set(images.loc[images["fold"] != 0, "image_id"])  # split.val_fold = 0
    assert len(set(ckpt["train_images"])) == 40 and set(ckpt["train_images"]) <= train_ids
    with torch.no_grad():
        found = model(to_detector_input(torch.rand(1, 1, 64, 64)))
    assert found[0]["boxes"].shape[-1] == 4


def test_train_on_cam_pseudo_boxes(nih_model, tmp_path):
    """Image labels only (NIH): detector.pseudo_from trains on the classifier's CAM boxes."""
    cache, ckpt = nih_model
    result = cxrcam("train-detector", "--data", str(cache), "--out", str(tmp_path / "det"), *DETECTOR,
                    f"detector.pseudo_from={ckpt}", "cam.workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "det" / "metrics.csv")
    assert metrics["loss_classifier"].iloc[1] < metrics["loss_classifier"].iloc[0]
    _, det = load_detector(tmp_path / "det" / "last.pt")
    assert det["truth"] == "cam pseudo-boxes" and det["schema"] == "nih"


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
