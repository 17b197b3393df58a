"""``create_detector(backbone, ...)``: torchvision Faster R-CNN (or RetinaNet, ``arch``) over a
ResNet-50 FPN or any timm backbone with a feature pyramid, optionally starting from a trained
classifier's backbone.

:class:`CamFasterRCNN` is torchvision's ``FasterRCNN`` with two additions to ``forward``: CAM
boxes join the RPN's proposals (or replace them, ``rpn=False``), in training as at inference,
so the RoI heads learn to classify and regress CAM-shaped boxes; and a per-image loss weight
(``target["weight"]``), so CAM pseudo-boxes can count less than truth boxes.

:class:`CamRetinaNet` is torchvision's ``RetinaNet`` (the single-shot detector of RSNA Pneumonia's
2nd place) with the same per-image loss weights, anchors sized from the data's boxes
(:func:`anchor_sizes`), and optionally a global classification output whose probability
multiplies each box's score, as that pipeline had. Its sigmoid head has no background class;
it is built with one more class than the findings so that labels stay ``class + 1`` as Faster
R-CNN's are (the unused class 0 only ever learns "absent"). It has no proposal stage, so CAM
boxes cannot be its proposals.

The detector takes the same grey [0, 1] images as the classifier (replicated to 3 channels);
its transform normalises with the classifier's statistics and keeps the input size (no
resizing: ``min_size = max_size = size``), so boxes stay in the input frame.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrcam.errors import CxrcamError
from cxrcam.files import checkpoint_contents, load_checkpoint
from cxrcam.models import IMAGENET_MEAN, IMAGENET_STD, channel_stats, grey_to_channels, stride_kwargs


class TimmFPN(nn.Module):
    """A timm backbone's last four stages + torchvision's FPN: the backbone FasterRCNN expects."""

    def __init__(self, name: str, output_stride: int = 32, channels: int = 256):
        super().__init__()
        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), pretrained=False,
                                      **stride_kwargs(name, output_stride))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class CamFasterRCNN(FasterRCNN):
    """FasterRCNN whose RoI heads also see each image's CAM boxes (see the module docstring)."""

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                cam_boxes: Sequence[torch.Tensor | np.ndarray] | None = None, rpn: bool = True):
        """torchvision's forward (losses in training, detections in eval) with ``cam_boxes``: per
        image, N x 4 xyxy boxes in input pixels added to the proposals; ``rpn=False`` (eval only)
        makes them the only proposals. Without either it computes exactly what FasterRCNN does."""
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        extra = None
        if cam_boxes is not None:
            ref = batch.tensors
            extra = [torch.as_tensor(b, dtype=ref.dtype, device=ref.device).reshape(-1, 4)
                     * torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0], dtype=ref.dtype, device=ref.device)
                     for b, (h0, w0), (h1, w1) in zip(cam_boxes, original_sizes, batch.image_sizes)]
        if not self.training:
            proposals = self.rpn(batch, features)[0] if rpn else [batch.tensors.new_zeros((0, 4)) for _ in images]
            if extra is not None:
                proposals = [torch.cat([p, e]) for p, e in zip(proposals, extra)]
            found, _ = self.roi_heads(features, proposals, batch.image_sizes)
            return self.transform.postprocess(found, batch.image_sizes, original_sizes)
        # training: the images of each loss weight go through the RPN and RoI heads together
        weights = [float(t.get("weight", 1.0)) for t in targets]
        total = sum(weights)
        losses: dict[str, torch.Tensor] = {}
        for w in sorted(set(weights)):
            idx = [i for i, v in enumerate(weights) if v == w]
            sub = ImageList(batch.tensors[idx], [batch.image_sizes[i] for i in idx])
            feats = OrderedDict((k, v[idx]) for k, v in features.items())
            sub_targets = [targets[i] for i in idx]
            proposals, rpn_losses = self.rpn(sub, feats, sub_targets)
            if extra is not None:
                proposals = [torch.cat([p, extra[i].detach()]) for p, i in zip(proposals, idx)]
            _, roi_losses = self.roi_heads(feats, proposals, sub.image_sizes, sub_targets)
            share = w * len(idx) / total
            for key, value in {**roi_losses, **rpn_losses}.items():
                losses[key] = losses.get(key, 0) + share * value
        return losses


ARCHS = ("fasterrcnn", "retinanet")
LEVELS = 5  # pyramid levels of both backbones: four stages and a pooled one


