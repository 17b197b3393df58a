"""The threshold sweep behind ``cxrcam calibrate``: maps computed once, boxes re-cut in memory.

Each (image, class) the calibration needs keeps its :func:`~cxrcam.boxes.components` at every
threshold of :data:`SWEEP`, cut from the map at the model's input size as ``localize`` cuts it
(boxes in original pixels with every box statistic), so that a box setting
(threshold, score, min_area) costs a filter and a sort, not a forward pass. For each class and
setting, the boxes of the images where the class is predicted are scored with VinBigData's
AP@0.4 (:func:`~cxrcam.evaluation.detection.ap_of`), exactly as ``localize`` +
``evaluate`` would score them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from cxrcam.boxes import rate_components, resize_boxes, select_boxes
from cxrcam.boxes.from_cam import NO_COMPONENTS, T
from cxrcam.config import BoxConfig
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.evaluation.detection import ap_of, truth_by_image
from cxrcam.evaluation.weak import CAM_THRESHOLDS

SWEEP = tuple(t for t in CAM_THRESHOLDS if 0.05 <= t <= 0.95)  # 0.05, 0.06, ... 0.95
COARSE = SWEEP[::5]  # 0.05, 0.10, ... 0.95: the grid the other box settings are tried on
SCORES = ("mean", "max", "contrast", "none")
SCALES = (0.6, 0.7, 0.8, 0.875, 0.9, 1.0, 1.1, 1.25, 1.5)  # box scales calibrate tries (boxes.scale)
MIN_AREAS = (0.0, 0.001, 0.01)
_INDEX = {t: k for k, t in enumerate(SWEEP)}


@dataclass
class Pair:
    """One image and class: its probability and its map's components (original pixels)."""

    image_id: str
    class_id: int
    prob: float
    predicted: bool  # the class gets boxes in localize (prob above its decision threshold)
    rows: np.ndarray = field(default_factory=lambda: NO_COMPONENTS)  # components() at every SWEEP threshold
    size: tuple[float, float] = (np.inf, np.inf)  # the image's (height, width): what resized boxes stay within


@dataclass
class ClassMaps:
    """One class's predicted pairs with their components stacked by threshold, so that a box
    setting is applied to every image at once."""

    image_ids: np.ndarray  # per pair
    probs: np.ndarray  # per pair
    sizes: np.ndarray  # per pair: (height, width)
    by_threshold: dict[int, tuple[np.ndarray, np.ndarray]]  # SWEEP index -> (pair of each row, rows)

    @classmethod
    def of(cls, pairs: list[Pair]) -> "ClassMaps":
        pairs = [p for p in pairs if p.predicted]  # localize boxes only the predicted classes
        rows = np.concatenate([NO_COMPONENTS, *(p.rows for p in pairs)])
        owner = np.repeat(np.arange(len(pairs)), [len(p.rows) for p in pairs])
        order = np.lexsort((owner, rows[:, T]))  # by threshold, then pair, each pair's rows in order
        keys, starts = np.unique(rows[order, T].astype(np.int64), return_index=True)
        split = zip(np.split(owner[order], starts[1:]), np.split(rows[order], starts[1:]))
        return cls(np.array([p.image_id for p in pairs], dtype=object), np.array([p.prob for p in pairs]),
                   np.array([p.size for p in pairs], np.float64).reshape(-1, 2),
                   dict(zip(keys.tolist(), split)) if len(rows) else {})


