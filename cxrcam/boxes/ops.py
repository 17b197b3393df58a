"""Overlap measures on xyxy boxes (continuous coordinates, float64)."""
from __future__ import annotations

import numpy as np


def _areas(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _boxes(b) -> np.ndarray:
    return np.asarray(b, np.float64).reshape(-1, 4)


def _inter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of boxes broadcast against each other (the last axis holds xyxy)."""
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = _inter(a, b)
    union = _areas(a) + _areas(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _iobb(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    inter = _inter(truth, pred)
    area = np.broadcast_to(_areas(pred), inter.shape)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas, len(a) x len(b)."""
    return _inter(_boxes(a)[:, None], _boxes(b)[None])


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union, len(a) x len(b) (same as torchvision.ops.box_iou, in float64)."""
    return _iou(_boxes(a)[:, None], _boxes(b)[None])


def pairwise_iobb(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Intersection over the predicted box's area (ChestX-ray8's IoBB), len(truth) x len(pred)."""
    return _iobb(_boxes(truth)[:, None], _boxes(pred)[None])


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box i of ``a`` with box i of ``b`` (the same formula as :func:`pairwise_iou`)."""
    return _iou(_boxes(a), _boxes(b))


def paired_iobb(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoBB of truth box i with predicted box i (as :func:`pairwise_iobb`)."""
    return _iobb(_boxes(truth), _boxes(pred))


def points_in_boxes(boxes: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether point i lies in box i, edges included (the pointing game); False for a NaN point."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])
