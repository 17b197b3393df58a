"""Any pytorch-grad-cam method, batched: one call per class over the whole batch.

The general path for the methods neither the closed form nor the gradient engine computes
(xgradcam, eigencam, scorecam, ...: everything but gradcam, gradcam++ and layercam), and for
those three when ``create_cam(..., fast=False)`` asks for the library's own.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cxrcam.cam.base import BaseCAM, Probe
from cxrcam.errors import CxrcamError

# method name -> pytorch-grad-cam class name; the library is imported only when one is built,
# since it imports scikit-learn, scipy and matplotlib (3 s of every command's start otherwise)
LIBRARY_METHODS = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "layercam": "LayerCAM", "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM", "fullgrad": "FullGrad", "gradcamelementwise": "GradCAMElementWise",
    "kpcacam": "KPCA_CAM", "shapleycam": "ShapleyCAM", "finercam": "FinerCAM",
}


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

    def raw_maps(self, images: torch.Tensor, classes: list[int]) -> list[torch.Tensor]:
        """The library's maps, its target layers already fused and scaled (scaling them again
        changes nothing)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        maps = [torch.from_numpy(self.engine(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images)))
                for c in classes]
        out = torch.stack(maps, 1) if maps else torch.zeros((len(images), 0, *images.shape[-2:]))
        return [out.to(images.device)]
