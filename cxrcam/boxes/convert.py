"""Box format conversions. The only place coordinates change format or frame.

Boxes are float arrays of shape (N, 4) on continuous coordinates (no "+1" pixel):
xyxy = x_min, y_min, x_max, y_max; xywh = x_min, y_min, width, height (NIH, RSNA, COCO).
"""
from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def scale_boxes(boxes: np.ndarray, sx: float | np.ndarray, sy: float | np.ndarray) -> np.ndarray:
    """Map xyxy boxes between frames (original pixels <-> a resized image) by per-axis
    scale factors; the inverse mapping is the same call with 1/sx, 1/sy."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.stack([np.broadcast_to(sx, len(b)), np.broadcast_to(sy, len(b))] * 2, axis=1)
    return b * s
