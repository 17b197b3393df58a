"""Weakly supervised localisation metrics of the ChestX-ray8 paper (Wang et al., CVPR 2017).

Per truth box: hit at T(IoU) when some predicted box of its image and class has IoU > T, hit
at T(IoBB) when some has intersection / predicted area > T; accuracy = share of truth boxes
hit, per class, for T = 0.1 ... 0.9. Pointing game: share of truth boxes containing the peak
of their class's heat map (from localize's ``peaks.csv``).

The random-map control runs the same box extraction on random heat maps: uniform noise on a
``grid`` x ``grid`` lattice (a CAM's resolution), bilinearly upsampled and min-max scaled,
``repeats`` seeded draws per truth image and class; always report it next to the model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxrcam.boxes import cam_peak, cam_to_boxes, pairwise_iobb, pairwise_iou, points_in_boxes, scale_boxes
from cxrcam.config import BoxConfig
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.schemas import Schema

T_VALUES = tuple(np.round(np.arange(0.1, 0.91, 0.1), 1))


def box_overlaps(truth: pd.DataFrame, detections: pd.DataFrame) -> pd.DataFrame:
    """``truth`` plus, per truth box, the best IoU and best IoBB over same-image, same-class predictions."""
    dets = {k: g[BOX_COLUMNS].to_numpy(np.float64) for k, g in detections.groupby(["image_id", "class_id"])}
    best_iou, best_iobb = np.zeros(len(truth)), np.zeros(len(truth))
    boxes = truth[BOX_COLUMNS].to_numpy(np.float64)
    for n, key in enumerate(zip(truth["image_id"], truth["class_id"])):
        p = dets.get(key)
        if p is not None and len(p):
            best_iou[n] = pairwise_iou(boxes[n], p).max()
            best_iobb[n] = pairwise_iobb(boxes[n], p).max()
    return truth.assign(best_iou=best_iou, best_iobb=best_iobb)


def accuracy_table(truth: pd.DataFrame, detections: pd.DataFrame, schema: Schema,
                   points: pd.Series | None = None) -> pd.DataFrame:
    """One row per class with truth (and "all"): n_boxes, iou@T, iobb@T for every T, pointing."""
    scored = box_overlaps(truth, detections)
    if points is not None:
        scored = scored.assign(pointing=points.to_numpy(dtype=float))
    rows = []
    for name, group in [*((schema.class_name(int(c)), g) for c, g in scored.groupby("class_id")), ("all", scored)]:
        row = {"class": name, "n_boxes": len(group)}
        for t in T_VALUES:
            row[f"iou@{t}"] = float((group["best_iou"] > t).mean())
        for t in T_VALUES:
            row[f"iobb@{t}"] = float((group["best_iobb"] > t).mean())
        row["pointing"] = float(group["pointing"].mean()) if "pointing" in group else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def random_control(truth: pd.DataFrame, sizes: dict[str, tuple[float, float]], schema: Schema,
                   config: BoxConfig = BoxConfig(), grid: int = 16, side: int = 256, repeats: int = 5,
                   seed: int = 0) -> pd.DataFrame:
    """:func:`accuracy_table` of boxes (and peaks) from random heat maps, averaged over ``repeats``."""
    gen = torch.Generator().manual_seed(seed)
    keys = truth[["image_id", "class_id"]].drop_duplicates().itertuples(index=False)
    keys = [k for k in keys if k.image_id in sizes]
    tables = []
    for _ in range(repeats):
        maps = F.interpolate(torch.rand(len(keys), 1, grid, grid, generator=gen), size=(side, side),
                             mode="bilinear", align_corners=False)[:, 0].numpy()
        maps = (maps - maps.min((1, 2), keepdims=True)) / np.ptp(maps, axis=(1, 2), keepdims=True)
        dets, peaks = [], {}
        for key, cam in zip(keys, maps):
            h, w = sizes[key.image_id]
            boxes, scores = cam_to_boxes(cam, 1.0, config)
            for box, score in zip(scale_boxes(boxes, w / side, h / side), scores):
                dets.append((key.image_id, key.class_id, score, *box))
            px, py = cam_peak(cam)
            peaks[(key.image_id, key.class_id)] = (px * w / side, py * h / side)
        sub = truth[[(i, c) in peaks for i, c in zip(truth["image_id"], truth["class_id"])]]
        px, py = np.array([peaks[(i, c)] for i, c in zip(sub["image_id"], sub["class_id"])]).reshape(-1, 2).T
        inside = points_in_boxes(sub[BOX_COLUMNS].to_numpy(), px, py)
        tables.append(accuracy_table(sub, pd.DataFrame(dets, columns=DETECTION_COLUMNS), schema,
                                     pd.Series(inside, dtype=float)))
    out = tables[0].copy()
    numeric = out.columns.drop(["class", "n_boxes"])
    out[numeric] = np.mean([t[numeric].to_numpy() for t in tables], axis=0)
    return out
