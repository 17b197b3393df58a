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

import numpy as np
import pandas as pd

from cxrcam.boxes import score_components
from cxrcam.boxes.from_cam import T
from cxrcam.config import BoxConfig
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.evaluation.detection import ap_of, truth_by_image
from cxrcam.evaluation.weak import CAM_THRESHOLDS

SWEEP = tuple(t for t in CAM_THRESHOLDS if 0.05 <= t <= 0.95)  # 0.05, 0.06, ... 0.95
COARSE = SWEEP[::5]  # 0.05, 0.10, ... 0.95: the grid the other box settings are tried on
SCORES = ("mean", "max", "contrast", "none")
MIN_AREAS = (0.0, 0.001, 0.01)
_INDEX = {t: k for k, t in enumerate(SWEEP)}


@dataclass
class Pair:
    """One image and class: its probability and its map's components (original pixels)."""

    image_id: str
    class_id: int
    prob: float
    predicted: bool  # the class gets boxes in localize (prob > boxes.min_prob)
    by_threshold: dict[int, np.ndarray] = field(default_factory=dict)  # SWEEP index -> components


def split_by_threshold(rows: np.ndarray) -> dict[int, np.ndarray]:
    """components() rows grouped by their threshold index."""
    order = np.argsort(rows[:, T], kind="stable")
    rows = rows[order]
    keys, starts = np.unique(rows[:, T].astype(np.int64), return_index=True)
    return dict(zip(keys.tolist(), np.split(rows, starts[1:])))


def class_boxes(pairs: list[Pair], threshold: float, config: BoxConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, boxes, scores): what localize would write for these pairs with ``config`` cut at ``threshold``."""
    k, ids, boxes, scores = _INDEX[threshold], [], [np.zeros((0, 4))], [np.zeros(0)]
    for p in pairs:
        found = p.by_threshold.get(k)
        if p.predicted and found is not None:
            b, s = score_components(found, p.prob, config)
            ids += [p.image_id] * len(b)
            boxes.append(b)
            scores.append(s)
    return np.array(ids, dtype=object), np.concatenate(boxes), np.concatenate(scores)


def ap_curve(pairs: list[Pair], truth: dict[str, np.ndarray], config: BoxConfig, iou_thr: float,
             thresholds=SWEEP) -> np.ndarray:
    """AP@iou_thr of one class at each threshold (truth: image_id -> that class's boxes)."""
    return np.array([ap_of(truth, *class_boxes(pairs, t, config), iou_thr)[0] for t in thresholds])


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
    threshold, ap = best_threshold(curve)
    ap_default = float(curve[SWEEP.index(default_t)])
    return (threshold, ap) if ap > ap_default + 1e-9 else (default_t, ap_default)


def sweep_class(pairs: list[Pair], truth: pd.DataFrame, class_id: int, config: BoxConfig, iou_thr: float
                ) -> dict:
    """For one class: AP against threshold with ``config``'s score and min_area (every 0.01), the
    best threshold, and the best (score, min_area, threshold) of all (the others every 0.05);
    ``config.threshold`` is snapped to the grid."""
    by_image = truth_by_image(truth)
    curve = ap_curve(pairs, by_image, config, iou_thr)
    threshold, ap = choose_threshold(curve, config.threshold)
    ap_default = float(curve[SWEEP.index(on_grid(config.threshold))])
    result = {"class_id": class_id, "n_truth": len(truth), "threshold": threshold, "ap": ap,
              "ap_default": ap_default, "curve": [float(v) for v in curve]}
    best = {"score": config.score, "min_area": config.min_area, "threshold": threshold, "ap": ap}
    for score in SCORES:
        for min_area in MIN_AREAS:
            if (score, min_area) == (config.score, config.min_area):
                continue
            t, a = best_threshold(ap_curve(pairs, by_image, dataclasses.replace(
                config, score=score, min_area=min_area), iou_thr, COARSE), COARSE)
            if a > best["ap"] + 1e-9:
                best = {"score": score, "min_area": min_area, "threshold": t, "ap": a}
    result["best_setting"] = best
    return result


def truth_of(truth: pd.DataFrame, class_id: int) -> pd.DataFrame:
    return truth.loc[truth["class_id"] == class_id, ["image_id", "class_id", *BOX_COLUMNS]]


__all__ = ["Pair", "SWEEP", "SCORES", "MIN_AREAS", "split_by_threshold", "class_boxes", "ap_curve",
           "best_threshold", "on_grid", "choose_threshold", "sweep_class", "truth_of"]
