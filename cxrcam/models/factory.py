"""``create_classifier(name, ...)``: any timm backbone as a multi-label chest X-ray classifier.

The model takes what the data stage produces, a grey batch ``B x 1 x H x W`` in [0, 1], and
owns everything from there: replication to the backbone's channels and the normalisation
(ImageNet statistics by default, stored as buffers, so checkpoints carry them and
``localize`` cannot get them wrong). The head is global average pooling + linear, which the
fast all-class CAM relies on; or (``model.pooling=lse|pcam|csra``) a score map per class, pooled
by log-sum-exp, probabilistic CAM or class-specific residual attention.
"""
from __future__ import annotations

import math
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from cxrcam.config import DEFAULT_MIN_PROB, class_thresholds
from cxrcam.errors import CxrcamError
from cxrcam.files import checkpoint_contents, load_checkpoint

HUB_HOST = "huggingface.co"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def grey_to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The one grey -> ``channels`` step (a view, no copy): B x 1 x H x W -> B x channels x H x W."""
    return x if x.shape[1] == channels else x.expand(-1, channels, -1, -1)


def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[tuple, tuple]:
    """Normalisation statistics for ``channels`` inputs: one channel averages them (timm folds the
    first layer the same way), more channels repeat the first."""
    if len(mean) == channels:
        return tuple(mean), tuple(std)
    if channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return (mean[0],) * channels, (std[0],) * channels


class LSEPool(nn.Module):
    """Log-sum-exp pooling of class score maps (ChestX-ray8, Wang et al. 2017): per class,
    ``(1 / r) log mean_ij exp(r s_ij)``, between the mean (r -> 0) and the maximum (r -> inf), so a
    class's logit comes from where its own evidence is strongest rather than from the whole image.
    ``is_global_pool``: the CAM probe takes its input (the score maps) as the default map layer."""

    is_global_pool = True

    def __init__(self, r: float = 5.0):
        super().__init__()
        self.r = float(r)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.flatten(2)
        return (torch.logsumexp(self.r * flat, dim=-1) - math.log(flat.shape[-1])) / self.r


class PCAMPool(nn.Module):
    """Probabilistic-CAM pooling (Ye et al. 2020): per class, the score map averaged with weights
    ``sigmoid(s_ij)`` normalised over the positions, so the positions the class's own map calls
    likely decide its logit, and training shapes the map itself. (Their pooled feature followed by
    the class's linear layer is this weighted mean of the score map: the layer is linear.)"""

    is_global_pool = True

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.flatten(2)
        weights = torch.sigmoid(flat)
        return (weights * flat).sum(-1) / weights.sum(-1).clamp_min(1e-6)


class CSRAPool(nn.Module):
    """Class-specific residual attention (CSRA; Zhu & Wu, ICCV 2021), one head: per class, the
    score map's mean plus ``lam`` times its softmax-attention mean (temperature 1), where the class's
    own scores are the attention: each class gets a map that is also its attention over the image."""

    is_global_pool = True

    def __init__(self, lam: float = 0.1):
        super().__init__()
        self.lam = float(lam)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.flatten(2)
        return flat.mean(-1) + self.lam * (torch.softmax(flat, dim=-1) * flat).sum(-1)


class ScoreMapHead(nn.Module):
    """Features -> one score map per class (a 1 x 1 convolution: the class activation maps) -> pooled."""

    def __init__(self, features: int, num_classes: int, pool: nn.Module):
        super().__init__()
        self.scores = nn.Conv2d(features, num_classes, 1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.scores(x))


class Classifier(nn.Module):
    """Grey image in [0, 1] -> logits for each finding. ``head``: None for the backbone's own
    pooling + linear head, else a :class:`ScoreMapHead` on the backbone's feature maps."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        in_chans = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, in_chans, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, in_chans, 1, 1))

    @property
    def in_chans(self) -> int:
        return self.mean.shape[1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The one image normalisation: grey [0, 1] -> the backbone's channels and statistics."""
        return (grey_to_channels(x, self.in_chans) - self.mean) / self.std

    def forward(self, x: torch.Tensor, maps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; ``maps``: (logits, B x C x h x w class score maps), the maps ``train.box_loss``
        fits: the score head's, or with average pooling + linear the class activation maps (the
        linear layer at every cell, whose mean is the logit)."""
        if not maps:
            out = self.backbone(self.normalize(x))
            return out if self.head is None else self.head(out)
        if self.head is not None:
            scores = self.head.scores(self.backbone(self.normalize(x)))
            return self.head.pool(scores), scores
        features = self.backbone.forward_features(self.normalize(x))
        linear = self.backbone.get_classifier()
        if not isinstance(linear, nn.Linear) or features.ndim != 4:
            raise CxrcamError(f"train.box_loss needs class maps: {type(self.backbone).__name__}'s head is not global "
                              f"pooling + one linear layer; use model.pooling=pcam (or lse, csra)")
        cams = torch.einsum("bfhw,cf->bchw", features, linear.weight) + linear.bias.view(1, -1, 1, 1)
        return self.backbone.forward_head(features), cams


def _hub_reachable() -> bool:
    """Whether the hub's name resolves: offline machines fail here at once."""
    try:
        socket.getaddrinfo(HUB_HOST, 443)
        return True
    except OSError:
        return False


def stride_kwargs(name: str, output_stride: int) -> dict[str, Any]:
    """timm's ``output_stride`` argument (none at the default 32, which every model has)."""
    if output_stride == 32:
        return {}
    try:
        timm.create_model(name, pretrained=False, num_classes=0, output_stride=output_stride)
    except TypeError:
        raise CxrcamError(f"model.output_stride={output_stride}: timm's {name} cannot dilate its last stages; "
                          f"use model.output_stride=32, or a model that can (resnet*, resnext*, efficientnet*, "
                          f"regnet*, convnext*)") from None
    return {"output_stride": output_stride}


def _create_backbone(name: str, num_classes: int, in_chans: int, pretrained: bool | str,
                     drop_rate: float, output_stride: int = 32, global_pool: str = "avg") -> nn.Module:
    if not (timm.is_model(name) or name.startswith(("hf-hub:", "local-dir:"))):
        raise CxrcamError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                                  global_pool=global_pool, **stride_kwargs(name, output_stride))
    try:
        if pretrained is False or pretrained in ("", "false", "none"):
            return timm.create_model(name, pretrained=False, **kwargs)
        if isinstance(pretrained, str) and pretrained not in ("true", "imagenet"):
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise CxrcamError(f"model.pretrained: weights file not found: {path}")
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except RuntimeError as exc:  # e.g. a weights file of another architecture
        raise CxrcamError(f"model.pretrained: cannot load {pretrained} into {name}: {exc}") from None
    # ImageNet weights from the hub; without a network, from the hub's local cache only
    # (instead of a minute of retries before the same failure).
    if _hub_reachable():
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise CxrcamError(f"could not download ImageNet weights for {name}: {exc}") from None
    import huggingface_hub.constants as hub

    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception:
        raise CxrcamError(
            f"ImageNet weights for {name} are not cached and the model hub ({HUB_HOST}) cannot be "
            f"reached: set model.pretrained to a local weights file (.pth/.safetensors), or to false") from None
    finally:
        hub.HF_HUB_OFFLINE = offline


