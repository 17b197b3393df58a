"""The RSNA Pneumonia Detection metric.

Per image: for each IoU threshold t in 0.40, 0.45, ..., 0.75, predictions in confidence order
are matched to the free truth box of highest IoU when that IoU is above t; the image scores the
mean over t of TP / (TP + FP + FN). An image with no truth and any prediction scores 0; with
no truth and no prediction it is skipped. The metric is the mean over scored images.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxrcam.boxes import pairwise_iou
from cxrcam.data.tables import BOX_COLUMNS

THRESHOLDS = np.round(np.arange(0.40, 0.751, 0.05), 2)


def image_score(truth: np.ndarray, pred: np.ndarray, scores: np.ndarray) -> float | None:
    if len(truth) == 0:
        return None if len(pred) == 0 else 0.0
    pred = pred[np.argsort(-scores, kind="stable")]
    iou = pairwise_iou(pred, truth)
    values = []
    for t in THRESHOLDS:
        used = np.zeros(len(truth), bool)
        tp = 0
        for row in iou:
            free = np.where(used, -1.0, row)
            j = int(np.argmax(free)) if len(free) else -1
            if j >= 0 and free[j] > t:
                used[j] = True
                tp += 1
        fp, fn = len(pred) - tp, len(truth) - tp
        values.append(tp / (tp + fp + fn))
    return float(np.mean(values))


def image_scores(truth: pd.DataFrame, detections: pd.DataFrame, image_ids: list[str]) -> np.ndarray:
    """Each image's score in the order of ``image_ids`` (NaN: skipped, no truth and no prediction):
    what the bootstrap re-weights."""
    gt = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby("image_id")}
    dt = {k: g for k, g in detections.groupby("image_id")}
    out = np.full(len(image_ids), np.nan)
    for k, image_id in enumerate(image_ids):
        d = dt.get(image_id)
        s = image_score(gt.get(image_id, np.zeros((0, 4))),
                        np.zeros((0, 4)) if d is None else d[BOX_COLUMNS].to_numpy(np.float64),
                        np.zeros(0) if d is None else d["score"].to_numpy(np.float64))
        if s is not None:
            out[k] = s
    return out


def summary(scores: np.ndarray) -> tuple[float, int]:
    """(metric, number of images scored) from :func:`image_scores`."""
    scored = scores[np.isfinite(scores)]
    return (float(scored.mean()) if len(scored) else float("nan")), len(scored)


def rsna_score(truth: pd.DataFrame, detections: pd.DataFrame, image_ids: list[str]) -> tuple[float, int]:
    """(metric, number of images scored) over ``image_ids``."""
    return summary(image_scores(truth, detections, image_ids))
