"""The competitions' post-processing of submissions: the 2-class filter and WBF ensembles.

- **The 2-class filter** (VinBigData's top solutions): from a normal/abnormal probability,
  p(abnormal) = 1 - p_normal (the p_normal of the ``14 p_normal 0 0 1 1`` row), an image below
  ``low`` keeps only its "No finding" row, one above ``high`` keeps its detections without it, and
  one in between keeps both. RSNA has no "No finding": below ``low`` an image's boxes are dropped.
  ``low=0, high=1`` changes nothing. ``cxrcam calibrate`` chooses the thresholds on its validation
  images (:func:`choose_filter`); ``boxes.filter_low``/``filter_high`` "auto" use its choice.
- **Ensembles** (``cxrcam ensemble``): Weighted Boxes Fusion (ensemble-boxes) of several submissions
  of the same images, each image's boxes normalised by its size, per class; the "No finding" rows'
  p_normal is the weighted mean of the submissions'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cxrcam.data.submission import normal_scores, parse_submission, submission_format, submission_table
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.detection import with_no_finding
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


FILTER_LOWS = (0.0, 0.08)  # the low thresholds calibrate tries (the winners': 0.08), besides the quantiles below
FILTER_HIGHS = (0.95, 1.0)  # and the high ones (0.95)
# ... and these quantiles of the validation images' own p(abnormal): a classifier trained with pos_weight puts
# every image above 0.7 (the winners' numbers never fire there; docs/BENCHMARKS.md, issue 37)
LOW_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
HIGH_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95)


def filter_grid(abnormal: np.ndarray, rsna: bool = False) -> list[tuple[float, float]]:
    """The (low, high) pairs :func:`choose_filter` tries for these p(abnormal) values: the fixed
    numbers and the quantiles, low <= high (RSNA, without "No finding": high 1 alone)."""
    values = np.asarray(abnormal, np.float64)
    lows = sorted({*FILTER_LOWS, *(np.round(np.quantile(values, LOW_QUANTILES), 4) if len(values) else ())})
    highs = [1.0] if rsna else sorted({*FILTER_HIGHS, *(np.round(np.quantile(values, HIGH_QUANTILES), 4)
                                                        if len(values) else ())})
    return [(float(lo), float(hi)) for lo in lows for hi in highs if lo <= hi]


def filter_score(detections: pd.DataFrame, p_normal: pd.Series, truth: pd.DataFrame, image_ids: list[str],
                 schema: Schema, iou_thr: float, low: float, high: float) -> float:
    """The dataset's own metric after the 2-class filter: VOC mAP@``iou_thr`` with "No finding"
    counted (``truth`` already holds its ``0 0 1 1`` boxes), or RSNA's score."""
    from cxrcam.data.tables import no_finding_rows
    from cxrcam.evaluation.detection import voc_map
    from cxrcam.evaluation.rsna import rsna_score

    no_finding = schema.no_finding_id
    kept, normal = two_class_filter(detections, p_normal if no_finding is not None else None, low, high,
                                    p_normal=p_normal)
    if no_finding is None:
        return rsna_score(truth, kept, image_ids)[0] if schema.name == "rsna" else voc_map(truth, kept, iou_thr)[0]
    rows = no_finding_rows(normal.index, no_finding, normal.to_numpy())
    return voc_map(truth, pd.concat([kept[DETECTION_COLUMNS], rows], ignore_index=True), iou_thr)[0]


