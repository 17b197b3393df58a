"""Heat map -> scored boxes: threshold, connected components, one box per component.

For one class of one image with probability ``p`` and a heat map scaled to [0, 1]:

1. keep pixels with map >= ``threshold`` (0.65 by default);
2. label 8-connected components (OpenCV) and drop those smaller than ``min_area`` (a share
   of the image area);
3. box = the component's pixel extent on continuous coordinates ([x, x + w]);
4. score = p x the map's mean inside the component (``score="mean"``), or its maximum
   (``"max"``), or p alone (``"none"``): among boxes of one class, a stronger or more
   uniform activation ranks first, and across classes the classifier's confidence leads;
5. per-class NMS at ``nms_iou`` (torchvision) and the ``top_k`` best boxes.

``maps_to_boxes`` does this for a batch: each image's chosen classes, from one array of maps.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from cxrcam.config import BoxConfig

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's boxes N x 4 xyxy, class ids, scores


def cam_to_boxes(cam: np.ndarray, prob: float, config: BoxConfig = BoxConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N x 4 xyxy, in the map's pixels) and scores for one class's map (H x W in [0, 1])."""
    cam = np.asarray(cam, dtype=np.float32)
    mask = (cam >= config.threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= config.min_area * cam.size]
    if not keep:
        return np.zeros((0, 4)), np.zeros(0)
    x, y = stats[keep, cv2.CC_STAT_LEFT], stats[keep, cv2.CC_STAT_TOP]
    boxes = np.stack([x, y, x + stats[keep, cv2.CC_STAT_WIDTH], y + stats[keep, cv2.CC_STAT_HEIGHT]], 1)
    if config.score == "mean":
        stat = np.bincount(labels.ravel(), weights=cam.ravel(), minlength=n)[keep] / stats[keep, cv2.CC_STAT_AREA]
    elif config.score == "max":
        stat = np.array([cam[labels == i].max() for i in keep])
    else:
        stat = np.ones(len(keep))
    return select_boxes(boxes.astype(np.float64), prob * stat, config.top_k, config.nms_iou)


def maps_to_boxes(cams: np.ndarray, classes: Sequence[int], wanted: Sequence[Sequence[int]],
                  probs: np.ndarray | None = None, config: BoxConfig = BoxConfig()) -> list[Detections]:
    """Each image's boxes (map pixels) of its ``wanted`` classes.

    cams: B x len(classes) x H x W, the scaled maps of ``classes``; probs: B x all classes, the
    probability each box score starts from (None: 1)."""
    column = {int(c): k for k, c in enumerate(classes)}
    out = []
    for b, chosen in enumerate(wanted):
        boxes, labels, scores = [np.zeros((0, 4))], [np.zeros(0, np.int64)], [np.zeros(0)]
        for c in chosen:
            bx, sc = cam_to_boxes(cams[b, column[int(c)]], 1.0 if probs is None else float(probs[b, c]), config)
            boxes.append(bx)
            scores.append(sc)
            labels.append(np.full(len(bx), int(c), np.int64))
        out.append((np.concatenate(boxes), np.concatenate(labels), np.concatenate(scores)))
    return out


def select_boxes(boxes: np.ndarray, scores: np.ndarray, top_k: int = 0, nms_iou: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """NMS (torchvision) among one class's boxes, then the ``top_k`` best (0 = all), best first."""
    order = np.argsort(-scores, kind="stable")
    if nms_iou < 1 and len(boxes) > 1:
        import torch  # here, so that data loading workers need not import torch for box geometry
        from torchvision.ops import nms

        order = nms(torch.from_numpy(boxes), torch.from_numpy(scores.astype(np.float64)), nms_iou).numpy()
    if top_k > 0:
        order = order[:top_k]
    return boxes[order], scores[order]


def cam_peak(cam: np.ndarray) -> tuple[float, float]:
    """Centre of the map's hottest pixel (x, y), for the pointing game."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return x + 0.5, y + 0.5
