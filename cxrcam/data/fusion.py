"""Turn several readers' boxes into training truth: Weighted Boxes Fusion, a majority of readers, per
reader, or union.

VinBigData has three radiologists per image, each drawing their own boxes, so one finding
usually carries three overlapping boxes. The winning solutions fused them per image and
class with ``ensemble_boxes.weighted_boxes_fusion(iou_thr=0.4, allows_overflow=True)``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxrcam.boxes import pairwise_iou
from cxrcam.config import FusionConfig
from cxrcam.data.tables import BOX_COLUMNS, BOX_TABLE_COLUMNS, empty_boxes


MAJORITY = 2  # readers of VinBigData's 3 who must mark a finding for fusion.method=majority to keep it


def fuse_boxes(boxes: pd.DataFrame, config: FusionConfig = FusionConfig(),
               readers: dict[str, int] | None = None) -> pd.DataFrame:
    """Fuse a box table (see :mod:`cxrcam.data.tables`) image by image. ``readers``: how many readers
    read each image (majority needs :data:`MAJORITY` of them, or all where fewer read it: a consensus)."""
    if config.method == "reader" or boxes.empty:
        return boxes.reset_index(drop=True)
    if config.method == "majority":
        readers = readers or {}
        parts = [_majority(image_id, group, config, min(MAJORITY, readers.get(image_id, MAJORITY)))
                 for image_id, group in boxes.groupby("image_id", sort=False)]
        return pd.concat(parts, ignore_index=True) if parts else empty_boxes()
    fuse = _wbf if config.method == "wbf" else _union
    parts = [fuse(image_id, group, config) for image_id, group in boxes.groupby("image_id", sort=False)]
    return pd.concat(parts, ignore_index=True) if parts else empty_boxes()


def _wbf(image_id: str, group: pd.DataFrame, config: FusionConfig) -> pd.DataFrame:
    from ensemble_boxes import weighted_boxes_fusion  # numba: imported only when fusing

    # WBF works on [0, 1] coordinates; IoU is scale-free, so any per-image scale that
    # keeps every box inside the unit square gives the same fusion.
    scale = float(group[BOX_COLUMNS].to_numpy().max()) or 1.0
    boxes_list, scores_list, labels_list = [], [], []
    for _, reader in group.groupby("rad_id", sort=True):
        boxes_list.append(reader[BOX_COLUMNS].to_numpy(np.float64) / scale)
        scores_list.append(np.ones(len(reader)))
        labels_list.append(reader["class_id"].to_numpy())
    fused, _, labels = weighted_boxes_fusion(
        boxes_list, scores_list, labels_list, iou_thr=config.iou_thr,
        skip_box_thr=config.skip_box_thr, allows_overflow=True)
    out = pd.DataFrame(fused * scale, columns=BOX_COLUMNS)
    out.insert(0, "class_id", labels.astype(np.int64))
    out.insert(0, "image_id", image_id)
    out["rad_id"] = "wbf"
    return out[BOX_TABLE_COLUMNS]


def _majority(image_id: str, group: pd.DataFrame, config: FusionConfig, needed: int) -> pd.DataFrame:
    """WBF's boxes that boxes of ``needed`` different readers overlap (IoU > iou_thr): a finding one
    reader alone drew is not training truth."""
    fused = _wbf(image_id, group, config)
    keep = np.zeros(len(fused), bool)
    for k, row in enumerate(fused.itertuples(index=False)):
        same = group[group["class_id"] == row.class_id]
        hits = pairwise_iou(np.array([[row.x_min, row.y_min, row.x_max, row.y_max]]),
                            same[BOX_COLUMNS].to_numpy(np.float64))[0] > config.iou_thr
        keep[k] = same.loc[hits, "rad_id"].nunique() >= needed
    return fused[keep].assign(rad_id="majority").reset_index(drop=True)


def _union(image_id: str, group: pd.DataFrame, config: FusionConfig) -> pd.DataFrame:
    """Boxes of one class that overlap (IoU > iou_thr, transitively) become their enclosing box."""
    rows = []
    for class_id, cls in group.groupby("class_id", sort=True):
        b = cls[BOX_COLUMNS].to_numpy(np.float64)
        linked = pairwise_iou(b, b) > config.iou_thr
        component = np.arange(len(b))
        for _ in range(len(b)):  # label propagation to a fixed point: connected components
            new = np.array([component[linked[i]].min() for i in range(len(b))])
            if (new == component).all():
                break
            component = new
        for c in np.unique(component):
            m = b[component == c]
            rows.append((image_id, int(class_id), m[:, 0].min(), m[:, 1].min(),
                         m[:, 2].max(), m[:, 3].max(), "union"))
    return pd.DataFrame(rows, columns=BOX_TABLE_COLUMNS)
