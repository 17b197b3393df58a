"""VinBigData's metric: PASCAL VOC 2010 average precision per class at IoU > 0.4, and its mean.

Written from the competition's definition, not the widely copied notebook:

* IoU on continuous coordinates (no "+1"), a match needs IoU strictly above ``iou_thr``;
* per class, predictions are ranked by confidence (stable); each one is compared with the
  truth boxes of its image and class; the truth box of highest IoU is its match: if that box is
  still free the prediction is a true positive, otherwise (or below the threshold) a false
  positive, so duplicates count against the prediction;
* AP = area under the precision envelope over all recall points (VOC 2010, no 11-point sampling);
* mAP = mean over the classes present in the ground truth ("No finding" included, scored
  through its ``0 0 1 1`` box on every image without findings).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrcam.boxes import pairwise_iou
from cxrcam.data.tables import BOX_COLUMNS, no_finding_rows


@dataclass
class ClassAP:
    class_id: int
    ap: float
    n_truth: int
    n_pred: int
    precision: np.ndarray
    recall: np.ndarray


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010 AP: area under the monotone precision envelope, at every recall change."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def match_detections(truth: dict[str, np.ndarray], image_ids: np.ndarray, boxes: np.ndarray,
                     iou_thr: float) -> np.ndarray:
    """True-positive flags of one class's detections, already sorted best first
    (truth: image_id -> that image's truth boxes of the class)."""
    used = {k: np.zeros(len(v), bool) for k, v in truth.items()}
    tp = np.zeros(len(boxes), bool)
    for n, image_id in enumerate(image_ids):
        gt = truth.get(image_id)
        if gt is None or not len(gt):
            continue
        iou = pairwise_iou(boxes[n], gt)[0]
        j = int(np.argmax(iou))
        if iou[j] > iou_thr and not used[image_id][j]:
            tp[n] = used[image_id][j] = True
    return tp


def ap_of(truth: dict[str, np.ndarray], image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
          iou_thr: float = 0.4) -> tuple[float, np.ndarray, np.ndarray]:
    """(AP, precision, recall) of one class: detections ranked by score (stable), matched, VOC 2010 AP."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = match_detections(truth, np.asarray(image_ids)[order], np.asarray(boxes, np.float64).reshape(-1, 4)[order],
                          iou_thr)
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    n_truth = sum(len(v) for v in truth.values())
    recall = ctp / n_truth if n_truth else np.zeros(len(tp))
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return (voc_ap(recall, precision) if n_truth else float("nan")), precision, recall


def truth_by_image(truth: pd.DataFrame) -> dict[str, np.ndarray]:
    """image_id -> truth boxes (xyxy) of one class's truth table."""
    return {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby("image_id")}


def class_ap(truth: pd.DataFrame, detections: pd.DataFrame, class_id: int, iou_thr: float = 0.4) -> ClassAP:
    """AP of one class (truth and detections already restricted to that class)."""
    ap, precision, recall = ap_of(truth_by_image(truth), detections["image_id"].to_numpy(),
                                  detections[BOX_COLUMNS].to_numpy(np.float64), detections["score"].to_numpy(), iou_thr)
    return ClassAP(class_id, ap, len(truth), len(detections), precision, recall)


def with_no_finding(truth: pd.DataFrame, image_ids: list[str], no_finding_id: int) -> pd.DataFrame:
    """Add the ``no_finding_id`` truth box ``0 0 1 1`` to every image without a finding box."""
    normal = sorted(set(image_ids) - set(truth.loc[truth["class_id"] != no_finding_id, "image_id"]))
    extra = no_finding_rows(normal, no_finding_id)
    return pd.concat([truth[truth["class_id"] != no_finding_id][["image_id", "class_id", *BOX_COLUMNS]], extra],
                     ignore_index=True)


def voc_map(truth: pd.DataFrame, detections: pd.DataFrame, iou_thr: float = 0.4) -> tuple[float, list[ClassAP]]:
    """mAP over the classes present in ``truth`` and the per-class results (every class seen)."""
    classes = sorted(set(truth["class_id"]) | set(detections["class_id"]))
    results = [class_ap(truth[truth["class_id"] == c], detections[detections["class_id"] == c], int(c), iou_thr)
               for c in classes]
    present = [r.ap for r in results if r.n_truth > 0]
    return (float(np.mean(present)) if present else float("nan")), results
