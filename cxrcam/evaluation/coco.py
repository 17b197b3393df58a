"""COCO-style AP (pycocotools) for users who compare with Detectron2 / MMDetection numbers.

Boxes go to pycocotools as ``[x, y, width, height]`` (converted once, by
``cxrcam.boxes.xyxy_to_xywh``), never as corners. COCO conventions apply: 101-point
interpolation, IoU >= threshold, at most ``max_dets`` detections per image.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd

from cxrcam.boxes import xyxy_to_xywh
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.errors import CxrcamError


def coco_ap(truth: pd.DataFrame, detections: pd.DataFrame, image_ids: list[str], classes: list[int],
            iou_thrs: list[float] | None = None, max_dets: int = 100) -> float:
    """COCO AP averaged over ``iou_thrs`` (default .50:.05:.95), all areas, ``max_dets`` per image."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise CxrcamError("COCO metrics need pycocotools: pip install 'cxrcam[coco]'") from None
    index = {image_id: k + 1 for k, image_id in enumerate(image_ids)}
    truth = truth[truth["class_id"].isin(classes) & truth["image_id"].isin(index)]
    dets = detections[detections["class_id"].isin(classes) & detections["image_id"].isin(index)]
    if truth.empty:
        return float("nan")
    gt_xywh = xyxy_to_xywh(truth[BOX_COLUMNS].to_numpy())
    gt = COCO()
    gt.dataset = {
        "images": [{"id": k} for k in index.values()],
        "categories": [{"id": int(c) + 1} for c in classes],
        "annotations": [{"id": n + 1, "image_id": index[i], "category_id": int(c) + 1, "bbox": b.tolist(),
                         "area": float(b[2] * b[3]), "iscrowd": 0}
                        for n, (i, c, b) in enumerate(zip(truth["image_id"], truth["class_id"], gt_xywh))],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets.empty:
            return 0.0
        det_xywh = xyxy_to_xywh(dets[BOX_COLUMNS].to_numpy())
        dt = gt.loadRes([{"image_id": index[i], "category_id": int(c) + 1, "bbox": b.tolist(), "score": float(s)}
                         for i, c, b, s in zip(dets["image_id"], dets["class_id"], det_xywh, dets["score"])])
        ev = COCOeval(gt, dt, "bbox")
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K, all areas, max_dets
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")
