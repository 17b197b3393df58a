"""One batch of ``localize``: maps -> probabilities, CAM boxes, (refined detections), map peaks.

The map pass (:class:`~cxrcam.cam.checkpoint.CheckpointMaps`) gives each batch's probabilities and
maps; per image, :meth:`Step.plan` decides which classes it needs (:func:`~cxrcam.cam.checkpoint.needed_classes`):
the *predicted* classes (above their decision thresholds: the checkpoint's operating points, or
``boxes.min_prob``; among ``--classes`` if given) get boxes, the *shown* ones are drawn, and the
truth classes add their maps for the pointing game and the box accuracy curves (MaxBoxAccV2, with a
random-map control). One call turns the maps into boxes, each class with its own settings
(:class:`~cxrcam.boxes.BoxRules`: a calibration's, or the config's); a refiner, when given, turns
the predicted classes' CAM proposals (:func:`~cxrcam.boxes.cam_proposals`) into detections.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cxrcam.boxes import BoxRules, Detections, cam_peak, cam_proposals, maps_to_boxes, scale_boxes
from cxrcam.cam.checkpoint import MapBatch, Plan, needed_classes
from cxrcam.evaluation.weak import pair_curves

NO_TRUTH = (np.zeros((0, 4)), np.zeros(0, np.int64))  # (boxes, class ids) of an image without truth


@dataclass
class ImageResult:
    image_id: str
    probs: np.ndarray  # all classes
    scale: tuple[float, float]  # (sx, sy): input pixels per original pixel
    cam: Detections  # the CAM boxes, input pixels
    final: Detections  # the refined detections (or the CAM boxes), input pixels
    peaks: list[tuple[int, float, float]]  # (truth class, x, y) of its map's peak, original pixels
    curves: list[tuple[int, np.ndarray, np.ndarray]]  # (truth class, best IoU per threshold: map, random map)
    maps: np.ndarray  # the shown classes' maps (pictures)
    plan: Plan


class Step:
    """Localise one batch; built once per run."""

    def __init__(self, rules: BoxRules, truth: dict[str, tuple[np.ndarray, np.ndarray]], thresholds: np.ndarray,
                 classes: list[int] | None = None, pictures: bool = True, refiner=None):
        self.rules, self.truth, self.thresholds = rules, truth, thresholds
        self.classes, self.pictures, self.refiner = classes, pictures, refiner

    def plan(self, p: np.ndarray, image_id: str) -> Plan:
        """localize's additions to the plan: ``--classes``, the pictures, and the truth classes."""
        return needed_classes(p, self.thresholds, only=self.classes, show=self.pictures,
                              extra=self.truth.get(image_id, NO_TRUTH)[1])

    def __call__(self, x: torch.Tensor, ids: list[str], sizes: list[tuple[float, float]],
                 maps: MapBatch) -> list[ImageResult]:
        """x: B x 1 x S x S images in [0, 1]; sizes: each image's original (height, width); maps:
        the map pass's output for them."""
        probs, plans = maps.probs, maps.plans
        predicted = [p.predicted for p in plans]
        cam_boxes = maps_to_boxes(maps.map, None, predicted, probs, self.rules)
        final = (self.refiner(x, cam_proposals(maps.map, None, predicted, self.rules), probs)
                 if self.refiner else cam_boxes)
        size = x.shape[-1]
        results = []
        for b, (image_id, (h, w), plan) in enumerate(zip(ids, sizes, plans)):
            sx, sy = size / w, size / h
            peaks = [(c, *np.divide(cam_peak(maps.map(b, c)), (sx, sy))) for c in plan.extra]
            truth_boxes, truth_classes = self.truth.get(image_id, NO_TRUTH)
            curves = [(c, *pair_curves(maps.map(b, c), scale_boxes(truth_boxes[truth_classes == c], sx, sy),
                                       f"{image_id}/{c}")) for c in plan.extra]
            results.append(ImageResult(image_id, probs[b], (sx, sy), cam_boxes[b], final[b], peaks, curves,
                                       np.array([maps.map(b, c) for c in plan.shown]).reshape(-1, size, size),
                                       plan))
        return results


__all__ = ["Step", "ImageResult", "NO_TRUTH"]
