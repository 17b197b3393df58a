"""Pairwise overlap measures on xyxy boxes (continuous coordinates, float64)."""
from __future__ import annotations

import numpy as np


def _areas(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas, len(a) x len(b)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union, len(a) x len(b) (same as torchvision.ops.box_iou, in float64)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = intersection(a, b)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_iobb(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Intersection over the predicted box's area (ChestX-ray8's IoBB), len(truth) x len(pred)."""
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    inter = intersection(truth, pred)
    area = np.broadcast_to(_areas(pred)[None, :], inter.shape)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def points_in_boxes(boxes: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether point i lies in box i, edges included (the pointing game); False for a NaN point."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])