def filter_scores(detections: pd.DataFrame, p_normal: pd.Series, truth: pd.DataFrame, schema: Schema,
                  iou_thr: float, grid: list[tuple[float, float]], subsets: list[np.ndarray]) -> np.ndarray:
    """:func:`filter_score` of every (low, high) pair in ``grid`` (rows) on each subset of the
    images (columns; boolean masks over ``p_normal``'s index), from one matching of the detections.

    The filter only removes whole images' boxes (and "No finding" rows), and whether a box is a true
    positive depends only on its own image's boxes of its class above it, so each class is matched
    once and every pair's AP comes from cumulative sums over the boxes it keeps (RSNA: each image's
    score with and without its boxes). Equal to :func:`filter_score` (a test checks it)."""
    from cxrcam.evaluation.detection import match_detections, truth_by_image, voc_ap
    from cxrcam.evaluation.rsna import image_scores

    image_ids = list(p_normal.index)
    where = {k: n for n, k in enumerate(image_ids)}
    abnormal = 1 - p_normal.to_numpy(np.float64)
    detections, truth = (t[t["image_id"].isin(where)] for t in (detections, truth))
    table = np.full((len(grid), len(subsets)), np.nan)
    if schema.name == "rsna" and schema.no_finding_id is None:  # an image below low scores as with no boxes
        with_boxes = image_scores(truth, detections, image_ids)
        without = image_scores(truth, detections.iloc[:0], image_ids)
        for r, (low, _) in enumerate(grid):
            per_image = np.where(abnormal >= low, with_boxes, without)
            for c, subset in enumerate(subsets):
                scored = per_image[subset][np.isfinite(per_image[subset])]
                table[r, c] = scored.mean() if len(scored) else np.nan
        return table
    no_finding = schema.no_finding_id
    found = detections[DETECTION_COLUMNS]
    if no_finding is not None:
        from cxrcam.data.tables import no_finding_rows
        found = pd.concat([found, no_finding_rows(image_ids, no_finding, p_normal.to_numpy())], ignore_index=True)
    image = found["image_id"].map(where).to_numpy()
    truth_image = truth["image_id"].map(where).to_numpy()
    classes = []  # per class: its boxes' images and true-positive flags, best first, and its truth boxes' images
    for c in sorted(set(truth["class_id"]) | set(found["class_id"])):
        is_c, truth_c = (found["class_id"] == c).to_numpy(), (truth["class_id"] == c).to_numpy()
        mine = found[is_c]
        order = np.argsort(-mine["score"].to_numpy(np.float64), kind="stable")
        tp = match_detections(truth_by_image(truth[truth_c]), mine["image_id"].to_numpy()[order],
                              mine[BOX_COLUMNS].to_numpy(np.float64)[order], iou_thr)
        classes.append((c, image[is_c][order], tp, truth_image[truth_c]))
    n_truth = [[int(subset[truth_images].sum()) for _, _, _, truth_images in classes] for subset in subsets]
    for r, (low, high) in enumerate(grid):
        for k, subset in enumerate(subsets):
            aps = []
            for (c, images, tp, _), n in zip(classes, n_truth[k]):
                if not n:
                    continue
                kept = subset[images] & ((abnormal[images] <= high) if c == no_finding else (abnormal[images] >= low))
                ctp = np.cumsum(tp[kept])
                cfp = np.arange(1, len(ctp) + 1) - ctp
                aps.append(voc_ap(ctp / n, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)))
            table[r, k] = np.mean(aps) if aps else np.nan
    return table


def choose_filter(detections: pd.DataFrame, p_normal: pd.Series, truth: pd.DataFrame, schema: Schema,
                  iou_thr: float, half: Callable[[str], int]) -> dict[str, Any]:
    """The 2-class filter's (low, high) for these validation detections (original pixels) and
    p_normal (image_id -> p_normal, every image), over :func:`filter_grid` (RSNA, without "No
    finding": the low threshold alone), scored by :func:`filter_score` (:func:`filter_scores`).

    As calibrate's thresholds: the pair chosen on one ``half`` of the images is scored on the
    other, both ways; the filter is kept only where that beats no filter on each half, and is then
    chosen on all the images. Ties keep the least filtering."""
    image_ids = list(p_normal.index)
    grid = filter_grid(1 - p_normal.to_numpy(), rsna=schema.no_finding_id is None)
    halves = np.array([half(i) for i in image_ids])
    masks = [np.ones(len(image_ids), bool), halves == 0, halves == 1]
    table = list(filter_scores(detections, p_normal, truth, schema, iou_thr, grid, masks).T)

    def best(values: np.ndarray) -> int:  # of the pairs at the best score, the least filtering (grid order)
        change = np.array([lo + (1 - hi) for lo, hi in grid])
        tied = np.flatnonzero(values >= np.nanmax(values) - 1e-9)
        return int(tied[np.argmin(change[tied])])

    off = grid.index((0.0, 1.0))
    result = {"low": 0.0, "high": 1.0, "metric": "RSNA score" if schema.name == "rsna" else f"mAP@{iou_thr}",
              "value": float(table[0][off]), "off": float(table[0][off])}
    if not all(np.isfinite(t).any() for t in table):
        return {**result, "why": "no truth on both halves of the validation images to choose by"}
    held = [float(table[1][best(table[2])]), float(table[2][best(table[1])])]  # half 0 by half 1's choice, and back
    result.update(heldout_halves=held, off_halves=[float(table[1][off]), float(table[2][off])],
                  grid=[[lo, hi, float(v)] for (lo, hi), v in zip(grid, table[0])])
    if all(h > o + 1e-9 for h, o in zip(held, result["off_halves"])):
        k = best(table[0])
        result.update(low=grid[k][0], high=grid[k][1], value=float(table[0][k]),
                      why="beat no filter on each held-out half")
    else:
        result["why"] = "no held-out gain on both halves: no filter"
    return result


