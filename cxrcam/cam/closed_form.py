"""Grad-CAM, Grad-CAM++ and LayerCAM for every class from one forward pass, at the pooling's input.

When the head is global average pooling + linear (timm ResNet, DenseNet, EfficientNet ...),
the gradient of logit c with respect to the pooled activations A (K x h x w) is the constant
g_ck = w_ck / (h w) at every position, so each method's formula (:mod:`cxrcam.cam.methods`)
closes on the head's weights: one einsum over all classes, no backward pass.
Verified against pytorch-grad-cam in tests/test_cam.py.
"""
from __future__ import annotations

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Probe
from cxrcam.cam.methods import GRADIENT_METHODS, METHODS
from cxrcam.errors import CxrcamError


class ClosedFormCAM(BaseCAM):
    def __init__(self, model: nn.Module, method: str = "gradcam++", info: Probe | None = None):
        super().__init__(model, method, info=info)
        if method not in GRADIENT_METHODS or not self.info.linear_head:
            raise CxrcamError(f"the closed form needs one of {', '.join(GRADIENT_METHODS)} and a pooling + linear "
                              f"head; {method!r} on this model has none (create_cam picks another engine)")
        self._acts: torch.Tensor | None = None
        self._hook = self.info.pool.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self._acts = args[0]

    def __del__(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        acts, self._acts = self._acts.float(), None  # kept by the forward pass
        h, w = acts.shape[-2:]
        # d target / d A_k(i, j) = sum_c weights[r, b, c] W[c, k] / (h w), the same at every position
        grads = torch.einsum("rbc,ck->brk", weights.float(), self.info.head.weight.float()) / (h * w)
        return [METHODS[self.method](acts, grads[..., None, None]).transpose(0, 1)]
