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

from cxrcam.boxes import paired_iou
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


def key_pairs(left: list, right: list) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) where row i of ``left`` and row j of ``right`` have equal keys (lists of key
    columns, e.g. [image_ids, class_ids]); ordered by i, then j. The vectorised join behind the
    metrics: one numpy pass instead of a loop over images."""
    n_left = len(left[0])
    codes = np.zeros(n_left + len(right[0]), np.int64)
    for a, b in zip(left, right):  # one integer code per distinct key (pd.factorize: cheap on small inputs too)
        column, uniques = pd.factorize(np.concatenate([np.asarray(a, object), np.asarray(b, object)]))
        codes = pd.factorize(codes * len(uniques) + column)[0]
    lc, rc = codes[:n_left], codes[n_left:]
    order = np.argsort(rc, kind="stable")
    counts = np.bincount(rc, minlength=codes.max() + 1 if len(codes) else 0).astype(np.int64)
    starts = np.cumsum(counts) - counts
    per_left = counts[lc] if len(lc) else np.zeros(0, np.int64)
    i = np.repeat(np.arange(n_left), per_left)
    offset = np.arange(len(i)) - np.repeat(np.cumsum(per_left) - per_left, per_left)
    return i, order[starts[lc[i]] + offset]


def match_detections(truth: dict[str, np.ndarray], image_ids: np.ndarray, boxes: np.ndarray,
                     iou_thr: float) -> np.ndarray:
    """True-positive flags of one class's detections, already sorted best first
    (truth: image_id -> that image's truth boxes of the class). Each detection's match is its
    image's truth box of highest IoU (the first on a tie); the first detection to match a box
    above ``iou_thr`` takes it, later ones are false positives."""
    tp = np.zeros(len(boxes), bool)
    keys = [k for k, v in truth.items() if len(v)]
    if not len(boxes) or not keys:
        return tp
    gt = np.concatenate([np.asarray(truth[k], np.float64).reshape(-1, 4) for k in keys])
    gt_image = np.repeat(np.asarray(keys, object), [len(truth[k]) for k in keys])
    det, box = key_pairs([image_ids], [gt_image])
    iou = paired_iou(boxes[det], gt[box])
    best = np.lexsort((box, -iou, det))  # per detection: highest IoU, then the first box
    best = best[np.r_[True, det[best][1:] != det[best][:-1]]] if len(best) else best
    hit = best[iou[best] > iou_thr]  # pairs, in detection order
    _, first = np.unique(box[hit], return_index=True)  # the first detection to reach each box takes it
    tp[det[hit[first]]] = True
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
    """image_id -> truth boxes (xyxy) of one class's truth table, in table order."""
    codes, ids = pd.factorize(truth["image_id"])
    order = np.argsort(codes, kind="stable")
    split = np.flatnonzero(np.diff(codes[order])) + 1
    return dict(zip(ids, np.split(truth[BOX_COLUMNS].to_numpy(np.float64)[order], split))) if len(truth) else {}


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