def anchor_sizes(boxes: np.ndarray, levels: int = LEVELS) -> tuple[float, ...]:
    """One anchor size per pyramid level, from the training boxes (xyxy, input pixels): geometric
    from the 5th to the 95th percentile of their sides (sqrt of the area), at least 4 px, so the
    smallest findings get anchors (torchvision's 32-512 px defaults miss boxes under ~23 px)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    sides = sides[sides > 0]
    if not len(sides):
        return (32.0, 64.0, 128.0, 256.0, 512.0)[:levels]
    lo = max(4.0, float(np.percentile(sides, 5)))
    hi = max(2 * lo, float(np.percentile(sides, 95)))
    return tuple(round(lo * (hi / lo) ** (k / (levels - 1)), 1) for k in range(levels))


class CamRetinaNet(RetinaNet):
    """RetinaNet with per-image loss weights and an optional global classification output (see the
    module docstring). ``cam_boxes`` is refused: a single-shot detector has no proposals to add to."""

    def __init__(self, backbone: nn.Module, num_classes: int, global_head: bool = False, **kwargs: Any):
        super().__init__(backbone, num_classes, **kwargs)
        self.global_head = nn.Linear(backbone.out_channels, num_classes) if global_head else None

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                cam_boxes: Sequence[torch.Tensor | np.ndarray] | None = None, rpn: bool = True):
        if cam_boxes is not None or not rpn:
            raise CxrcamError("a RetinaNet has no proposal stage: CAM boxes cannot be its proposals "
                              "(refine.proposals=rpn, no detector.cam_proposals_from)")
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head = self.head(features)
        anchors = self.anchor_generator(batch, features)
        image_logits = self.global_head(features[-1].mean((2, 3))) if self.global_head is not None else None
        if self.training:
            weights = torch.tensor([float(t.get("weight", 1.0)) for t in targets], device=batch.tensors.device)
            total = weights.sum()
            losses: dict[str, torch.Tensor] = {}
            for w in torch.unique(weights).tolist():  # each loss weight's images together, as CamFasterRCNN
                idx = torch.nonzero(weights == w).flatten().tolist()
                part = self.compute_loss([targets[i] for i in idx], {k: v[idx] for k, v in head.items()},
                                         [anchors[i] for i in idx])
                for key, value in part.items():
                    losses[key] = losses.get(key, 0) + w * len(idx) / total * value
            if image_logits is not None:
                labels = torch.zeros_like(image_logits)
                for i, t in enumerate(targets):
                    labels[i, t["labels"].long()] = 1
                per_image = nn.functional.binary_cross_entropy_with_logits(image_logits, labels, reduction="none")
                losses["global_classification"] = (per_image.mean(1) * weights).sum() / total
            return losses
        per_level = [f.shape[2] * f.shape[3] for f in features]
        per_anchor = head["cls_logits"].shape[1] // sum(per_level)
        split = [n * per_anchor for n in per_level]
        found = self.postprocess_detections({k: list(v.split(split, dim=1)) for k, v in head.items()},
                                            [list(a.split(split)) for a in anchors], batch.image_sizes)
        if image_logits is not None:
            for d, p in zip(found, torch.sigmoid(image_logits)):
                d["scores"] = d["scores"] * p[d["labels"]]
        return self.transform.postprocess(found, batch.image_sizes, original_sizes)


def check_init(init: str | Path, backbone: str) -> dict:
    """The classifier checkpoint ``detector.init``, refused where it is not a ``backbone`` classifier
    (checked before any work: ``train-detector`` calls it first)."""
    ckpt = load_checkpoint(init, "cpu", kind="classifier")
    if ckpt["model_name"] != backbone:
        raise CxrcamError(f"detector.init: {init} is a {ckpt['model_name']} classifier; detector.backbone is {backbone}: "
                          f"set detector.backbone={ckpt['model_name']}")
    return ckpt


def _classifier_backbone(path: str | Path, backbone: str) -> tuple[dict[str, torch.Tensor], tuple, tuple, int]:
    """(timm state dict without the head, mean, std, output stride) of a ``backbone`` classifier checkpoint."""
    ckpt = check_init(path, backbone)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    return state, tuple(ckpt["mean"]), tuple(ckpt["std"]), ckpt.get("output_stride", 32)


def create_detector(backbone: str, num_classes: int, size: int, init: str | Path | None = None,
                    trainable_layers: int = 3, score_thresh: float = 0.01, detections_per_img: int = 100,
                    rois_per_image: int = 512, output_stride: int | None = None, channels: int = 256,
                    head_size: int = 1024, arch: str = "fasterrcnn", anchors: Sequence[float] | None = None,
                    global_head: bool = False, retinanet_head: str = "v2") -> CamFasterRCNN | CamRetinaNet:
    """Faster R-CNN (``arch="retinanet"``: RetinaNet) for ``num_classes`` findings (+ background) on
    ``size`` x ``size`` inputs. RetinaNet: ``anchors``, one size per pyramid level
    (:func:`anchor_sizes`; default torchvision's 32-512), three scales and aspect ratios 0.5, 1, 2
    each; ``global_head`` adds the global classification output; ``retinanet_head`` "v2" is
    torchvision's v2 recipe (group norm in the head, GIoU box loss), which learns several times
    faster here than "v1", the original head with an L1 box loss (docs/BENCHMARKS.md, issue 37).

    ``init``: a classifier checkpoint of the same backbone; its weights start the detector
    (timm's ResNet-50 and torchvision's share the layout), with frozen batch norm and the
    first ``5 - trainable_layers`` stages frozen. Without it the backbone starts at random.
    ``output_stride``: the backbone's dilation (default: the ``init`` classifier's, else 32);
    the model records it as ``model.output_stride``. ``channels`` (FPN width, timm backbones) and
    ``head_size`` (the box head's MLP) default to torchvision's 256 and 1024; smaller ones make
    a CPU detector several times faster."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    state, stride = None, output_stride or 32
    if init:
        state, mean, std, init_stride = _classifier_backbone(init, backbone)
        stride = output_stride or init_stride
    if backbone == "resnet50":
        dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[stride]
        net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d if state else nn.BatchNorm2d,
                                          replace_stride_with_dilation=dilate)
        body = _resnet_fpn_extractor(net, trainable_layers if state else 5)  # what resnet_fpn_backbone does
        target = body.body
    else:
        if not timm.is_model(backbone):
            raise CxrcamError(f"unknown timm model {backbone!r} for detector.backbone")
        body = TimmFPN(backbone, stride, channels)
        target = body.body
    if state is not None:
        missing, _ = target.load_state_dict({k: v for k, v in state.items() if not k.startswith(("fc.", "head"))},
                                            strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise CxrcamError(f"detector.init: {len(missing)} backbone weights missing in {init} (e.g. {missing[0]})")
    mean, std = channel_stats(mean, std, 3)
    if arch not in ARCHS:
        raise CxrcamError(f"detector.arch: {arch!r} is not one of {', '.join(ARCHS)}")
    if arch == "retinanet":
        sizes = tuple(anchors or (32.0, 64.0, 128.0, 256.0, 512.0))
        generator = AnchorGenerator(tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in sizes),
                                    ((0.5, 1.0, 2.0),) * len(sizes))
        norm = None
        if retinanet_head == "v2":  # torchvision's retinanet_resnet50_fpn_v2: group norm in the head, GIoU box loss
            norm = functools.partial(nn.GroupNorm, math.gcd(body.out_channels, 32 if body.out_channels >= 256 else 16))
        model = CamRetinaNet(body, num_classes + 1, global_head, min_size=size, max_size=size,
                             image_mean=list(mean), image_std=list(std), anchor_generator=generator,
                             head=RetinaNetHead(body.out_channels, generator.num_anchors_per_location()[0],
                                                num_classes + 1, norm_layer=norm),
                             score_thresh=score_thresh, detections_per_img=detections_per_img)
        if retinanet_head == "v2":
            model.head.regression_head._loss_type = "giou"  # as torchvision's v2 builder sets it
        model.output_stride = stride
        return model
    resolution = 7  # torchvision's RoI-align output side
    model = CamFasterRCNN(body, min_size=size, max_size=size, image_mean=list(mean), image_std=list(std),
                          box_score_thresh=score_thresh, box_detections_per_img=detections_per_img,
                          box_batch_size_per_image=rois_per_image,
                          box_head=TwoMLPHead(body.out_channels * resolution ** 2, head_size),
                          box_predictor=FastRCNNPredictor(head_size, num_classes + 1))
    model.output_stride = stride
    return model


def load_detector(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[CamFasterRCNN | CamRetinaNet, dict[str, Any]]:
    """Rebuild a detector from its checkpoint (``weights_only=True``)."""
    ckpt = load_checkpoint(path, device, kind="detector")
    with checkpoint_contents(path):
        cfg = ckpt["config"]["detector"]
        model = create_detector(ckpt["backbone"], len(ckpt["classes"]), ckpt["input_size"],
                                score_thresh=cfg["score_thresh"], detections_per_img=cfg["detections_per_img"],
                                output_stride=ckpt.get("output_stride", 32), channels=cfg.get("channels", 256),
                                head_size=cfg.get("head_size", 1024), arch=cfg.get("arch", "fasterrcnn"),
                                anchors=ckpt.get("anchors"), global_head=cfg.get("global_head", False),
                                retinanet_head=cfg.get("retinanet_head", "v1"))  # checkpoints before v2: v1
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def to_detector_input(x: torch.Tensor) -> list[torch.Tensor]:
    """A grey batch B x 1 x H x W in [0, 1] -> the list of 3-channel images torchvision takes."""
    return list(grey_to_channels(x, 3))
