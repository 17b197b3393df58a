"""Heat map -> scored boxes: threshold, connected components, one box per component.

For one class of one image with probability ``p`` and a heat map scaled to [0, 1]:

1. keep pixels with map >= ``threshold`` (0.65 by default, or the class's calibrated value); with
   ``threshold_mode`` other than "fixed" the threshold cuts a map derived from this one
   (:func:`cut_map`: Otsu's cut, each region's own peak, or a percentile of the map), so that it
   follows each map's own contrast (CheXlocalize found Otsu as good as per-class thresholds);
2. label 8-connected components (OpenCV) and drop those smaller than ``min_area`` (a share
   of the image area);
3. box = the component's pixel extent on continuous coordinates ([x, x + w]);
4. score = p x a statistic of the map: its mean inside the component (``score="mean"``), its
   maximum (``"max"``), the contrast of the box with a ring around it (``"contrast"``: mean
   inside the box minus mean in the ring, at least 0), or p alone (``"none"``): among boxes
   of one class, a stronger or more distinct activation ranks first, and across classes the
   classifier's confidence leads;
5. per-class NMS at ``nms_iou`` (torchvision) and the ``top_k`` best boxes;
6. each box resized about its centre by ``scale`` (:func:`~cxrcam.boxes.convert.resize_boxes`).

:func:`components` does steps 1-3 (and every statistic) at many thresholds at once, so that
``cxrcam calibrate`` sweeps thresholds, scores and areas over maps computed once;
:func:`cam_to_boxes` is the same at one threshold, and ``maps_to_boxes`` runs it for a batch,
each class with its own settings (:class:`BoxRules`). :func:`cam_proposals` gives a detector
the components of several thresholds at once (``cxrcam refine``, ``detector.cam_proposals_from``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from cxrcam.boxes.convert import resize_boxes
from cxrcam.config import BoxConfig

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's boxes N x 4 xyxy, class ids, scores

# the columns of a components() row: threshold index, box (map pixels), area share, and the statistics
COMPONENT_COLUMNS = ("t", "x0", "y0", "x1", "y1", "area", "mean", "max", "contrast")
T, X0, Y0, X1, Y1, AREA, MEAN, MAX, CONTRAST = range(len(COMPONENT_COLUMNS))
NO_COMPONENTS = np.zeros((0, len(COMPONENT_COLUMNS)))
STAT_COLUMN = {"mean": MEAN, "max": MAX, "contrast": CONTRAST}
RING = 0.5  # the contrast ring is the box grown by this share of its side, minus the box


THRESHOLD_MODES = ("fixed", "otsu", "peak", "percentile")
PEAK_FLOOR = 0.2  # "peak": a region is a connected part of the map above this (a fifth of the map's peak)


def cut_map(cam: np.ndarray, mode: str = "fixed") -> np.ndarray:
    """The map a threshold ``t`` cuts, by ``boxes.threshold_mode``:

    * "fixed": the map itself (keep map >= t);
    * "otsu": 1 where the map is at or above Otsu's threshold of this map, else 0 (every t in
      (0, 1] gives Otsu's cut: nothing to tune);
    * "peak": the map over the peak of its own region (the connected part above :data:`PEAK_FLOOR`
      holding it), 0 outside regions: keep what is above t x its region's peak, so a second,
      weaker finding gets a box of its own extent;
    * "percentile": each pixel's rank in the map (share of the map's pixels below it): keep the
      top 1 - t of the map."""
    cam = np.asarray(cam, dtype=np.float32)
    if mode == "fixed":
        return cam
    if mode == "otsu":
        level, _ = cv2.threshold(np.round(cam * 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return (np.round(cam * 255) > level).astype(np.float32)  # OpenCV's THRESH_BINARY: above the level
    if mode == "peak":
        n, labels = cv2.connectedComponents((cam >= PEAK_FLOOR).view(np.uint8), connectivity=8)
        peak = np.zeros(n)
        np.maximum.at(peak, labels.ravel(), cam.ravel())
        peak[0] = np.inf  # outside every region: 0
        return (cam / peak[labels]).astype(np.float32)
    if mode == "percentile":
        flat = cam.ravel()
        return (np.searchsorted(np.sort(flat), flat, side="left") / flat.size).reshape(cam.shape).astype(np.float32)
    raise ValueError(f"unknown threshold mode {mode!r}; choose one of {', '.join(THRESHOLD_MODES)}")


def components(cam: np.ndarray, thresholds: Sequence[float], statistics: bool = True, mode: str = "fixed"
               ) -> np.ndarray:
    """Every connected component of ``cut >= t`` for each ``t`` (``cut``: :func:`cut_map` of ``cam``
    by ``mode``): rows of (index of t, x0, y0, x1, y1, area share, mean, max, contrast), boxes in
    map pixels, the statistics of ``cam`` itself (``statistics=False``: the last three are 0, for
    callers that need the boxes alone)."""
    cam = np.asarray(cam, dtype=np.float32)
    cut = cut_map(cam, mode)
    h, w = cam.shape
    values = cam.astype(np.float64)
    index, found, sums, peaks = [], [], [], []  # per threshold with components: its index, stats, ...
    for k, t in enumerate(thresholds):
        mask = cut >= t
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        if n <= 1:
            continue
        index.append(k)
        found.append(stats[1:])
        if statistics:
            # one pass over the pixels above t for every component's sum and peak; the box
            # geometry and contrast are vectorised over all thresholds below
            inside = values[mask]
            if n == 2:  # one component, the usual case
                sums.append(inside.sum(keepdims=True))
                peaks.append(inside.max(keepdims=True))
                continue
            label = labels[mask]
            sums.append(np.bincount(label, weights=inside, minlength=n)[1:])
            peak = np.full(n, -np.inf)
            np.maximum.at(peak, label, inside)
            peaks.append(peak[1:])
    if not index:
        return NO_COMPONENTS
    stats = np.concatenate(found).astype(np.float64)
    index = np.repeat(index, [len(f) for f in found])
    area = stats[:, cv2.CC_STAT_AREA]
    x0, y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    x1, y1 = x0 + stats[:, cv2.CC_STAT_WIDTH], y0 + stats[:, cv2.CC_STAT_HEIGHT]
    head = [index, x0, y0, x1, y1, area / cam.size]
    if not statistics:
        return np.stack([*head, *np.zeros((3, len(area)))], 1)
    integral = cv2.integral(cam, sdepth=cv2.CV_64F)
    gx, gy = np.ceil(RING * (x1 - x0)), np.ceil(RING * (y1 - y0))
    ox0, oy0 = np.maximum(x0 - gx, 0), np.maximum(y0 - gy, 0)
    ox1, oy1 = np.minimum(x1 + gx, w), np.minimum(y1 + gy, h)
    inner, outer = _box_sum(integral, x0, y0, x1, y1), _box_sum(integral, ox0, oy0, ox1, oy1)
    inner_area, ring_area = (x1 - x0) * (y1 - y0), (ox1 - ox0) * (oy1 - oy0) - (x1 - x0) * (y1 - y0)
    ring_mean = np.divide(outer - inner, ring_area, out=np.zeros(len(area)), where=ring_area > 0)
    contrast = np.clip(inner / inner_area - ring_mean, 0, None)
    return np.stack([*head, np.concatenate(sums) / area, np.concatenate(peaks), contrast], 1)


def _box_sum(integral: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    x0, y0, x1, y1 = (np.asarray(v, np.int64) for v in (x0, y0, x1, y1))
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def rate_components(rows: np.ndarray, config: BoxConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2 and 4 on components() rows: (rows kept by min_area, their boxes, the statistic
    their score multiplies the probability by)."""
    keep = rows[:, AREA] >= config.min_area
    stat = np.ones(int(keep.sum())) if config.score == "none" else rows[keep, STAT_COLUMN[config.score]]
    return keep, rows[keep, X0:Y1 + 1], stat


