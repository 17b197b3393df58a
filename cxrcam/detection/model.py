"""``create_detector(backbone, ...)``: torchvision Faster R-CNN over a ResNet-50 FPN or any timm
backbone with a feature pyramid, optionally starting from a trained classifier's backbone.

The detector takes the same grey [0, 1] images as the classifier (replicated to 3 channels);
its transform normalises with the classifier's statistics and keeps the input size (no
resizing: ``min_size = max_size = size``), so boxes stay in the input frame.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrcam.errors import CxrcamError
from cxrcam.files import load_checkpoint
from cxrcam.models import IMAGENET_MEAN, IMAGENET_STD, channel_stats, grey_to_channels, load_classifier, stride_kwargs


class TimmFPN(nn.Module):
    """A timm backbone's last four stages + torchvision's FPN: the backbone FasterRCNN expects."""

    def __init__(self, name: str, output_stride: int = 32):
        super().__init__()
        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), pretrained=False,
                                      **stride_kwargs(name, output_stride))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), 256, extra_blocks=LastLevelMaxPool())
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _classifier_backbone(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple, tuple, str, int]:
    """(timm state dict without the head, mean, std, timm name, output stride) of a classifier checkpoint."""
    _, ckpt = load_classifier(path)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    return state, tuple(ckpt["mean"]), tuple(ckpt["std"]), ckpt["model_name"], ckpt.get("output_stride", 32)


def create_detector(backbone: str, num_classes: int, size: int, init: str | Path | None = None,
                    trainable_layers: int = 3, score_thresh: float = 0.01, detections_per_img: int = 100,
                    rois_per_image: int = 512, output_stride: int | None = None) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` findings (+ background) on ``size`` x ``size`` inputs.

    ``init``: a classifier checkpoint of the same backbone; its weights start the detector
    (timm's ResNet-50 and torchvision's share the layout), with frozen batch norm and the
    first ``5 - trainable_layers`` stages frozen. Without it the backbone starts at random.
    ``output_stride``: the backbone's dilation (default: the ``init`` classifier's, else 32);
    the model records it as ``model.output_stride``."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    state, stride = None, output_stride or 32
    if init:
        state, mean, std, name, init_stride = _classifier_backbone(init)
        stride = output_stride or init_stride
        if name != backbone:
            raise CxrcamError(f"detector.init: {init} is a {name} classifier; detector.backbone is {backbone}")
    if backbone == "resnet50":
        dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[stride]
        net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d if state else nn.BatchNorm2d,
                                          replace_stride_with_dilation=dilate)
        body = _resnet_fpn_extractor(net, trainable_layers if state else 5)  # what resnet_fpn_backbone does
        target = body.body
    else:
        if not timm.is_model(backbone):
            raise CxrcamError(f"unknown timm model {backbone!r} for detector.backbone")
        body = TimmFPN(backbone, stride)
        target = body.body
    if state is not None:
        missing, _ = target.load_state_dict({k: v for k, v in state.items() if not k.startswith(("fc.", "head"))},
                                            strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise CxrcamError(f"detector.init: {len(missing)} backbone weights missing in {init} (e.g. {missing[0]})")
    mean, std = channel_stats(mean, std, 3)
    model = FasterRCNN(body, num_classes=num_classes + 1, min_size=size, max_size=size, image_mean=list(mean),
                       image_std=list(std), box_score_thresh=score_thresh, box_detections_per_img=detections_per_img,
                       box_batch_size_per_image=rois_per_image)
    model.output_stride = stride
    return model


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild a detector from its checkpoint (``weights_only=True``)."""
    ckpt = load_checkpoint(path, device, kind="detector")
    cfg = ckpt["config"]["detector"]
    model = create_detector(ckpt["backbone"], len(ckpt["classes"]), ckpt["input_size"],
                            score_thresh=cfg["score_thresh"], detections_per_img=cfg["detections_per_img"],
                            output_stride=ckpt.get("output_stride", 32))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def to_detector_input(x: torch.Tensor) -> list[torch.Tensor]:
    """A grey batch B x 1 x H x W in [0, 1] -> the list of 3-channel images torchvision takes."""
    return list(grey_to_channels(x, 3))
