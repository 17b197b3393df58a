"""Refinement: the CAM boxes become Faster R-CNN proposals, and the classifier gates the result.

The detector (:class:`~cxrcam.detection.model.CamFasterRCNN`) puts each image's CAM proposals
(:func:`~cxrcam.boxes.cam_proposals`) beside the RPN's (``refine.proposals=both``) or in their
place (``cam``), and its RoI heads classify and regress them like any other proposal; a
detector trained with ``detector.cam_proposals_from`` has learned to correct exactly these
boxes. Each detection's score is then multiplied by the classifier's probability of its
class (``refine.gate=product``): the classifier, trained on every image's labels, decides
*whether* a finding is there, the detector *where*. Overlapping boxes of one class are merged
by NMS (inside the RoI heads) or Weighted Boxes Fusion, the ``top_k`` best per class stay, and
each box is resized by ``refine.scale``, and boxes the detector scores below ``refine.min_score``
are dropped; ``refine.iou``, ``refine.scale`` and ``refine.min_score`` "auto" take what
``train-detector`` chose on its validation fold (the checkpoint's ``postprocess``), as do the
2-class filter's ``boxes.filter_low``/``filter_high``, where it chose one for its boxes.

With ``proposals=rpn`` and ``gate=none`` this is exactly the plain detector. A RetinaNet
(``detector.arch=retinanet``) has no proposal stage: refine gates its own detections
(``proposals=rpn``; the default ``both`` says so in a warning, ``cam`` is refused).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from cxrcam.boxes import Detections, resize_boxes, select_boxes
from cxrcam.config import RefineConfig
from cxrcam.detection.model import CamRetinaNet, load_detector, to_detector_input
from cxrcam.errors import CxrcamError


class Refiner:
    """A trained detector (``train-detector``) that re-scores CAM boxes, batch by batch."""

    def __init__(self, checkpoint: str | Path, config: RefineConfig, device: torch.device):
        self.model, self.ckpt = load_detector(checkpoint, device)
        self.config = config
        if isinstance(self.model, CamRetinaNet):  # single-shot: its own boxes, gated; no CAM box can be a proposal
            if config.proposals == "cam":
                raise CxrcamError(f"refine.proposals=cam: {checkpoint} is a RetinaNet, which has no proposal stage to "
                                  f"score CAM boxes; use refine.proposals=rpn (its own detections, gated)")
            if config.proposals == "both":
                warnings.warn(f"{Path(checkpoint).name} is a RetinaNet: CAM boxes cannot be its proposals, so refine "
                              f"gates its own detections (refine.proposals=rpn)", stacklevel=2)
            self.config = config = dataclasses.replace(config, proposals="rpn")
        chosen = self.ckpt.get("postprocess") or {}  # train-detector's choice on its validation fold
        self.iou = float(chosen.get("nms", 0.5) if config.iou == "auto" else config.iou)
        self.scale = float(chosen.get("scale", 1.0) if config.scale == "auto" else config.scale)
        self.min_score = float(chosen.get("min_score", 0.0) if config.min_score == "auto" else config.min_score)
        self.filter: dict | None = chosen.get("filter")  # the 2-class filter chosen for its boxes (boxes.filter_* auto)
        heads = self.model if isinstance(self.model, CamRetinaNet) else self.model.roi_heads
        if config.fusion == "wbf":  # WBF needs the overlapping boxes NMS would remove
            heads.nms_thresh, heads.detections_per_img = 1.0, max(heads.detections_per_img, 300)
        else:
            heads.nms_thresh = self.iou

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cam_boxes: list[np.ndarray], probs: np.ndarray) -> list[Detections]:
        """x: B x 1 x S x S images in [0, 1]; cam_boxes: each image's CAM proposals (input pixels);
        probs: B x C classifier probabilities. Detections come back in input pixels."""
        model, cfg = self.model, self.config
        found = model(to_detector_input(x), cam_boxes=None if cfg.proposals == "rpn" else cam_boxes,
                      rpn=cfg.proposals != "cam")
        results = []
        for d, p in zip(found, probs):
            boxes = d["boxes"].float().cpu().numpy().astype(np.float64)
            classes = d["labels"].cpu().numpy() - 1
            scores = d["scores"].float().cpu().numpy().astype(np.float64)
            keep = scores >= self.min_score  # the detector's own score, before the gate (as chosen)
            boxes, classes, scores = boxes[keep], classes[keep], scores[keep]
            if cfg.gate == "product":
                scores = scores * p[classes]
            b, c, s = merge(boxes, classes, scores, cfg, x.shape[-1], self.iou)
            results.append((resize_boxes(b, self.scale, x.shape[-1], x.shape[-2]), c, s))
        return results


def merge(boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray, config: RefineConfig,
          size: int, iou: float = 0.5) -> Detections:
    """Per class: WBF at ``iou`` (``fusion=wbf``; NMS already ran in the detector otherwise), then top-k."""
    out_b, out_c, out_s = [], [], []
    for c in np.unique(classes):
        b, s = boxes[classes == c], scores[classes == c]
        if config.fusion == "wbf" and len(b) > 1:
            from ensemble_boxes import weighted_boxes_fusion  # here: it imports numba

            b, s, _ = weighted_boxes_fusion([np.clip(b / size, 0, 1)], [s], [np.zeros(len(b))],
                                            iou_thr=iou, skip_box_thr=0.0)
            b = b * size
        b, s = select_boxes(b, s, config.top_k)
        out_b.append(b)
        out_s.append(s)
        out_c.append(np.full(len(b), c))
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_b), np.concatenate(out_c).astype(np.int64), np.concatenate(out_s)


__all__ = ["Refiner", "merge"]
