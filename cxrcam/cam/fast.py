"""Grad-CAM and Grad-CAM++ for every class from one forward pass.

When the head is global average pooling + linear (timm ResNet, DenseNet, EfficientNet ...),
the gradient of logit c with respect to the pooled activations A (K x h x w) is the constant
g_ck = w_ck / (h w) at every position. pytorch-grad-cam's formulas then close:

* Grad-CAM:   weight_k = mean(G_k) = g_ck
* Grad-CAM++: a_k = g^2 / (2 g^2 + sum_ij(A_k) g^3 + eps) (0 where g = 0),
              weight_k = sum_ij ReLU(g) a_k = h w ReLU(g_ck) a_k

and cam_c = ReLU(sum_k weight_k A_k): one einsum over all classes, no backward pass.
Verified against pytorch-grad-cam in tests/test_cam.py.
"""
from __future__ import annotations

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Probe

FAST_METHODS = ("gradcam", "gradcam++")
_EPS_PP = 1e-6  # pytorch-grad-cam's grad_cam_plusplus.py


class FastCAM(BaseCAM):
    def __init__(self, model: nn.Module, method: str = "gradcam++", info: Probe | None = None):
        super().__init__(model, method, info=info)
        if method not in FAST_METHODS or not self.info.linear_head:
            raise ValueError(f"closed form needs {FAST_METHODS} and a pooling + linear head")
        self._acts: torch.Tensor | None = None
        self._hook = self.info.pool.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self._acts = args[0]

    def __del__(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
        acts, self._acts = self._acts.float(), None  # kept by the forward pass
        h, w = acts.shape[-2:]
        g = self.info.head.weight[classes].float() / (h * w)  # C x K: d logit_c / d A_k(i, j)
        if self.method == "gradcam":
            weights = g.expand(len(images), -1, -1)
        else:
            g2 = g * g
            total = acts.sum((2, 3))[:, None, :]  # B x 1 x K
            alpha = g2 / (2 * g2 + total * (g2 * g) + _EPS_PP)
            alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
            weights = (h * w) * g.clamp_min(0) * alpha  # B x C x K
        return torch.einsum("bck,bkhw->bchw", weights, acts)
