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
from torchvision import tv_tensors

from conftest import DETECTOR, tensorboard_scalars
from conftest import cxrcam as run_cxrcam
from cxrcam.config import load_config
from cxrcam.data.cache import open_cache
from cxrcam.detection import create_detector, load_detector, to_detector_input
from cxrcam.detection.pseudo import pseudo_boxes
from cxrcam.errors import CxrcamError
from cxrcam.files import save_checkpoint
from cxrcam.models import create_classifier
from cxrcam.runtime import dist
from cxrcam.train.classifier import predict
from cxrcam.train.detector import DetectionDataset, _supervision, box_transforms, jitter_boxes


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
    det = create_detector("resnet10t", 3, 96, channels=32, head_size=64).eval()
    assert det.backbone.out_channels == 32 and det.roi_heads.box_head.fc7.out_features == 64
    assert det.roi_heads.box_predictor.cls_score.out_features == 4  # 3 findings + background
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
    assert ckpt["precision"] == "bf16" and (metrics["precision"] == "bf16").all()  # CPU autocast, as on a GPU
    scalars = tensorboard_scalars(vinbig_detector / "tensorboard")
    for key in ("train_loss", "loss_classifier", "val_map"):
        steps, values = zip(*scalars[key])
        assert list(steps) == list(metrics["epoch"]) and values == pytest.approx(list(metrics[key]), rel=1e-5), key
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
    assert a["epoch"] == b["epoch"] == 2  # counted from 1, as the logs count
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-5), key
    straight, again = (pd.read_csv(r / "metrics.csv") for r in (vinbig_detector, run))
    assert np.allclose(straight["loss_classifier"], again["loss_classifier"], atol=1e-5)
    wrong = cxrcam("train-detector", "--data", str(vinbig_model[0]), "--out", str(run), *DETECTOR,
                   "detector.backbone=test_resnet", "--resume")
    assert wrong.returncode != 0 and "the config asks for test_resnet" in wrong.stderr


@pytest.mark.parametrize("arch,port,box_loss", [("fasterrcnn", 29541, "loss_box_reg"),
                                               ("retinanet", 29542, "bbox_regression")])
