"""The small base class every CAM engine shares: target layers, batching, scaling.

A CAM object is built once for a model and then called on batches::

    cam = create_cam(model, "gradcam++")
    out = cam(images)            # out.cams: B x C x H x W in [0, 1], out.logits: B x C
    out = cam(images, [3, 10])   # the maps of classes 3 and 10 only
    out = cam(images, lambda logits: ...)   # classes chosen from the batch's own logits

An engine overrides one function, :meth:`BaseCAM.raw_maps`: after the forward pass that gave
the logits, the maps at each target layer of R *targets* per image, each a weighted sum of the
image's logits (R x B x all classes). A class's map is its one-hot target; a class-contrastive map
(``cam.target=contrastive``) is the class's logit against the mean of the image's other predicted
classes' (:func:`target_weights`). :meth:`BaseCAM.__call__` asks every image for the same classes;
:meth:`BaseCAM.pairs` gives each image its own (image, target) pairs, in rounds (round r: each
image's r-th pair), so a batch costs as many backward passes as its busiest image has pairs, not
as many as the union of the classes its images need.

Maps are scaled exactly as pytorch-grad-cam scales them (per layer: ReLU, per-map min-max,
bilinear resize to the input; then the mean over the layers, ReLU, min-max again), so any
engine here is interchangeable with the library's output, several target layers included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from cxrcam.errors import CxrcamError

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


# which classes to map: all (None), these ids, or a rule on the batch's logits (B x all classes)
Classes = Union[None, Sequence[int], Callable[[torch.Tensor], Sequence[int]]]


@dataclass
class CamOutput:
    cams: torch.Tensor  # B x C x H x W, float32, each map min-max scaled to [0, 1]
    logits: torch.Tensor  # B x (all classes) raw classifier outputs
    classes: list[int]  # the class id of each of the C maps


@dataclass
class PairMaps:
    """The scaled maps of some (image, target) pairs (:meth:`BaseCAM.pairs`)."""

    maps: torch.Tensor  # P x H x W, float32 in [0, 1], on the model's device
    images: list[int]  # each pair's image (row of the batch)
    logits: torch.Tensor  # B x (all classes)


def target_weights(classes: Sequence[int], num_classes: int, contrast: Sequence[Sequence[int]] | None = None
                   ) -> torch.Tensor:
    """One target per class of ``classes``: its one-hot logit weights (len x num_classes); with
    ``contrast`` (per target, the classes it is set against), the class's logit minus the mean of
    those classes' logits: what is particular to this finding, not what all of the image's
    findings share (the abnormal lungs)."""
    weights = torch.zeros((len(classes), num_classes))
    weights[torch.arange(len(classes)), torch.as_tensor(list(classes), dtype=torch.long)] = 1
    for k, others in enumerate(contrast or ()):
        others = [o for o in others if o != classes[k]]
        if others:
            weights[k, others] -= 1 / len(others)
    return weights


@dataclass
class Probe:
    """What one forward pass reveals about a model's head (see :func:`probe`)."""

    pool: nn.Module | None  # the global pooling feeding the head
    target_name: str | None  # outermost module whose output is the pooling's input
    head: nn.Linear | None  # the last linear layer run
    linear_head: bool  # logits == head(mean over positions of the pooling's input)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each module's output shape, less the batch

    @property
    def vectors(self) -> frozenset[str]:
        """The modules whose output has no positions (B x K: the head, the pooling): nothing to map."""
        return frozenset(n for n, shape in self.shapes.items() if len(shape) <= 1)


def _is_pool(module: nn.Module) -> bool:
    """A global pooling: torch's, timm's, or a module that says it is one (``is_global_pool``)."""
    return (isinstance(module, _POOLS) or type(module).__name__ == "SelectAdaptivePool2d"
            or getattr(module, "is_global_pool", False))