def class_boxes(maps: ClassMaps, threshold: float, config: BoxConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, boxes, scores): what localize would write for these maps with ``config`` cut
    at ``threshold``: :func:`~cxrcam.boxes.score_components` per image, vectorised where an
    image has one component (no NMS or top-k to apply), per image where it has several; each box
    resized by ``config.scale`` within its image."""
    owner, rows = maps.by_threshold.get(_INDEX[threshold], (np.zeros(0, np.int64), NO_COMPONENTS))
    keep, boxes, stat = rate_components(rows, config)
    owner = owner[keep]
    scores = maps.probs[owner] * stat
    several = np.bincount(owner, minlength=len(maps.probs))[owner] > 1
    parts = [(owner[~several], np.zeros((~several).sum(), np.int64), boxes[~several], scores[~several])]
    for p in np.unique(owner[several]):
        b, s = select_boxes(boxes[owner == p], scores[owner == p], config.top_k, config.nms_iou)
        parts.append((np.full(len(b), p), np.arange(len(b)), b, s))
    owner, rank, boxes, scores = (np.concatenate(v) for v in zip(*parts))
    order = np.lexsort((rank, owner))  # pair by pair, each one's boxes best first, as localize writes them
    owner, boxes = owner[order], boxes[order].reshape(-1, 4)
    boxes = resize_boxes(boxes, config.scale, maps.sizes[owner, 1], maps.sizes[owner, 0])
    return maps.image_ids[owner], boxes, scores[order]


def ap_curve(maps: ClassMaps, truth: dict[str, np.ndarray], config: BoxConfig, iou_thr: float,
             thresholds=SWEEP, half: Callable[[str], int] | None = None) -> np.ndarray:
    """AP@iou_thr of one class at each threshold (truth: image_id -> that class's boxes). With
    ``half`` (image_id -> 0 or 1), three rows: all images, then each half, from the same boxes."""
    return ap_at(maps, truth, [(t, config) for t in thresholds], iou_thr, half)


def ap_at(maps: ClassMaps, truth: dict[str, np.ndarray], settings: list[tuple[float, BoxConfig]], iou_thr: float,
          half: Callable[[str], int] | None = None) -> np.ndarray:
    """AP@iou_thr of one class at each (threshold, box setting); with ``half``, as :func:`ap_curve`."""
    if half is None:
        return np.array([ap_of(truth, *class_boxes(maps, t, config), iou_thr)[0] for t, config in settings])
    subsets = [{k: v for k, v in truth.items() if half(k) == h} for h in (0, 1)]
    out = np.zeros((3, len(settings)))
    for k, (t, config) in enumerate(settings):
        ids, boxes, scores = class_boxes(maps, t, config)
        out[0, k] = ap_of(truth, ids, boxes, scores, iou_thr)[0]
        halves = np.array([half(i) for i in ids], dtype=np.int64)
        for h, sub in enumerate(subsets):
            out[1 + h, k] = ap_of(sub, ids[halves == h], boxes[halves == h], scores[halves == h], iou_thr)[0]
    return out


def best_threshold(curve: np.ndarray, thresholds=SWEEP) -> tuple[float, float]:
    """(threshold, AP) at the curve's maximum; on a plateau, its middle (the least fragile choice)."""
    best = np.flatnonzero(curve >= curve.max() - 1e-9)
    k = int(best[len(best) // 2])
    return float(thresholds[k]), float(curve[k])


def on_grid(threshold: float) -> float:
    """The point of :data:`SWEEP` nearest ``threshold`` (the configured one, for its AP)."""
    return float(min(SWEEP, key=lambda t: abs(t - threshold)))


def choose_threshold(curve, default: float) -> tuple[float, float]:
    """(threshold, AP): :func:`best_threshold` where it beats ``default`` (snapped to the grid),
    else the default: a flat or all-zero curve, as few boxes give, keeps the configured value."""
    curve = np.asarray(curve, np.float64)
    default_t = on_grid(default)
    if not np.isfinite(curve).all():  # no truth to choose by (a half without the class's boxes)
        return default_t, float(curve[SWEEP.index(default_t)])
    threshold, ap = best_threshold(curve)
    ap_default = float(curve[SWEEP.index(default_t)])
    return (threshold, ap) if ap > ap_default + 1e-9 else (default_t, ap_default)


def sweep_class(pairs: list[Pair], truth: pd.DataFrame, class_id: int, config: BoxConfig, iou_thr: float,
                others: bool = True, half: Callable[[str], int] | None = None) -> dict:
    """For one class: AP against threshold with ``config``'s score and min_area (every 0.01), the
    best threshold, and (``others``) the best (score, min_area, threshold) of all (the others every
    0.05); ``config.threshold`` is snapped to the grid. Without truth boxes the curve is NaN.
    ``half`` (image_id -> 0 or 1): also each half's curve (``halves``), from the same boxes."""
    by_image, maps = truth_by_image(truth), ClassMaps.of(pairs)
    curves = ap_curve(maps, by_image, config, iou_thr, half=half)
    curve = curves if half is None else curves[0]
    threshold, ap = choose_threshold(curve, config.threshold)
    ap_default = float(curve[SWEEP.index(on_grid(config.threshold))])
    result = {"class_id": class_id, "n_truth": len(truth), "threshold": threshold, "ap": ap,
              "ap_default": ap_default, "curve": [float(v) for v in curve]}
    if half is not None:
        result["halves"] = [[float(v) for v in c] for c in curves[1:]]
    best = {"score": config.score, "min_area": config.min_area, "threshold": threshold, "ap": ap}
    for score in SCORES if others else ():
        for min_area in MIN_AREAS:
            if (score, min_area) == (config.score, config.min_area):
                continue
            t, a = best_threshold(ap_curve(maps, by_image, dataclasses.replace(
                config, score=score, min_area=min_area), iou_thr, COARSE), COARSE)
            if a > best["ap"] + 1e-9:
                best = {"score": score, "min_area": min_area, "threshold": t, "ap": a}
    result["best_setting"] = best
    return result


def truth_of(truth: pd.DataFrame, class_id: int) -> pd.DataFrame:
    return truth.loc[truth["class_id"] == class_id, ["image_id", "class_id", *BOX_COLUMNS]]


__all__ = ["Pair", "ClassMaps", "SWEEP", "SCORES", "SCALES", "MIN_AREAS", "class_boxes", "ap_curve", "ap_at",
           "best_threshold", "on_grid", "choose_threshold", "sweep_class", "truth_of"]