def test_torchrun_trains_with_two_processes(vinbig_model, tmp_path, arch, port, box_loss):
    """2 gloo processes: each takes half of every global batch, rank 0 alone validates and writes.
    detector.box_images=40 trains on a seeded sample of 40 training-fold images, recorded in the checkpoint.
    Faster R-CNN, and RetinaNet with its global output (a parameter DDP must see used)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["detector.global_head=true"] if arch == "retinanet" else []
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "cxrcam", "train-detector", "--data", str(vinbig_model[0]),
                          "--out", str(tmp_path / "ddp"), *DETECTOR, "detector.epochs=1", "detector.box_images=40",
                          f"detector.arch={arch}", *extra], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and np.isfinite(metrics[box_loss]).all()
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
    # the images NIH's box list covers keep their truth; the other labelled ones get pseudo-boxes
    boxed = set(open_cache(cache).boxes["image_id"])
    assert det["truth"] == ("truth + cam pseudo-boxes" if boxed else "cam pseudo-boxes") and det["schema"] == "nih"
    pseudo = pd.read_csv(tmp_path / "det" / "pseudo_boxes.csv", dtype={"image_id": str})
    assert len(pseudo) > 0 and not set(pseudo["image_id"]) & boxed


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


def _small_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_detector("resnet10t", 3, 64, rois_per_image=16)
    model.train()
    model.backbone.eval()  # batch-norm statistics per image, so a split batch computes the same features
    return model


def _targets(weight: float, n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[8.0 + i, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1 + i % 3]),
             "weight": torch.tensor(weight)} for i in range(n)]


def test_roi_heads_train_on_cam_proposals_and_pseudo_images_weigh_less():
    model = _small_detector()
    images = list(torch.rand(3, 3, 64, 64))
    cam = [torch.tensor([[5.0, 6.0, 33.0, 44.0]]), torch.zeros((0, 4)), torch.tensor([[1.0, 2.0, 20.0, 22.0]])]
    seen = []
    model.roi_heads.register_forward_pre_hook(lambda m, args: seen.append([p.clone() for p in args[1]]))
    model(images, _targets(1.0, 3), cam_boxes=cam)
    for proposals, boxes in zip(seen[0], cam):  # the RoI heads sample from the RPN's and the CAM boxes
        assert len(proposals) > len(boxes) and (len(boxes) == 0 or torch.equal(proposals[-len(boxes):], boxes))
    # two pseudo-box images at weight 0.25 and one truth image: the losses of each group, weighted by
    # images (every anchor and RoI sampled, so the split batch draws nothing at random)
    for sampler in (model.roi_heads.fg_bg_sampler, model.rpn.fg_bg_sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = 10**6, 0.5
    targets = _targets(0.25, 2) + _targets(1.0, 1)
    mixed = model(images, targets)
    pseudo, truth = model(images[:2], targets[:2]), model(images[2:], targets[2:])
    for key in mixed:
        assert torch.allclose(mixed[key], (0.25 * 2 * pseudo[key] + 1.0 * truth[key]) / 1.5, rtol=1e-4), key
    unweighted = (2 * pseudo["loss_box_reg"] + truth["loss_box_reg"]) / 3
    assert not torch.allclose(mixed["loss_box_reg"], unweighted, rtol=1e-2)


def test_jittered_proposals_stay_near_their_box():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 64.0, 64.0]])
    torch.manual_seed(0)
    out = jitter_boxes(boxes, 0.1, 64)
    assert torch.equal(out[:2], boxes) and 2 < len(out) <= 6  # the originals, then two copies each
    assert (out >= 0).all() and (out <= 64).all()
    first = out[2:][(out[2:, 2] < 40)]  # copies of the first box
    assert len(first) == 2 and (first - boxes[0]).abs().max() <= 0.1 * 40 + 1e-5
    assert not torch.equal(first[0], boxes[0])
    assert torch.equal(jitter_boxes(boxes, 0.0, 64), boxes)


def test_box_aware_augmentation_moves_the_boxes_with_the_image():
    """A bright rectangle and its box through the detector's v2 transforms: the box still
    bounds the rectangle."""
    from cxrcam.config import AugmentConfig

    transform = box_transforms(AugmentConfig(degrees=0, translate=0.1, scale=0.2, brightness=0.2, contrast=0.2))
    torch.manual_seed(0)
    moved = 0
    for _ in range(5):
        x = torch.zeros(1, 96, 96)
        x[:, 20:50, 30:70] = 1.0
        boxes = tv_tensors.BoundingBoxes(torch.tensor([[30.0, 20.0, 70.0, 50.0]]), format="XYXY", canvas_size=(96, 96))
        image, target = transform(tv_tensors.Image(x), {"boxes": boxes, "labels": torch.tensor([3])})
        ys, xs = torch.nonzero(image[0] > image[0].max() / 2, as_tuple=True)
        drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (target["boxes"][0] - drawn).abs().max() <= 2.0 and target["labels"].tolist() == [3]
        moved += not torch.equal(drawn, torch.tensor([30.0, 20.0, 70.0, 50.0]))
    assert moved >= 4


def test_mixed_supervision_uses_pseudo_boxes_only_on_unboxed_images(vinbig_model, tmp_path):
    """detector.box_images=40 + pseudo_from: the 40 sampled training images keep their truth, the
    other labelled ones train on CAM pseudo-boxes of their labelled classes, the rest are
    negatives (or left out: detector.negatives=false); "none" withholds every box, validation included;
    proposals come from one pass."""
    cache_dir, ckpt = vinbig_model
    cache = open_cache(cache_dir)
    config = load_config(overrides=["cam.workers=0", "cam.batch_size=1", "detector.box_images=40",
                                    f"detector.pseudo_from={ckpt}", f"detector.cam_proposals_from={ckpt}",
                                    "boxes.min_prob=0.3"])
    folds = cache.images["fold"].to_numpy()
    train_rows, val_rows = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    info = dist.setup()
    sup = _supervision(cache, config, info, train_rows, val_rows, tmp_path, resume=False, progress=False)
    ids = cache.images["image_id"].to_numpy()
    labels = cache.images[[f"y_{i}" for i in range(14)]].to_numpy() >= 0.5
    assert np.array_equal(sup.train_rows, train_rows)  # none dropped
    boxed = set(sup.boxes.loc[sup.boxes["rad_id"] != "cam", "image_id"])
    assert len(boxed & set(ids[train_rows])) <= 40 and set(ids[val_rows]) & set(cache.boxes["image_id"]) <= boxed
    assert not boxed & sup.pseudo
    for row in train_rows:
        image = ids[row]
        mine = sup.boxes[sup.boxes["image_id"] == image]
        if image in boxed:
            truth = cache.boxes[cache.boxes["image_id"] == image]
            assert np.allclose(np.sort(mine["cx_min"]), np.sort(truth["cx_min"]))
        elif labels[row].any():
            assert image in sup.pseudo and sorted(mine["class_id"]) == np.flatnonzero(labels[row]).tolist()
        else:
            assert mine.empty and image not in sup.pseudo
    assert sup.counts == {"truth": len(boxed & set(ids[train_rows])), "pseudo": len(sup.pseudo & set(ids[train_rows])),
                          "negative": int((~labels[train_rows].any(1)).sum())}
    assert len(sup.proposals) > 0 and set(sup.proposals) <= set(ids[train_rows])
    written = pd.read_csv(tmp_path / "cam_proposals.csv", dtype={"image_id": str})
    assert len(written) == sum(len(b) for b in sup.proposals.values())
    weights = DetectionDataset(cache, sup.train_rows, sup.boxes, sup.pseudo, 0.5).targets
    assert sorted({float(t["weight"]) for t in weights}) == [0.5, 1.0]

    # batch size 1: a normal image has no labelled class, so its batch needs no class map
    none = load_config(overrides=["cam.workers=0", "cam.batch_size=1", "detector.box_images=none",
                                  f"detector.pseudo_from={ckpt}"])
    sup = _supervision(cache, none, info, train_rows, val_rows, tmp_path / "none", resume=False, progress=False)
    assert (sup.boxes["rad_id"] == "cam").all() and sup.source == "cam pseudo-boxes"
    assert set(ids[val_rows][labels[val_rows].any(1)]) <= sup.pseudo  # validation has no truth boxes either
    # a strict operating point at batch size 1: most batches need no class map, few images get proposals
    strict = load_config(overrides=["cam.workers=0", "cam.batch_size=1", f"detector.cam_proposals_from={ckpt}",
                                    "boxes.min_prob=0.99"])
    sup = _supervision(cache, strict, info, train_rows, val_rows, tmp_path / "strict", resume=False, progress=False)
    confident = set(predict(ckpt, cache_dir, workers=0, progress=False).set_index("image_id").max(axis=1)
                    .loc[lambda p: p > 0.99].index)
    assert set(sup.proposals) <= confident and len(sup.train_rows) == len(train_rows)
    # detector.negatives=false: the abnormal training images alone, as the VinBigData winners' detectors trained
    abnormal = load_config(overrides=["detector.negatives=false"])
    sup = _supervision(cache, abnormal, info, train_rows, val_rows, tmp_path / "abn", resume=False, progress=False)
    assert np.array_equal(sup.train_rows, train_rows[labels[train_rows].any(1)]) and sup.counts["negative"] == 0
    assert len(DetectionDataset(cache, sup.train_rows, sup.boxes).images) == sup.counts["truth"] > 0
    with pytest.raises(CxrcamError, match="withholds every box: set detector.pseudo_from"):
        _supervision(cache, load_config(overrides=["detector.box_images=none"]), info, train_rows, val_rows,
                     tmp_path / "x", resume=False, progress=False)


def test_label_only_detector_with_cam_proposals_trains(vinbig_model, tmp_path):
    """The real command, in a process of its own: no box anywhere, pseudo-boxes at weight 0.5, CAM
    proposals in training; no library warning reaches the user (torch's "NumPy array is not writable"
    shows once a process, so only a fresh one can show it)."""
    cache, ckpt = vinbig_model
    result = cxrcam("train-detector", "--data", str(cache), "--out", str(tmp_path / "det"), *DETECTOR,
                    "detector.epochs=1", "detector.box_images=none", f"detector.pseudo_from={ckpt}",
                    f"detector.cam_proposals_from={ckpt}", "detector.pseudo_weight=0.5", "boxes.min_prob=0.3",
                    "cam.workers=0", process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not writable" not in result.stderr
    assert "pseudo" in result.stdout and "CAM proposals on" in result.stdout
    metrics = pd.read_csv(tmp_path / "det" / "metrics.csv")
    assert np.isfinite(metrics["loss_box_reg"]).all() and 0 <= metrics["val_map"].iloc[0] <= 1
    _, det = load_detector(tmp_path / "det" / "last.pt")
    assert det["truth"] == "cam pseudo-boxes"