def _input_channels(model: nn.Module) -> int:
    """Channels the model's first convolution takes (3 where it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


@torch.no_grad()
def probe(model: nn.Module, example: torch.Tensor | None = None, size: int = 64) -> Probe:
    """Run one small forward pass with hooks to find the tensor entering the global pooling
    (the target layer: found by what the model does, not by a name that changes between timm
    versions) and whether the head is pooling + linear (the closed-form condition).

    The pass runs on one random ``size`` x ``size`` image with the channels of ``example`` (a batch
    the model takes) or of the model's first convolution: a 64 px probe costs about 3% of one
    384 px image, where probing on the batch itself cost half a forward pass of a batch of 4. A
    model that refuses that size (a head sized for one input, as a flattening head is) is probed
    on one image of ``example``."""
    param = next(model.parameters())
    channels = example.shape[1] if example is not None and example.ndim == 4 else _input_channels(model)
    tiny = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        return _probe(model, tiny.to(device=param.device, dtype=param.dtype))
    except Exception:  # noqa: BLE001 - any refusal of the small input: fall back to the user's own batch
        if example is None:
            raise
        return _probe(model, example[:1].to(device=param.device, dtype=param.dtype))


def _probe(model: nn.Module, x: torch.Tensor) -> Probe:
    captured: dict = {}
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        if _is_pool(module):
            handles.append(module.register_forward_pre_hook(
                lambda m, args: captured.update(pool=m, pool_in=args[0])))
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, args, out: captured.update(head=m)))
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: outputs.append((name, out))))
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    pool_in = captured.get("pool_in")
    names = [n for n, out in outputs if pool_in is not None and out is pool_in]
    head = captured.get("head")
    linear = (pool_in is not None and head is not None and pool_in.ndim == 4
              and head.in_features == pool_in.shape[1] and logits.ndim == 2
              and torch.allclose(head(pool_in.mean((2, 3))), logits, rtol=1e-4, atol=1e-5))
    shapes = {n: tuple(out.shape[1:]) for n, out in outputs if isinstance(out, torch.Tensor)}
    return Probe(captured.get("pool"), names[-1] if names else None, head, bool(linear), shapes)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    x = x - x.flatten(2).amin(-1)[..., None, None]
    return x / (_EPS + x.flatten(2).amax(-1)[..., None, None])


def scale_cams(maps: torch.Tensor | Sequence[torch.Tensor], size: tuple[int, int],
               layer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """pytorch-grad-cam's scaling of raw maps (N x C x h x w, or one such per target layer) to
    N x C x H x W in [0, 1]: per layer ReLU, min-max per map, bilinear resize (cv2.resize's
    formula); then the mean over the layers, ReLU, min-max again. ``layer_mask`` (N x C x L, or
    broadcast to it; 1 where a map takes a layer): each map's mean over its own layers only."""
    layers = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    if layers[0].shape[1] == 0:  # no class asked for (a batch of normal images): empty maps, not an error
        return layers[0].new_zeros((layers[0].shape[0], 0, *size), dtype=torch.float32)
    scaled = []
    for m in layers:
        m = _minmax(m.float().clamp_min(0))
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        scaled.append(m)
    if len(scaled) == 1:
        fused = scaled[0]
    elif layer_mask is None:
        fused = torch.stack(scaled).clamp_min(0).mean(0)
    else:
        mask = layer_mask.to(scaled[0]).expand(*scaled[0].shape[:2], len(scaled))[..., None, None, :]  # N C 1 1 L
        fused = (torch.stack(scaled, -1).clamp_min(0) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return _minmax(fused.clamp_min(0))


def parse_layers(target_layer: str | Sequence[str] | None) -> list[str]:
    """``cam.target_layer``: "" (the pooling's input), one module name, or several joined by commas
    (``layer3,layer4``: their maps fused, as pytorch-grad-cam fuses several target layers)."""
    if target_layer is None:
        return []
    names = target_layer.split(",") if isinstance(target_layer, str) else list(target_layer)
    return [n.strip() for n in names if n.strip()]


def parse_map(method: str, target_layer: str | None = None) -> tuple[str, str]:
    """A heat map as (method, "layer[,layer]"): from "method@layer[,layer]" (``calibrate --maps``,
    ``bench_maps.py --variant``), or from ``cam.method`` and ``cam.target_layer``."""
    if target_layer is None:
        method, _, target_layer = method.partition("@")
    return method.strip().lower(), ",".join(parse_layers(target_layer))


def map_name(method: str, target_layer: str | None) -> str:
    """(method, layer) as :func:`parse_map` reads it back: ``layercam@layer3,layer4``."""
    return f"{method}@{target_layer}" if target_layer else method


def resolve_layer(model: nn.Module, name: str) -> str:
    """A module name of ``model``; a cxrcam classifier also takes its backbone's names (``layer3``
    for ``backbone.layer3``)."""
    names = dict(model.named_modules())
    for candidate in (name, f"backbone.{name}"):
        if candidate in names and candidate:
            return candidate
    raise CxrcamError(f"cam.target_layer: the model has no module {name!r}; {stages_text(model)}")


def stages_text(model: nn.Module, vectors: frozenset[str] = frozenset()) -> str:
    """The stages a map can be cut from, for an error line: the backbone's children whose output
    has positions (``vectors``: from :func:`probe`; the head and the pooling give a vector)."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    prefix = "backbone." if hasattr(model, "backbone") else ""
    stages = [n for n, m in backbone.named_children()
              if prefix + n not in vectors and not isinstance(m, nn.Linear) and not _is_pool(m)]
    return f"its stages are {', '.join(stages)} (several: layer3,layer4)"


class BaseCAM:
    """Heat maps for many classes of a batch. Subclasses implement :meth:`raw_maps`."""

    method: str

    def __init__(self, model: nn.Module, method: str, target_layer: str | Sequence[str] | None = None,
                 info: Probe | None = None):
        self.model = model.eval()
        self.method = method
        self.info = info or probe(model)
        names = parse_layers(target_layer) or ([self.info.target_name] if self.info.target_name else [])
        if not names:
            raise CxrcamError("cannot find the layer entering the global pooling of this model; "
                              "set cam.target_layer to a module name")
        self.target_names = [resolve_layer(model, n) for n in names]
        flat = [n for n in self.target_names if n in self.info.vectors]
        if flat:
            raise CxrcamError(f"cam.target_layer: {flat[0].removeprefix('backbone.')} gives one vector per image, "
                              f"with no positions to draw a "
                              f"map on; {stages_text(model, self.info.vectors)}")
        self.target_layers = [model.get_submodule(n) for n in self.target_names]
        self.class_layers: torch.Tensor | None = None  # all classes x target layers, see use_class_layers

    def use_class_layers(self, layers: dict[int | str, str | Sequence[str]], num_classes: int) -> None:
        """Fuse only some of the target layers for some classes (class id, or its string as
        calibration.json keys it -> layer names, each one of this engine's; the other classes fuse
        them all): calibrate's per-class choice of finer maps. The maps come from the same pass;
        only the fusion differs per class."""
        mask = torch.ones((num_classes, len(self.target_names)))
        for c, names in layers.items():
            chosen = {resolve_layer(self.model, n) for n in parse_layers(names)}
            if not chosen <= set(self.target_names):
                raise CxrcamError(f"class {c}'s layers {', '.join(sorted(chosen))} are not all among the engine's "
                                  f"{self.target_name}")
            mask[int(c)] = torch.tensor([float(n in chosen) for n in self.target_names])
        self.class_layers = None if bool(mask.all()) else mask

    def _layer_mask(self, weights: torch.Tensor) -> torch.Tensor | None:
        """Per target (... x all classes of logit weights), its class's layer mask (its largest weight
        is its class)."""
        if self.class_layers is None:
            return None
        return self.class_layers.to(weights.device)[weights.argmax(-1)]

    @property
    def target_name(self) -> str:
        """The target layer(s), as ``cam.target_layer`` writes them."""
        return ",".join(self.target_names)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The batch's logits (B x all classes)."""
        return self.model(images).float()

    def raw_maps(self, images: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        """Per target layer, maps R x B x h x w before scaling, right after :meth:`forward` on
        ``images``: map [r, b] is of image b's target ``sum_c weights[r, b, c] * logit[b, c]``
        (R x B x all classes, on the model's device; an all-zero row is a round the image sits out)."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, classes: Classes = None) -> CamOutput:
        """Scaled maps of ``classes`` (all by default; or a rule on the logits: only the classes
        some image needs are computed and scaled) and the logits, on the model's device. No class
        is a normal case (a batch of normal images): the maps are then B x 0 x H x W.

        Always in fp32, whatever autocast the caller runs under and whatever precision the model
        trained in: a bf16 map's min-max scaling and thresholds would move with the rounding."""
        images = images.to(self.device)
        with torch.autocast(self.device.type, enabled=False):
            logits = self.forward(images.float())
            chosen = [int(c) for c in (range(logits.shape[1]) if classes is None else
                                       classes(logits) if callable(classes) else classes)]
            weights = target_weights(chosen, logits.shape[1]).to(logits)[:, None].expand(-1, len(images), -1)
            maps = [m.transpose(0, 1) for m in self.raw_maps(images, weights)]  # B x C x h x w
            mask = self._layer_mask(weights[:, 0])  # C x L
        return CamOutput(scale_cams(maps, tuple(images.shape[-2:]), None if mask is None else mask[None]), logits,
                         chosen)

    def pairs(self, images: torch.Tensor, plan: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> PairMaps:
        """Scaled maps of each image's own targets: ``plan(logits)`` gives, per image, its targets'
        logit weights (n_b x all classes, :func:`target_weights`); the maps come in the same order,
        image by image (fp32, as :meth:`__call__`)."""
        images = images.to(self.device)
        with torch.autocast(self.device.type, enabled=False):
            logits = self.forward(images.float())
            return self.pair_maps(images, logits, list(plan(logits)))

    def pair_maps(self, images: torch.Tensor, logits: torch.Tensor, targets: list[torch.Tensor]) -> PairMaps:
        """:meth:`pairs` after the forward pass that gave ``logits`` (an ensemble plans on all its
        members' logits before any member cuts maps)."""
        counts = [len(t) for t in targets]
        weights = logits.new_zeros((max(counts, default=0), len(images), logits.shape[1]))
        for b, t in enumerate(targets):
            weights[:len(t), b] = t.to(logits)
        rounds = torch.tensor([r for n in counts for r in range(n)], dtype=torch.long, device=self.device)
        rows = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long, device=self.device)
        with torch.autocast(self.device.type, enabled=False):
            raw = self.raw_maps(images.float(), weights)  # also with no round: it releases the forward's state
        if not len(rows):  # no image needs a map (a batch of normal images)
            return PairMaps(images.new_zeros((0, *images.shape[-2:]), dtype=torch.float32), [], logits)
        maps = [m[rounds, rows][:, None] for m in raw]
        mask = self._layer_mask(weights[rounds, rows])  # P x L
        return PairMaps(scale_cams(maps, tuple(images.shape[-2:]), None if mask is None else mask[:, None])[:, 0],
                        rows.tolist(), logits)
