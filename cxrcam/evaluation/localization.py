"""Per-box localisation results (``bb_results.csv``): each truth box against its best prediction.

For every ground-truth box: the predicted box of the same image and class with the highest
IoU (ties: higher score), its IoU and IoBB (intersection / predicted box area, as in the
ChestX-ray8 paper), ``hit`` = IoU > ``iou_thr``, and, where the class's heat-map peak is known,
whether the peak falls inside the truth box (pointing game). Predictions that are no truth
box's best match get rows of their own with empty truth columns.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxrcam.boxes import pairwise_iobb, pairwise_iou, points_in_boxes
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.schemas import Schema

GT_COLUMNS = [f"gt_{c}" for c in BOX_COLUMNS]
PRED_COLUMNS = [f"pred_{c}" for c in BOX_COLUMNS]
BB_COLUMNS = ["image_id", "class_id", "class_name", *GT_COLUMNS, *PRED_COLUMNS, "score", "iou", "iobb",
              "hit", "peak_x", "peak_y", "peak_in_box"]


def match_boxes(truth: pd.DataFrame, detections: pd.DataFrame, schema: Schema, iou_thr: float = 0.4,
                peaks: pd.DataFrame | None = None) -> pd.DataFrame:
    """``bb_results`` rows. truth: image_id, class_id, x_min..y_max; detections add score;
    peaks: image_id, class_id, peak_x, peak_y (all in original pixels)."""
    rows: list[dict] = []
    det_groups = dict(iter(detections.groupby(["image_id", "class_id"])))
    peak_at = {} if peaks is None else {(r.image_id, r.class_id): (r.peak_x, r.peak_y) for r in peaks.itertuples()}
    for key, gt in truth.groupby(["image_id", "class_id"]):
        det = det_groups.pop(key, None)
        g = gt[BOX_COLUMNS].to_numpy(np.float64)
        p = np.zeros((0, 4)) if det is None else det[BOX_COLUMNS].to_numpy(np.float64)
        scores = np.zeros(0) if det is None else det["score"].to_numpy(np.float64)
        iou, iobb = pairwise_iou(g, p), pairwise_iobb(g, p)
        best = [int(np.lexsort((-scores, -iou[i]))[0]) if len(p) else -1 for i in range(len(g))]
        px, py = peak_at.get(key, (np.nan, np.nan))
        inside = points_in_boxes(g, px, py)
        for i, j in enumerate(best):
            row = _row(key, schema, g[i], p[j] if j >= 0 else None, scores[j] if j >= 0 else np.nan,
                       iou[i, j] if j >= 0 else 0.0, iobb[i, j] if j >= 0 else 0.0, iou_thr)
            rows.append({**row, "peak_x": px, "peak_y": py, "peak_in_box": bool(inside[i]) if np.isfinite(px) else None})
        for j in sorted(set(range(len(p))) - set(best)):
            rows.append(_row(key, schema, None, p[j], scores[j], float(iou[:, j].max()) if len(g) else 0.0,
                             float(iobb[:, j].max()) if len(g) else 0.0, iou_thr, matched=False))
    for key, det in det_groups.items():  # predictions where the image has no truth of the class
        for box, score in zip(det[BOX_COLUMNS].to_numpy(np.float64), det["score"].to_numpy(np.float64)):
            rows.append(_row(key, schema, None, box, score, 0.0, 0.0, iou_thr, matched=False))
    table = pd.DataFrame(rows, columns=BB_COLUMNS)
    return table.sort_values(["image_id", "class_id"], kind="stable").reset_index(drop=True)


def _row(key, schema: Schema, gt, pred, score, iou, iobb, iou_thr, matched: bool = True) -> dict:
    image_id, class_id = key
    none = [np.nan] * 4
    return {"image_id": image_id, "class_id": int(class_id), "class_name": schema.class_name(int(class_id)),
            **dict(zip(GT_COLUMNS, none if gt is None else gt)), **dict(zip(PRED_COLUMNS, none if pred is None else pred)),
            "score": score, "iou": float(iou), "iobb": float(iobb), "hit": bool(matched and iou > iou_thr),
            "peak_x": np.nan, "peak_y": np.nan, "peak_in_box": None}