POOLINGS = ("avg", "lse", "pcam", "csra")


def score_pool(pooling: str, lse_r: float = 5.0, csra_lambda: float = 0.1) -> nn.Module:
    """The pooling of a :class:`ScoreMapHead`: ``model.pooling`` lse, pcam or csra."""
    return {"lse": lambda: LSEPool(lse_r), "pcam": PCAMPool, "csra": lambda: CSRAPool(csra_lambda)}[pooling]()


def create_classifier(name: str, num_classes: int, pretrained: bool | str = False, in_chans: int = 3,
                      drop_rate: float = 0.0, output_stride: int = 32, pooling: str = "avg",
                      lse_r: float = 5.0, csra_lambda: float = 0.1) -> Classifier:
    """A timm backbone ``name`` with a ``num_classes`` pooling + linear head.

    ``pretrained``: False (random init), True (ImageNet weights from the hub or its cache),
    or the path of a local weights file. ``in_chans`` 3 replicates the grey image (keeps
    ImageNet first-layer weights); 1 lets timm fold the first layer to one channel.
    ``output_stride`` 16 or 8 dilates the last stage(s) instead of striding: the same weights,
    heat maps 2x or 4x finer, at the cost of more computation in those stages.
    ``pooling`` "lse", "pcam" or "csra": the backbone's feature maps -> a score map per class ->
    :class:`LSEPool` (``lse_r``), :class:`PCAMPool` or :class:`CSRAPool` (``csra_lambda``) instead
    of average pooling + linear.
    """
    if pooling not in POOLINGS:
        raise CxrcamError(f"model.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "avg":
        backbone = _create_backbone(name, num_classes, in_chans, pretrained, drop_rate, output_stride)
        head = None
    else:
        backbone = _create_backbone(name, 0, in_chans, pretrained, drop_rate, output_stride, global_pool="")
        head = ScoreMapHead(backbone.num_features, num_classes, score_pool(pooling, lse_r, csra_lambda))
    cfg = backbone.pretrained_cfg or {}
    return Classifier(backbone, *channel_stats(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), in_chans),
                      head)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a classifier from a self-contained checkpoint (loaded with ``weights_only=True``)."""
    ckpt = load_checkpoint(path, device, kind="classifier")
    with checkpoint_contents(path):
        model = create_classifier(ckpt["model_name"], len(ckpt["classes"]), pretrained=False,
                                  in_chans=ckpt["in_chans"], output_stride=ckpt.get("output_stride", 32),
                                  pooling=ckpt.get("pooling", "avg"), lse_r=ckpt.get("lse_r", 5.0),
                                  csra_lambda=ckpt.get("csra_lambda", 0.1))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def decision_thresholds(ckpt: dict[str, Any], min_prob: float | str = "auto") -> np.ndarray:
    """Per class, the probability above which a class is *predicted*
    (:func:`cxrcam.config.class_thresholds`), from the operating points ``train-classifier`` chose
    on the validation fold and stored in the checkpoint (``op_threshs``, as torchxrayvision keeps
    them). A checkpoint without any is named in a warning where "auto" falls back to 0.5."""
    if min_prob == "auto" and not ckpt.get("op_threshs"):
        warnings.warn(f"boxes.min_prob=auto: the checkpoint ({ckpt.get('model_name', 'classifier')}) has no "
                      f"operating points, so every class is predicted above {DEFAULT_MIN_PROB}; retrain, or set "
                      f"boxes.min_prob", stacklevel=2)
    return class_thresholds(min_prob, ckpt.get("op_threshs"), len(ckpt["classes"]))