def choose_filter_where_complete(detections: pd.DataFrame, probs: pd.DataFrame, labels: pd.DataFrame,
                                 truth: pd.DataFrame, schema: Schema, iou_thr: float, half: Callable[[str], int],
                                 normal_rule: str = "max") -> dict[str, Any]:
    """:func:`choose_filter` on the images whose truth is complete: the boxed ones and those labelled
    without findings (scored with "No finding", where the dataset has it). ``probs``: the finding
    probabilities and ``labels`` the image labels, both indexed by image id; ``normal_rule``: how
    p_normal comes from ``probs`` (``boxes.normal_score``)."""
    normal = set(labels.index[(labels.to_numpy(np.float64) < 0.5).all(1)])
    boxed = set(truth["image_id"])
    scored = [i for i in probs.index if i in normal or i in boxed]
    p_normal = pd.Series(normal_scores(probs.loc[scored].to_numpy(), normal_rule), index=scored)
    scored_truth = truth[truth["image_id"].isin(set(scored))][["image_id", "class_id", *BOX_COLUMNS]]
    if schema.no_finding_id is not None:
        scored_truth = with_no_finding(scored_truth, scored, schema.no_finding_id)
    return choose_filter(detections[detections["image_id"].isin(set(scored))], p_normal, scored_truth, schema,
                         iou_thr, half)


def ensemble(paths: list[Path], sizes: dict[str, tuple[float, float]], schema: Schema,
             weights: list[float] | None = None, iou: float = 0.4, skip: float = 0.0, conf_type: str = "avg"
             ) -> tuple[pd.DataFrame, pd.Series | None, list[str]]:
    """(detections, "No finding" scores, image ids) of one submission from several of the same images: WBF per image and class, boxes
    normalised by each image's (height, width) in ``sizes``; the "No finding" rows' p_normal the
    weighted mean. ``conf_type``: how WBF scores a fused box (one of :data:`~cxrcam.config.WBF_CONF_TYPES`). Submissions
    of different image sets, or images without a size, are refused."""
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
        b, s, c = weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=iou, skip_box_thr=skip,
                                         conf_type=conf_type)
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
                   low: float = 0.0, high: float = 1.0, conf_type: str = "avg") -> pd.DataFrame:
    """:func:`ensemble`, then the 2-class filter, written as a submission in the dataset's format."""
    from cxrcam.files import write_csv

    detections, normal, ids = ensemble(paths, sizes, schema, weights, iou, skip, conf_type)
    if normal is None and (low, high) != (0.0, 1.0):
        lacking = ("RSNA submissions do not carry" if schema.no_finding_id is None
                   else 'these submissions lack (no "No finding" rows)')
        raise CxrcamError(f"the 2-class filter (low {low}, high {high}) needs each image's p_normal, which {lacking}: "
                          f"apply it in localize or refine (boxes.filter_low, boxes.filter_high)")
    detections, normal = two_class_filter(detections, normal, low, high)
    table = submission_table(ids, detections, normal, schema.no_finding_id, submission_format(schema))
    write_csv(out, table)
    return table


__all__ = ["two_class_filter", "filter_score", "filter_scores", "filter_grid", "choose_filter",
           "choose_filter_where_complete", "FILTER_LOWS", "FILTER_HIGHS", "ensemble", "write_ensemble"]
