"""``create_cam(model, method, target_layer)``: one factory in front of the three CAM engines.

It picks, in this order:

* :class:`~cxrcam.cam.closed_form.ClosedFormCAM`: Grad-CAM, Grad-CAM++ or LayerCAM at the pooling's
  input of a pooling + linear head, in closed form from the forward pass alone;
* :class:`~cxrcam.cam.gradients.GradientCAM`: the same three methods at any layer(s), one forward
  and the gradients of every needed class in one backward that stops at the target layer;
* :class:`~cxrcam.cam.library.LibraryCAM`: any other pytorch-grad-cam method, one call per class.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Classes, parse_layers, probe, resolve_layer
from cxrcam.cam.closed_form import ClosedFormCAM
from cxrcam.cam.gradients import GradientCAM
from cxrcam.cam.library import LIBRARY_METHODS, LibraryCAM
from cxrcam.cam.methods import GRADIENT_METHODS
from cxrcam.errors import CxrcamError


def create_cam(model: nn.Module, method: str = "gradcam++", target_layer: str | Sequence[str] | None = None,
               fast: bool = True, example: torch.Tensor | None = None) -> BaseCAM:
    """A CAM engine for ``model``: the closed form at the pooling's input (unless ``fast`` is
    False), the gradient engine for gradcam/gradcam++/layercam at other layers (``target_layer``:
    a module name, or several joined by commas, fused), pytorch-grad-cam for other methods.
    ``example``: a batch the model takes, for the probe pass (default: the model's first
    convolution's channels)."""
    method = method.lower()
    if method not in LIBRARY_METHODS and method not in GRADIENT_METHODS:
        raise CxrcamError(f"unknown CAM method {method!r}; choose one of {', '.join(LIBRARY_METHODS)}")
    info = probe(model, example)  # one probe forward pass, shared with the engine
    layers = [resolve_layer(model, n) for n in parse_layers(target_layer)]
    at_pool = not layers or layers == [info.target_name]
    if fast and at_pool and method in GRADIENT_METHODS and info.linear_head:
        return ClosedFormCAM(model, method, info)
    if fast and method in GRADIENT_METHODS:
        return GradientCAM(model, method, layers or None, info)
    return LibraryCAM(model, method, layers or None, info)


def compute_cams(model: nn.Module, images: torch.Tensor, method: str = "gradcam++",
                 classes: Classes = None, target_layer: str | Sequence[str] | None = None) -> torch.Tensor:
    """Heat maps ``B x C x H x W`` in [0, 1] (min-max per map, input resolution, model's device)
    for ``classes`` (default: all) of every image in ``images`` (any batch the model takes:
    a cxrcam classifier's grey B x 1 x H x W in [0, 1], or a plain timm model's B x 3 x H x W)."""
    return create_cam(model, method, target_layer, example=images)(images, classes).cams


__all__ = ["create_cam", "compute_cams"]
