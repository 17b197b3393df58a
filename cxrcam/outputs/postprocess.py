"""The competitions' post-processing of submissions: the 2-class filter and WBF ensembles.

- **The 2-class filter** (VinBigData's top solutions): from a normal/abnormal probability,
  p(abnormal) = 1 - p_normal (the p_normal of the ``14 p_normal 0 0 1 1`` row), an image below
  ``low`` keeps only its "No finding" row, one above ``high`` keeps its detections without it, and
  one in between keeps both. RSNA has no "No finding": below ``low`` an image's boxes are dropped.
  ``low=0, high=1`` (the defaults, ``boxes.filter_low``/``boxes.filter_high``) changes nothing.
- **Ensembles** (``cxrcam ensemble``): Weighted Boxes Fusion (ensemble-boxes) of several submissions
  of the same images, each image's boxes normalised by its size, per class; the "No finding" rows'
  p_normal is the weighted mean of the submissions'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.data.submission import parse_submission, submission_format, submission_table
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.schemas import Schema


def two_class_filter(detections: pd.DataFrame, normal: pd.Series | None, low: float = 0.0, high: float = 1.0,
                     p_normal: pd.Series | None = None) -> tuple[pd.DataFrame, pd.Series | None]:
    """(detections, "No finding" scores) after the 2-class filter (see the module docstring).
    ``normal``: image_id -> p_normal of the "No finding" rows (None: a dataset without them, RSNA);
    ``p_normal``: where p(abnormal) comes from, when ``normal`` is None (default: ``normal``)."""
    if not 0 <= low <= high <= 1:
        raise CxrcamError(f"the 2-class filter needs 0 <= boxes.filter_low ({low}) <= boxes.filter_high ({high}) <= 1")
    source = normal if p_normal is None else p_normal
    if source is None or (low == 0 and high == 1):
        return detections, normal
    abnormal = 1 - source
    quiet = set(abnormal.index[abnormal < low])
    detections = detections[~detections["image_id"].isin(quiet)]
    if normal is not None:
        normal = normal[abnormal.reindex(normal.index).fillna(0).to_numpy() <= high]
    return detections, normal


def ensemble(paths: list[Path], sizes: dict[str, tuple[float, float]], schema: Schema,
             weights: list[float] | None = None, iou: float = 0.4, skip: float = 0.0
             ) -> tuple[pd.DataFrame, pd.Series | None, list[str]]:
    """(detections, "No finding" scores, image ids) of one submission from several of the same images: WBF per image and class, boxes
    normalised by each image's (height, width) in ``sizes``; the "No finding" rows' p_normal the
    weighted mean. Submissions of different image sets, or images without a size, are refused."""
    from ensemble_boxes import weighted_boxes_fusion  # numba: imported only here

    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise CxrcamError(f"--weights: {len(weights)} weight(s) for {len(paths)} submissions")
    no_finding_id = schema.no_finding_id
    parsed = [parse_submission(p, schema.num_findings + (no_finding_id is not None), fmt=submission_format(schema))
              for p in paths]
    ids = parsed[0][1]
    for path, (_, listed, _) in zip(paths[1:], parsed[1:]):
        if listed != ids:
            raise CxrcamError(f"{path} lists {len(listed)} images, {len(listed - ids)} of them not in {paths[0]} "
                              f"({len(ids)} images): ensembles fuse submissions of the same image set")
    missing = sorted(ids - set(sizes))
    if missing:
        raise CxrcamError(f"--data has no size for {len(missing)} of the submissions' images (e.g. {missing[0]!r}): "
                          f"a submission of another dataset or image set?")
    frames = [d.assign(model=k) for k, (d, _, _) in enumerate(parsed)]
    found = pd.concat(frames, ignore_index=True)
    is_normal = found["class_id"] == no_finding_id if no_finding_id is not None else np.zeros(len(found), bool)
    fused = []
    for image_id, group in found[~is_normal].groupby("image_id", sort=False):
        h, w = sizes[image_id]
        scale = np.array([w, h, w, h], np.float64)
        boxes, scores, labels = [], [], []
        for k in range(len(paths)):
            mine = group[group["model"] == k]
            boxes.append(np.clip(mine[BOX_COLUMNS].to_numpy(np.float64) / scale, 0, 1))
            scores.append(mine["score"].to_numpy(np.float64))
            labels.append(mine["class_id"].to_numpy())
        b, s, c = weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=iou, skip_box_thr=skip)
        fused.append(pd.DataFrame({"image_id": image_id, "class_id": c.astype(int), "score": s,
                                   **dict(zip(BOX_COLUMNS, (b * scale).T))}))
    detections = pd.concat(fused, ignore_index=True)[DETECTION_COLUMNS] if fused else found.iloc[:0][DETECTION_COLUMNS]
    normal = None
    if no_finding_id is not None and is_normal.any():
        rows = found[is_normal]
        w = np.asarray(weights, np.float64)[rows["model"].to_numpy()]
        normal = (rows.assign(ws=rows["score"] * w, w=w).groupby("image_id")[["ws", "w"]].sum()
                  .pipe(lambda t: t["ws"] / t["w"]))
    return detections, normal, sorted(ids)


def write_ensemble(paths: list[Path], sizes: dict[str, tuple[float, float]], out: Path, schema: Schema,
                   weights: list[float] | None = None, iou: float = 0.4, skip: float = 0.0,
                   low: float = 0.0, high: float = 1.0) -> pd.DataFrame:
    """:func:`ensemble`, then the 2-class filter, written as a submission in the dataset's format."""
    from cxrcam.files import write_csv

    detections, normal, ids = ensemble(paths, sizes, schema, weights, iou, skip)
    detections, normal = two_class_filter(detections, normal, low, high)
    table = submission_table(ids, detections, normal, schema.no_finding_id, submission_format(schema))
    write_csv(out, table)
    return table


__all__ = ["two_class_filter", "ensemble", "write_ensemble"]
