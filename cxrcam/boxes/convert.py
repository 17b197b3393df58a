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


def resize_boxes(boxes: np.ndarray, factor: float, width: float | np.ndarray, height: float | np.ndarray
                 ) -> np.ndarray:
    """xyxy boxes grown (factor > 1) or shrunk about their centres, within [0, width] x [0, height]:
    ``boxes.scale``, since readers' box conventions differ from a map's extent (RSNA's winners
    shrank their boxes to 87.5-90%). ``width``, ``height``: one frame, or one per box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if factor == 1:
        return b.copy()
    centre, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) * factor / 2
    limit = np.stack(np.broadcast_arrays(width, height, width, height), -1)
    return np.clip(np.concatenate([centre - half, centre + half], axis=1), 0, limit)
