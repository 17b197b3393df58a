"""Typed settings loaded from a YAML file with ``section.key=value`` overrides.

The dataclasses below are the schema: their defaults are the built-in configuration, a
YAML file overrides any subset, and the command line overrides any single key. A key the
schema does not know is an error that names it, so a typo never silently does nothing.
The YAML files ship inside the package (``cxrcam/configs``), so ``--config resnet50`` works in
a wheel install as in a clone; ``--config PATH`` reads the user's own file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import numpy as np
import yaml

from cxrcam.errors import CxrcamError


@dataclass
class FusionConfig:
    """How the boxes of several readers of one image become the training truth."""

    # wbf: Weighted Boxes Fusion of every reader's boxes; majority: the same, kept only where 2 of the 3 readers
    # marked the finding (its label too); reader: every reader's boxes as they are; union: overlapping boxes joined
    method: Literal["wbf", "majority", "reader", "union"] = "wbf"
    iou_thr: float = 0.4
    skip_box_thr: float = 0.0


@dataclass
class SplitConfig:
    n_folds: int = 5
    seed: int = 0
    val_fold: int = 0  # the fold held out for validation; fold -1 is the official test set


@dataclass
class PrepareConfig:
    size: int = 512  # cached images are size x size pixels
    workers: int = 2  # decoding processes


@dataclass
class ModelConfig:
    name: str = "resnet50"  # any timm model name
    pretrained: bool | str = False  # true: ImageNet weights from the hub; or a local weights file
    in_chans: int = 3  # 3 replicates the grey image (keeps ImageNet weights); 1 folds the first layer
    drop_rate: float = 0.0
    # 32: the backbone as designed; 16 or 8 dilate the last stage(s) for 2x / 4x finer heat maps
    # (timm's output_stride; ResNet, EfficientNet, RegNet, ConvNeXt... support it, DenseNet and ViT do not)
    output_stride: Literal[8, 16, 32] = 32
    # "avg": global average pooling + linear (the closed-form CAM's condition); "lse": a score map per class,
    # log-sum-exp pooled with sharpness lse_r (ChestX-ray8): each logit from where its class's evidence is
    # "pcam": the score map averaged under its own sigmoid (Ye et al. 2020); "csra": its mean plus csra_lambda x its
    # softmax-attention mean (Zhu & Wu 2021)
    pooling: Literal["avg", "lse", "pcam", "csra"] = "avg"
    lse_r: float = 5.0
    csra_lambda: float = 0.1


@dataclass
class AugmentConfig:
    """Augmentations suited to radiographs: small geometry and exposure changes, no vertical flip."""

    degrees: float = 5.0
    translate: float = 0.05
    scale: float = 0.1  # zoom in [1 - scale, 1 + scale]
    brightness: float = 0.2
    contrast: float = 0.2
    hflip: bool = False  # a mirrored chest moves the heart: off by default


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # global: divided among processes under torchrun
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 5  # step scheduler: decay every step_size epochs
    gamma: float = 0.1
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    # auto: bf16 on a GPU (fp16 where it has no bf16), fp32 on a CPU; bf16 autocasts on a CPU too; fp16: CUDA only
    amp: Literal["auto", "fp32", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True  # CUDA only
    pos_weight: bool = False  # weight positives by negatives/positives per class
    soft_targets: bool = False  # targets = share of readers who marked the class
    # the few-boxes lever (Li et al. 2018; Choe et al. 2020's few-shot baseline): beside BCE on the labels, a cell BCE
    # on each class's score map of the boxed training images (1 where its boxes are, 0 elsewhere and for the image's
    # absent classes), times box_loss; 0: the image labels alone (weak supervision)
    box_loss: float = 0.0
    box_images: int = 0  # boxed training-fold images whose boxes it uses: a seeded sample of this many (0 = all)
    workers: int = 2
    seed: int = 0
    deterministic: bool = True


@dataclass
class CamConfig:
    """Heat maps: which method, and how images stream through the model."""

    method: str = "gradcam++"  # gradcam, gradcam++ (closed form when possible), or any pytorch-grad-cam method
    target_layer: str = ""  # module name; empty = the tensor entering the global pooling
    # what a class's map explains: its logit ("class"), or its logit against the mean of the image's other
    # predicted classes' ("contrastive": the evidence particular to this finding)
    target: Literal["class", "contrastive"] = "class"
    batch_size: int = 16
    workers: int = 2


DEFAULT_MIN_PROB = 0.5  # a class without an operating point of its own is predicted above this


def class_thresholds(min_prob: float | str, operating_points: Sequence[float] | None, n: int) -> np.ndarray:
    """The one rule for the probability above which each of ``n`` classes is *predicted* (gets
    boxes, pictures and refine's CAM proposals): ``boxes.min_prob`` for every class when it is a
    number; with "auto", each class's operating point (``train-classifier``'s F1 on validation),
    :data:`DEFAULT_MIN_PROB` for a class without one (NaN, or no operating points at all)."""
    if min_prob != "auto":
        return np.full(n, float(min_prob))
    saved = np.asarray(operating_points if operating_points is not None and len(operating_points) else [np.nan] * n,
                       np.float64)
    return np.where(np.isnan(saved), DEFAULT_MIN_PROB, saved)


@dataclass
class BoxConfig:
    """Heat map -> boxes (see cxrcam.boxes.from_cam)."""

    threshold: float = 0.65  # keep map pixels >= threshold (maps are min-max scaled to [0, 1])
    # what the threshold cuts: the map ("fixed"), Otsu's cut of each map ("otsu": no threshold to tune), the map
    # over each region's own peak ("peak"), or the map's percentiles ("percentile": keep its top 1 - threshold)
    threshold_mode: Literal["fixed", "otsu", "peak", "percentile"] = "fixed"
    scale: float = 1.0  # each box resized about its centre by this (RSNA's winners: 0.875-0.9)
    # a class is predicted (gets boxes, pictures, refine's CAM proposals) above this probability;
    # "auto": each class's operating point from the checkpoint (train-classifier's F1 on validation)
    min_prob: Union[float, Literal["auto"]] = "auto"
    min_area: float = 0.001  # smallest component, as a share of the image area
    score: Literal["mean", "max", "contrast", "none"] = "mean"  # box score = probability x this CAM statistic
    top_k: int = 5  # boxes kept per class and image, best score first; 0 keeps all
    nms_iou: float = 0.5  # per-class NMS between a class's boxes; 1 disables
    normal_score: Literal["max", "product"] = "max"  # p_normal = 1 - max p, or prod(1 - p)
    # the 2-class filter on p(abnormal) = 1 - p_normal: below filter_low only the "No finding" row (RSNA: no box),
    # above filter_high the detections without it, both in between (VinBigData's winners: 0.08 and 0.95);
    # "auto": the thresholds `cxrcam calibrate` chose on its validation images (boxes.calibration), else none (0, 1)
    filter_low: Union[float, Literal["auto"]] = "auto"
    filter_high: Union[float, Literal["auto"]] = "auto"
    calibration: str = ""  # a calibration.json (cxrcam calibrate): per-class thresholds replace `threshold`


@dataclass
class DetectorConfig:
    """torchvision Faster R-CNN or RetinaNet (train-detector): Faster R-CNN with SGD and step decay as in the
    VinBigData baselines; RetinaNet with AdamW, because its focal loss gives SGD at 0.01 gradients too small
    to leave the prior within a CPU-sized run (docs/BENCHMARKS.md, issue 37)."""

    # fasterrcnn: two-stage (refine's CAM proposals join its RPN's); retinanet: single-shot, anchors sized from the
    # cache's boxes (RSNA Pneumonia's 2nd place), no proposals to add CAM boxes to
    arch: Literal["fasterrcnn", "retinanet"] = "fasterrcnn"
    global_head: bool = False  # retinanet: a global classification output whose probability multiplies box scores
    # retinanet: v2 = torchvision's retinanet_resnet50_fpn_v2 head (group norm, GIoU box loss); v1 = the original
    retinanet_head: Literal["v1", "v2"] = "v2"

    backbone: str = "resnet50"  # resnet50: torchvision ResNet-50 FPN; any other timm name: timm features + FPN
    init: str = ""  # a classifier checkpoint whose backbone weights start the detector
    trainable_layers: int = 3  # backbone stages trained when starting from a classifier (0-5)
    # a classifier checkpoint: labelled images without boxes train on its CAM pseudo-boxes (NIH, and the
    # images box_images withholds); without it they are left out
    pseudo_from: str = ""
    pseudo_weight: float = 1.0  # the loss weight of pseudo-box images against truth-box images (> 0)
    # a classifier checkpoint: its CAM proposals (jittered) join the RoI heads' training proposals, so the
    # box head learns to correct them (use with refine.proposals=cam or both)
    cam_proposals_from: str = ""
    proposal_jitter: float = 0.1  # each CAM proposal also appears twice with edges moved by up to this share
    # boxes on a seeded sample of this many training-fold images (0 = all; "none" = no box anywhere:
    # the label-only detector, which needs pseudo_from); the others train on pseudo-boxes, or are dropped
    box_images: int | Literal["none"] = 0
    augment: bool = False  # the classifier's affine + exposure augmentations, the boxes moving with the image
    # train on the images without findings too (false: the abnormal images alone, as the VinBigData winners'
    # detectors trained; the 2-class filter then keeps their false boxes off normal images)
    negatives: bool = True
    epochs: int = 12
    batch_size: int = 8  # global: divided among processes under torchrun
    # auto: sgd for fasterrcnn, adamw for retinanet; lr auto: 0.01 with sgd, 3e-4 with adamw
    optimizer: Literal["auto", "sgd", "adamw"] = "auto"
    lr: Union[float, Literal["auto"]] = "auto"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    step_size: int = 8  # decay the learning rate by gamma every step_size epochs
    gamma: float = 0.1
    warmup_iters: int = 100
    amp: Literal["auto", "fp32", "bf16", "fp16", "none"] = "auto"  # as train.amp
    workers: int = 2
    seed: int = 0
    rois_per_image: int = 512  # RoIs sampled per training image (torchvision's default; fewer is faster on CPU)
    channels: int = 256  # FPN width of a timm backbone (torchvision's 256; 64 is several times faster on CPU)
    head_size: int = 1024  # the box head's MLP width (torchvision's 1024)
    score_thresh: float = 0.01  # detections kept by the RoI heads
    detections_per_img: int = 100


# ensemble-boxes' WBF conf_type: how a fused box is scored (`cxrcam ensemble --conf-type`)
WBF_CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


@dataclass
class RefineConfig:
    """refine: the detector's RoI heads re-score CAM boxes next to (or instead of) the RPN's proposals."""

    # the RoIs: both = RPN + CAM proposals; cam = the CAM proposals alone; rpn = the plain detector's
    proposals: Literal["both", "cam", "rpn"] = "both"
    gate: Literal["product", "none"] = "product"  # product: detector score x classifier probability
    fusion: Literal["nms", "wbf"] = "nms"  # how overlapping boxes of one class merge
    # NMS / WBF IoU, and each box resized about its centre by scale; "auto": what train-detector chose on its
    # validation fold (the RSNA recipe: an NMS sweep and shrunk boxes, against the dataset's metric), else 0.5 and 1
    iou: Union[float, Literal["auto"]] = "auto"
    scale: Union[float, Literal["auto"]] = "auto"
    # boxes the detector scores below this are dropped (before the gate); "auto": train-detector's choice on
    # RSNA's score, which counts every box on an image without pneumonia (else 0)
    min_score: Union[float, Literal["auto"]] = "auto"
    top_k: int = 5  # boxes kept per class and image (0 = all)


@dataclass
class EvalConfig:
    iou_thr: float = 0.4  # a hit needs IoU strictly above this (VinBigData: 0.4)


@dataclass
class RuntimeConfig:
    """Where every command runs."""

    device: str = "auto"  # auto (a GPU where torch sees one, else the CPU), cpu, cuda, cuda:N; --device


@dataclass
class Config:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    boxes: BoxConfig = field(default_factory=BoxConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Allowed values of numeric keys, (lowest, highest) inclusive, None = unbounded; POSITIVE keys must
# be above zero. Checked once, when a config is loaded, so a bad value stops a run before it starts.
UNIT = (0.0, 1.0)
RANGES: dict[str, tuple[float | None, float | None]] = {
    "fusion.iou_thr": UNIT, "fusion.skip_box_thr": UNIT, "split.n_folds": (2, None), "split.val_fold": (-1, None),
    "prepare.size": (16, None), "prepare.workers": (0, None), "model.in_chans": (1, 3), "model.drop_rate": UNIT,
    "augment.degrees": (0, 180), "augment.translate": UNIT, "augment.scale": UNIT, "augment.brightness": UNIT,
    "augment.contrast": UNIT, "train.epochs": (1, None), "train.batch_size": (1, None),
    "train.weight_decay": (0, None), "train.momentum": UNIT, "train.warmup_epochs": (0, None),
    "train.step_size": (1, None), "train.gamma": UNIT, "train.grad_clip": (0, None), "train.workers": (0, None),
    "train.box_loss": (0, None), "train.box_images": (0, None),
    "cam.batch_size": (1, None), "cam.workers": (0, None), "boxes.threshold": UNIT, "boxes.min_prob": UNIT,
    "boxes.min_area": UNIT, "boxes.top_k": (0, None), "boxes.nms_iou": UNIT, "boxes.filter_low": UNIT,
    "boxes.filter_high": UNIT, "detector.trainable_layers": (0, 5),
    "detector.proposal_jitter": UNIT, "detector.box_images": (0, None), "detector.epochs": (1, None),
    "detector.batch_size": (1, None), "detector.momentum": UNIT, "detector.weight_decay": (0, None),
    "detector.step_size": (1, None), "detector.gamma": UNIT, "detector.warmup_iters": (0, None),
    "detector.workers": (0, None), "detector.rois_per_image": (1, None), "detector.channels": (1, None),
    "detector.head_size": (1, None), "detector.score_thresh": UNIT, "detector.detections_per_img": (1, None),
    "refine.iou": UNIT, "refine.min_score": UNIT, "refine.top_k": (0, None), "eval.iou_thr": UNIT,
}
POSITIVE = {"train.lr", "detector.lr", "detector.pseudo_weight", "boxes.scale", "refine.scale", "model.lse_r",
            "model.csra_lambda"}


def check_ranges(config: Config) -> None:
    """One readable line for the first value outside its range (``cam.batch_size=0``, ``prepare.workers=-2``)."""
    for key, (low, high) in [*RANGES.items(), *((k, (None, None)) for k in POSITIVE)]:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if isinstance(value, (str, bool)):  # "none", or a flag: not numeric
            continue
        if key in POSITIVE and not value > 0:
            raise CxrcamError(f"config key {key!r}: {value!r} must be above 0")
        if not ((low is None or value >= low) and (high is None or value <= high)):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise CxrcamError(f"config key {key!r}: {value!r} must be {bounds}")
    low, high = config.boxes.filter_low, config.boxes.filter_high
    if not isinstance(low, str) and not isinstance(high, str) and low > high:
        raise CxrcamError(f"config keys 'boxes.filter_low' ({config.boxes.filter_low}) and 'boxes.filter_high' "
                          f"({config.boxes.filter_high}): the low threshold of the 2-class filter must not exceed the high")


def _describe(tp: Any) -> str:
    """A type annotation in words, for a user's error line ("an integer or 'none'")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = [repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp)]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise CxrcamError(f"config key {key!r}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except CxrcamError:
                pass
        raise CxrcamError(f"config key {key!r}: {value!r} is not {_describe(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise CxrcamError(f"config key {key!r}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise CxrcamError(f"config key {key!r}: expected {_describe(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting keys it does not define."""
    if not isinstance(data, dict):
        raise CxrcamError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = (f"; did you mean {prefix + close[0]!r}?" if close
                    else f"; {prefix or 'sections'}: {', '.join(sorted(names))}")
            raise CxrcamError(f"unknown config key {prefix + str(key)!r}{hint}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


SHIPPED = Path(__file__).resolve().parent / "configs"  # the YAML files the package ships


def shipped_configs() -> list[str]:
    """The names ``--config`` takes besides a path: tiny, resnet50, densenet121, default."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A YAML file the user names: a path that exists, else a shipped config by name (``resnet50``
    or ``resnet50.yaml``). One readable error otherwise, listing the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise CxrcamError(f"config {str(name_or_path)!r} does not exist as a file, nor as a shipped config "
                      f"({', '.join(shipped_configs())})")


def parse_override(text: str) -> dict[str, Any]:
    """``"fusion.iou_thr=0.5"`` -> ``{"fusion": {"iou_thr": 0.5}}`` (value read as YAML)."""
    if "=" not in text:
        raise CxrcamError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CxrcamError(f"override {text!r}: the value {raw!r} is not valid YAML ({problem}); "
                          f"quote text that holds YAML signs") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults <- YAML file (a path, or a shipped config's name) <- overrides, validated into a
    :class:`Config`."""
    data = dataclasses.asdict(Config())
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise CxrcamError(f"config file {path} is not a text (YAML) file") from None
        except yaml.YAMLError as exc:
            raise CxrcamError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise CxrcamError(f"config file {path} must hold a mapping of sections")
        data = _merge(data, loaded)
    for text in overrides:
        data = _merge(data, parse_override(text))
    config = from_dict(Config, data)
    check_ranges(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
