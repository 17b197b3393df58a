"""Class activation maps for every class of a batch.

``compute_cams(model, images)`` is the one-call API; ``create_cam(model, method)`` builds a
reusable engine (the factory picks the closed-form fast path when the model allows it, and
pytorch-grad-cam otherwise) whose call returns scaled maps and logits for chosen classes.
"""
from __future__ import annotations

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, CamOutput, Classes, probe, scale_cams
from cxrcam.cam.fast import FAST_METHODS, FastCAM
from cxrcam.cam.library import LIBRARY_METHODS, LibraryCAM


def create_cam(model: nn.Module, method: str = "gradcam++", target_layer: str | None = None,
               fast: bool = True, example: torch.Tensor | None = None) -> BaseCAM:
    """A CAM engine for ``model``: closed form for gradcam/gradcam++ on pooling + linear heads
    (unless ``fast`` is False or another ``target_layer`` is asked for), pytorch-grad-cam otherwise.
    ``example``: a batch the model takes, for the probe pass (default: the model's first
    convolution's channels)."""
    method = method.lower()
    info = probe(model, example)  # one probe forward pass, shared with the engine
    if fast and not target_layer and method in FAST_METHODS and info.linear_head:
        return FastCAM(model, method, info)
    return LibraryCAM(model, method, target_layer or None, info)


def compute_cams(model: nn.Module, images: torch.Tensor, method: str = "gradcam++",
                 classes: Classes = None) -> torch.Tensor:
    """Heat maps ``B x C x H x W`` in [0, 1] (min-max per map, input resolution, model's device)
    for ``classes`` (default: all) of every image in ``images`` (any batch the model takes:
    a cxrcam classifier's grey B x 1 x H x W in [0, 1], or a plain timm model's B x 3 x H x W)."""
    return create_cam(model, method, example=images)(images, classes).cams


__all__ = ["compute_cams", "create_cam", "BaseCAM", "CamOutput", "Classes", "FastCAM", "LibraryCAM",
           "FAST_METHODS", "LIBRARY_METHODS", "probe", "scale_cams"]
