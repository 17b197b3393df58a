"""Any pytorch-grad-cam method, batched: one call per class over the whole batch.

The general path for the methods neither the closed form nor the gradient engine computes
(xgradcam, eigencam, scorecam, ...: everything but gradcam, gradcam++ and layercam), and for
those three when ``create_cam(..., fast=False)`` asks for the library's own.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Probe
from cxrcam.errors import CxrcamError
from cxrcam.runtime.progress import progress_bar

# method name -> pytorch-grad-cam class name; the library is imported only when one is built,
# since it imports scikit-learn, scipy and matplotlib (3 s of every command's start otherwise)
LIBRARY_METHODS = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "layercam": "LayerCAM", "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM", "fullgrad": "FullGrad", "gradcamelementwise": "GradCAMElementWise",
    "kpcacam": "KPCA_CAM", "shapleycam": "ShapleyCAM", "finercam": "FinerCAM",
}


# the methods that run the model once per channel of the target layer, and the library module whose
# loop over those channels shows a tqdm bar of its own (one per image and class: dozens, nested)
PER_CHANNEL = {"scorecam": "score_cam", "ablationcam": "ablation_cam"}


@contextlib.contextmanager
def _one_bar(module: str, total: int, desc: str) -> Iterator[None]:
    """The library's per-image, per-class bars of ``module`` replaced by one bar over ``total`` steps."""
    library = importlib.import_module(f"pytorch_grad_cam.{module}")
    bar = progress_bar(total=total, desc=desc, unit="batch", leave=False)

    class _Steps:  # stands in for the ``tqdm`` module the library calls as ``tqdm.tqdm(iterable)``
        @staticmethod
        def tqdm(iterable, *args, **kwargs):
            for item in iterable:
                yield item
                bar.update(1)

    saved, library.tqdm = library.tqdm, _Steps
    try:
        yield
    finally:
        library.tqdm = saved
        bar.close()


class LibraryCAM(BaseCAM):
    def __init__(self, model: nn.Module, method: str = "gradcam++", target_layer: str | Sequence[str] | None = None,
                 info: Probe | None = None):
        if method not in LIBRARY_METHODS:
            raise CxrcamError(f"unknown CAM method {method!r}; choose one of {', '.join(LIBRARY_METHODS)}")
        import pytorch_grad_cam

        engine = getattr(pytorch_grad_cam, LIBRARY_METHODS[method], None)
        if engine is None:
            raise CxrcamError(f"CAM method {method!r} needs a newer pytorch-grad-cam (no "
                              f"{LIBRARY_METHODS[method]} in {pytorch_grad_cam.__name__}); pip install -U grad-cam")
        super().__init__(model, method, target_layer, info)
        self.engine = engine(model=model, target_layers=self.target_layers)
        self.steps = 0  # per image and class: the library's batches of masked forward passes (PER_CHANNEL)
        if method in PER_CHANNEL:
            channels = [self.info.shapes.get(n, (0,))[0] for n in self.target_names]
            batch = getattr(self.engine, "batch_size", 16)
            self.steps = sum(math.ceil(k / batch) for k in channels)
            warnings.warn(f"cam.method={method} runs the model once per channel of {self.target_name} "
                          f"({' + '.join(map(str, channels))} channels): about {sum(channels)} forward passes per "
                          f"image and class, where gradcam++ needs one per image; expect minutes per image on a CPU "
                          f"(its progress bar shows the rate)", stacklevel=3)

    def raw_maps(self, images: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        """The library's maps, one call per round, its target layers already fused and scaled
        (scaling them again changes nothing)."""
        slow = (_one_bar(PER_CHANNEL[self.method], self.steps * len(images) * len(weights), self.method)
                if self.steps and len(weights) else contextlib.nullcontext())
        with slow:
            maps = [torch.from_numpy(self.engine(input_tensor=images, targets=[_Weighted(w) for w in round_weights]))
                    for round_weights in weights]
        out = torch.stack(maps) if maps else torch.zeros((0, len(images), *images.shape[-2:]))
        return [out.to(images.device)]


class _Weighted:
    """A pytorch-grad-cam target: one image's weighted sum of its logits (one-hot: ClassifierOutputTarget)."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output * self.weights.to(output)).sum(-1)