def score_components(rows: np.ndarray, prob: float, config: BoxConfig, size: tuple[float, float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2, 4, 5 and 6 on the components of one threshold: boxes and scores, best first
    (``size``: the (height, width) the resized boxes stay within)."""
    _, boxes, stat = rate_components(rows, config)
    boxes, scores = select_boxes(boxes, prob * stat, config.top_k, config.nms_iou)
    return resize_boxes(boxes, config.scale, size[1], size[0]), scores


def cam_to_boxes(cam: np.ndarray, prob: float, config: BoxConfig = BoxConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N x 4 xyxy, in the map's pixels) and scores for one class's map (H x W in [0, 1])."""
    return score_components(components(cam, [config.threshold], mode=config.threshold_mode), prob, config, cam.shape)


@dataclass
class BoxRules:
    """Each class's box settings: ``default`` unless a calibration set its own
    (:func:`cxrcam.calibration.box_rules` builds them from a calibration.json)."""

    default: BoxConfig = field(default_factory=BoxConfig)
    per_class: dict[int, BoxConfig] = field(default_factory=dict)

    def __call__(self, class_id: int) -> BoxConfig:
        return self.per_class.get(int(class_id), self.default)


MapOf = Callable[[int, int], np.ndarray]  # (image b of the batch, class c) -> its scaled map (H x W)


def _map_of(maps: np.ndarray | MapOf, classes: Sequence[int] | None) -> MapOf:
    """Maps as ``CamOutput`` gives them (B x len(classes) x H x W, with ``classes``), or a lookup
    (``MapBatch.map``, whose images each have their own classes; ``classes`` None)."""
    if callable(maps):
        return maps
    column = {int(c): k for k, c in enumerate(classes)}
    return lambda b, c: maps[b, column[int(c)]]


def maps_to_boxes(maps: np.ndarray | MapOf, classes: Sequence[int] | None, wanted: Sequence[Sequence[int]],
                  probs: np.ndarray | None = None, rules: BoxConfig | BoxRules = BoxConfig()) -> list[Detections]:
    """Each image's boxes (map pixels) of its ``wanted`` classes.

    maps: B x len(classes) x H x W, the scaled maps of ``classes``, or (``classes`` None) a lookup
    ``maps(b, c)``: image b's map of class c (``MapBatch.map``); probs: B x all classes, the
    probability each box score starts from (None: 1); rules: one setting, or one per class."""
    rules = rules if isinstance(rules, BoxRules) else BoxRules(rules)
    map_of = _map_of(maps, classes)
    out = []
    for b, chosen in enumerate(wanted):
        boxes, labels, scores = [np.zeros((0, 4))], [np.zeros(0, np.int64)], [np.zeros(0)]
        for c in chosen:
            bx, sc = cam_to_boxes(map_of(b, c), 1.0 if probs is None else float(probs[b, c]), rules(c))
            boxes.append(bx)
            scores.append(sc)
            labels.append(np.full(len(bx), int(c), np.int64))
        out.append((np.concatenate(boxes), np.concatenate(labels), np.concatenate(scores)))
    return out


PROPOSAL_OFFSETS = (-0.15, 0.0, 0.15)  # cam_proposals cuts each map at its class's threshold + these


def cam_proposals(maps: np.ndarray | MapOf, classes: Sequence[int] | None, wanted: Sequence[Sequence[int]],
                  rules: BoxConfig | BoxRules = BoxConfig()) -> list[np.ndarray]:
    """Each image's CAM proposals for a detector's RoI heads (map pixels, class-agnostic): every
    component (>= ``min_area``) of each ``wanted`` class's map at the class's threshold and at
    ``PROPOSAL_OFFSETS`` around it, duplicates removed, no NMS or top-k. Several thresholds
    give the nested boxes a box head can choose among; as submission boxes they halve the mAP
    (docs/BENCHMARKS.md, issue 14)."""
    rules = rules if isinstance(rules, BoxRules) else BoxRules(rules)
    map_of = _map_of(maps, classes)
    out = []
    for b, chosen in enumerate(wanted):
        boxes = [np.zeros((0, 4))]
        for c in chosen:
            rule = rules(c)
            cuts = sorted({float(np.clip(rule.threshold + d, 0.01, 0.99)) for d in PROPOSAL_OFFSETS})
            rows = components(map_of(b, c), cuts, statistics=False, mode=rule.threshold_mode)
            boxes.append(rows[rows[:, AREA] >= rule.min_area, X0:Y1 + 1])
        out.append(np.unique(np.concatenate(boxes), axis=0))
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
