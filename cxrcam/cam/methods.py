"""How each gradient method turns a layer's activations and a class's gradients into a map:
one function per method, pytorch-grad-cam's formulas on every class of a batch at once.

``acts``: B x K x h x w, the target layer's output. ``grads``: the gradient of each chosen
class's logit with respect to it, B x C x K x h x w, or B|1 x C x K x 1 x 1 where it is the
same at every position (a pooling + linear head's closed form, :mod:`cxrcam.cam.closed_form`). Each
returns B x C x h x w before the ReLU and the scaling (:func:`cxrcam.cam.base.scale_cams`).

* Grad-CAM (Selvaraju et al. 2017): weight_k = mean_ij G_k; map = sum_k weight_k A_k.
* Grad-CAM++ (Chattopadhay et al. 2018): a_k = G^2 / (2 G^2 + sum_ij(A_k) G^3 + eps) (0 where
  G = 0); weight_k = sum_ij ReLU(G_k) a_k; map = sum_k weight_k A_k.
* LayerCAM (Jiang et al. 2021): map = sum_k ReLU(G_k) * A_k, a weight per position: what lets a
  finer layer draw the finding's extent instead of one blob per channel.
"""
from __future__ import annotations

from typing import Callable

import torch

_EPS_PP = 1e-6  # pytorch-grad-cam's grad_cam_plusplus.py


def _weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_k weights[b, c, k] A[b, k] -> B x C x h x w."""
    return torch.einsum("bck,bkhw->bchw", weights.expand(len(acts), -1, -1), acts)


def _area_ratio(acts: torch.Tensor, grads: torch.Tensor) -> float:
    """Positions a constant (1 x 1) gradient stands for: its sum over positions is this times it."""
    return acts.shape[-2] * acts.shape[-1] / (grads.shape[-2] * grads.shape[-1])


def gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return _weighted_sum(grads.mean((-2, -1)), acts)


def gradcam_plusplus(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    g2 = grads * grads
    total = acts.sum((2, 3))[:, None, :, None, None]  # B x 1 x K x 1 x 1
    alpha = g2 / (2 * g2 + total * (g2 * grads) + _EPS_PP)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (grads.clamp_min(0) * alpha).sum((-2, -1)) * _area_ratio(acts, grads)
    return _weighted_sum(weights, acts)


def layercam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    if grads.shape[-2:] == (1, 1):  # a constant gradient: LayerCAM is Grad-CAM with ReLU'd weights
        return _weighted_sum(grads[..., 0, 0].clamp_min(0), acts)
    return torch.einsum("bckhw,bkhw->bchw", grads.clamp_min(0), acts)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam, "gradcam++": gradcam_plusplus, "layercam": layercam}
GRADIENT_METHODS = tuple(METHODS)  # what the closed form and the gradient engine compute

__all__ = ["METHODS", "GRADIENT_METHODS", "gradcam", "gradcam_plusplus", "layercam"]
