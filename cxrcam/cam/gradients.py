"""Grad-CAM, Grad-CAM++ and LayerCAM of every class a batch needs, at any layer(s), near forward cost.

pytorch-grad-cam runs one forward and one full backward per class. Here:

1. one forward pass, in which autograd records only what lies above the lowest target layer
   (the parameters are frozen for the pass and that layer's output starts the graph), so the
   backward runs from the head down to that layer and no further;
2. the gradients of every round's targets (:meth:`BaseCAM.raw_maps`: a class, or a class against
   the image's other findings) at every target layer, either in one batched backward
   (``torch.autograd.grad(..., is_grads_batched=True)``: vmap over the rounds' output gradients)
   or in one backward per round sharing the forward (``retain_graph``); :data:`BATCHED` says
   which is the faster on each device (``scripts/bench_cam.py``);
3. each method's formula (:mod:`cxrcam.cam.methods`) on all rounds at once.

Several target layers (``layer3,layer4``) come from the same pass; :func:`cxrcam.cam.base.scale_cams`
fuses them. Verified against pytorch-grad-cam in tests/test_cam.py.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Probe
from cxrcam.cam.methods import GRADIENT_METHODS, METHODS
from cxrcam.errors import CxrcamError

# one batched backward, or a backward per class, by device type: measured in docs/BENCHMARKS.md
BATCHED = {"cpu": False, "cuda": True}


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside: autograd records nothing below the first target layer."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    """Autograd on, whatever the caller runs under (``torch.no_grad()``, ``torch.inference_mode()``):
    the maps need the gradients of this pass and nothing else does."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class GradientCAM(BaseCAM):
    def __init__(self, model: nn.Module, method: str = "layercam", target_layer: str | Sequence[str] | None = None,
                 info: Probe | None = None, batched: bool | None = None):
        if method not in GRADIENT_METHODS:
            raise CxrcamError(f"{method!r} has no gradient engine; choose one of {', '.join(GRADIENT_METHODS)}")
        super().__init__(model, method, target_layer, info)
        self.batched = batched
        self._recording = False
        self._inputs: list[torch.Tensor | None] = []  # per target layer: what the gradients are taken at
        self._values: list[torch.Tensor | None] = []  # per target layer: its activations
        self._logits: torch.Tensor | None = None
        self._hooks = [layer.register_forward_hook(partial(self._keep, k))
                       for k, layer in enumerate(self.target_layers)]

    def __del__(self) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()

    def _keep(self, index: int, module, args, out: torch.Tensor):
        if not self._recording:
            return None
        if not any(t is not None and t.requires_grad for t in self._inputs):
            # the lowest target layer (hooks fire in forward order): the recorded graph starts here
            leaf = out.detach().requires_grad_(True)
            self._inputs[index], self._values[index] = leaf, leaf.detach()
            return leaf.clone()  # what the layers above see: a later in-place op cannot touch the leaf
        self._inputs[index], self._values[index] = out, out.detach()
        return None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = len(self.target_layers)
        self._inputs, self._values = [None] * n, [None] * n
        with _frozen(self.model), _recording():
            self._recording = True
            try:
                self._logits = self.model(images)
            finally:
                self._recording = False
        if any(t is None for t in self._inputs):
            missing = [name for name, t in zip(self.target_names, self._inputs) if t is None]
            raise CxrcamError(f"cam.target_layer: {', '.join(missing)} did not run in the forward pass")
        return self._logits.detach().float()

    def raw_maps(self, images: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        logits, inputs, values = self._logits, self._inputs, self._values
        self._logits, self._inputs, self._values = None, [], []
        if not len(weights):
            return [v.new_zeros((0, len(images), *v.shape[-2:]), dtype=torch.float32) for v in values]
        batched = self.batched if self.batched is not None else BATCHED.get(images.device.type, False)
        with _recording():
            grads = (self._batched_grads if batched else self._grads_per_round)(logits, inputs, weights.to(logits))
        return [METHODS[self.method](v.float(), g.float()).transpose(0, 1) for v, g in zip(values, grads)]

    @staticmethod
    def _batched_grads(logits: torch.Tensor, inputs: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
        """One vmapped backward for all rounds: per layer B x R x K x h x w."""
        grads = torch.autograd.grad(logits, inputs, grad_outputs=weights, is_grads_batched=True)
        return [g.transpose(0, 1) for g in grads]

    @staticmethod
    def _grads_per_round(logits: torch.Tensor, inputs: list[torch.Tensor], weights: torch.Tensor
                         ) -> list[torch.Tensor]:
        """One backward per round over the same forward (images are independent in eval mode, so
        one backward of the batch's weighted logits gives each image its own target's gradient)."""
        per_round = [torch.autograd.grad(logits, inputs, grad_outputs=w, retain_graph=r < len(weights) - 1)
                     for r, w in enumerate(weights)]
        return [torch.stack([g[layer] for g in per_round], 1) for layer in range(len(inputs))]


__all__ = ["GradientCAM", "GRADIENT_METHODS", "BATCHED"]
