"""Weakly supervised localisation metrics: the ChestX-ray8 accuracies (Wang et al., CVPR 2017)
and MaxBoxAccV2 (Choe et al., "Evaluating Weakly Supervised Object Localization Methods
Right", CVPR 2020).

Per truth box: hit at T(IoU) when some predicted box of its image and class has IoU > T, hit
at T(IoBB) when some has intersection / predicted area > T; accuracy = share of truth boxes
hit, per class, for T = 0.1 ... 0.9. Pointing game: share of truth boxes containing the peak
of their class's heat map (from localize's ``peaks.csv``).

The random-map control runs the same box extraction on random heat maps: uniform noise on a
``grid`` x ``grid`` lattice (a CAM's resolution), bilinearly upsampled and min-max scaled,
``repeats`` seeded draws per truth image and class; always report it next to the model.

MaxBoxAccV2, per truth image and class: cut the class's map at every threshold ``t`` of
:data:`CAM_THRESHOLDS`, take a box around every connected component, and keep the best IoU
between any of them and any truth box of the class (:func:`best_ious`). BoxAcc(t, d) = share
of pairs whose best IoU is >= d; MaxBoxAccV2 = mean over d in 0.3, 0.5, 0.7 of max over t.
The maps are taken at :data:`CURVE_SIDE` pixels at most (IoU does not change with scale; a
CAM is far coarser than that), and each pair's random-map control is seeded by the pair.
"""
from __future__ import annotations

import zlib

import cv2
import numpy as np
import pandas as pd

from cxrcam.boxes import (BoxRules, cam_peak, cam_to_boxes, components, paired_iobb, paired_iou, pairwise_iou,
                          points_in_boxes, scale_boxes)
from cxrcam.boxes.from_cam import T, X0, Y1
from cxrcam.config import BoxConfig
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.evaluation.detection import key_pairs
from cxrcam.schemas import Schema

T_VALUES = tuple(np.round(np.arange(0.1, 0.91, 0.1), 1))
CAM_THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0, 0.01), 2))  # the WSOL benchmark's grid
IOU_DELTAS = (0.3, 0.5, 0.7)
CURVE_SIDE = 128
CURVE_COLUMNS = [f"t{t:.2f}" for t in CAM_THRESHOLDS]


def box_overlaps(truth: pd.DataFrame, detections: pd.DataFrame) -> pd.DataFrame:
    """``truth`` plus, per truth box, the best IoU and best IoBB over same-image, same-class predictions."""
    t, d = key_pairs([truth["image_id"], truth["class_id"]], [detections["image_id"], detections["class_id"]])
    a, b = truth[BOX_COLUMNS].to_numpy(np.float64)[t], detections[BOX_COLUMNS].to_numpy(np.float64)[d]
    best_iou, best_iobb = np.zeros(len(truth)), np.zeros(len(truth))
    np.maximum.at(best_iou, t, paired_iou(a, b))
    np.maximum.at(best_iobb, t, paired_iobb(a, b))
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


def confusion_pointing(truth: pd.DataFrame, peaks: pd.DataFrame) -> dict[str, float | int]:
    """The class-confusion pointing game: on images with truth boxes of two or more classes, for
    each (image, truth class) whose map peak is known (``peaks``: image_id, class_id, peak_x,
    peak_y), whether the peak lies in a box of its own class (``own``), or in another class's box
    of the image and none of its own (``confused``: the map drew a neighbouring finding).
    Shares of the ``pairs``; NaN where there are none."""
    several = truth.groupby("image_id")["class_id"].nunique()
    sub = truth[truth["image_id"].isin(several.index[several >= 2])]
    at = {(r.image_id, int(r.class_id)): (r.peak_x, r.peak_y) for r in peaks.itertuples()}
    own = confused = pairs = 0
    for image_id, boxes in sub.groupby("image_id"):
        xyxy, classes = boxes[BOX_COLUMNS].to_numpy(np.float64), boxes["class_id"].to_numpy()
        for c in np.unique(classes):
            if (image_id, int(c)) not in at:
                continue
            inside = points_in_boxes(xyxy, *at[(image_id, int(c))])
            pairs += 1
            own += bool(inside[classes == c].any())
            confused += bool(inside[classes != c].any() and not inside[classes == c].any())
    return {"pairs": pairs, "own": own / pairs if pairs else np.nan, "confused": confused / pairs if pairs else np.nan}


LITERATURE_IOU = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # the T(IoU) columns of the NIH localisation tables
LITERATURE_IOBB = (0.1, 0.25, 0.5, 0.75, 0.9)  # ChestX-ray8's T(IoBB) columns


def literature_table(truth: pd.DataFrame, detections: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The NIH papers' localisation table: per class (and the mean over classes, "mean"), the share
    of truth boxes hit at each T(IoU) of :data:`LITERATURE_IOU` and T(IoBB) of :data:`LITERATURE_IOBB`
    (hit: some predicted box of the image and class above T, as :func:`accuracy_table`)."""
    scored = box_overlaps(truth, detections)
    rows = []
    for c, group in scored.groupby("class_id"):
        row = {"class": schema.class_name(int(c)), "n_boxes": len(group)}
        row.update({f"T(IoU)={t}": float((group["best_iou"] > t).mean()) for t in LITERATURE_IOU})
        row.update({f"T(IoBB)={t}": float((group["best_iobb"] > t).mean()) for t in LITERATURE_IOBB})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        mean = table.drop(columns=["class", "n_boxes"]).mean().to_dict()
        table = pd.concat([table, pd.DataFrame([{"class": "mean", "n_boxes": int(table["n_boxes"].sum()), **mean}])],
                          ignore_index=True)
    return table


def random_maps(n: int, seed, grid: int = 16, side: int = 256) -> np.ndarray:
    """``n`` random heat maps (side x side in [0, 1]): uniform noise on a ``grid`` lattice, bilinearly
    upsampled. ``seed``: an int, or a ``torch.Generator`` drawn on across calls. (torch is imported
    here, so that evaluating a submission alone never loads it.)"""
    import torch
    import torch.nn.functional as F

    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    maps = F.interpolate(torch.rand(n, 1, grid, grid, generator=generator), size=(side, side),
                         mode="bilinear", align_corners=False)[:, 0].numpy()
    return (maps - maps.min((1, 2), keepdims=True)) / np.ptp(maps, axis=(1, 2), keepdims=True)


def _chunked_maps(n: int, generator, grid: int, side: int, chunk: int = 256):
    """The ``n`` maps of :func:`random_maps` drawn ``chunk`` at a time: the same maps (the generator's
    stream does not depend on how it is cut), in memory that does not grow with the test set."""
    for start in range(0, n, chunk):
        yield from random_maps(min(chunk, n - start), generator, grid, side)


def random_truth_detections(truth: pd.DataFrame, sizes: dict[str, tuple[float, float]],
                            config: BoxConfig | BoxRules = BoxConfig(), grid: int = 16, side: int = 256,
                            repeats: int = 5, seed: int = 0) -> list[tuple[pd.DataFrame, pd.Series, pd.DataFrame]]:
    """Per repeat: the boxes cut from a random heat map for each truth (image, class) (the class
    given, as the ChestX-ray8 protocol maps it), the pointing game of that map's peak per truth box,
    and the truth boxes scored (those of images with a known size)."""
    import torch

    rules = config if isinstance(config, BoxRules) else BoxRules(config)
    gen = torch.Generator().manual_seed(seed)
    keys = truth[["image_id", "class_id"]].drop_duplicates().itertuples(index=False)
    keys = [k for k in keys if k.image_id in sizes]
    out = []
    for _ in range(repeats):
        dets, peaks = [], {}
        for key, cam in zip(keys, _chunked_maps(len(keys), gen, grid, side)):
            h, w = sizes[key.image_id]
            boxes, scores = cam_to_boxes(cam, 1.0, rules(key.class_id))
            for box, score in zip(scale_boxes(boxes, w / side, h / side), scores):
                dets.append((key.image_id, key.class_id, score, *box))
            px, py = cam_peak(cam)
            peaks[(key.image_id, key.class_id)] = (px * w / side, py * h / side)
        sub = truth[[(i, c) in peaks for i, c in zip(truth["image_id"], truth["class_id"])]]
        px, py = np.array([peaks[(i, c)] for i, c in zip(sub["image_id"], sub["class_id"])]).reshape(-1, 2).T
        inside = points_in_boxes(sub[BOX_COLUMNS].to_numpy(), px, py)
        out.append((pd.DataFrame(dets, columns=DETECTION_COLUMNS), pd.Series(inside, dtype=float), sub))
    return out


def random_control(truth: pd.DataFrame, sizes: dict[str, tuple[float, float]], schema: Schema,
                   config: BoxConfig | BoxRules = BoxConfig(), grid: int = 16, side: int = 256, repeats: int = 5,
                   seed: int = 0) -> pd.DataFrame:
    """:func:`accuracy_table` of boxes (and peaks) from random heat maps, averaged over ``repeats``."""
    tables = [accuracy_table(sub, dets, schema, inside)
              for dets, inside, sub in random_truth_detections(truth, sizes, config, grid, side, repeats, seed)]
    return mean_table(tables)


def mean_table(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Tables of the same rows and columns averaged, the text columns and box counts kept."""
    out = tables[0].copy()
    numeric = out.columns.drop(["class", "n_boxes"])
    out[numeric] = np.mean([t[numeric].to_numpy() for t in tables], axis=0)
    return out


def best_ious(cam: np.ndarray, truth: np.ndarray, thresholds=CAM_THRESHOLDS) -> np.ndarray:
    """At each threshold: the best IoU between any component box of ``cam >= t`` and any truth
    box (map pixels), 0 where nothing is above ``t``."""
    rows = components(cam, thresholds, statistics=False)
    out = np.zeros(len(thresholds))
    if len(rows) and len(truth):
        np.maximum.at(out, rows[:, T].astype(np.int64), pairwise_iou(rows[:, X0:Y1 + 1], truth).max(1))
    return out


def pair_curves(cam: np.ndarray, truth: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_ious` of one class's map (input pixels) and of its random-map control, seeded by
    ``key`` (the same draw in every run and process), at :data:`CURVE_SIDE` pixels at most."""
    side = min(CURVE_SIDE, max(cam.shape))
    factor = side / np.array(cam.shape[::-1], np.float64)
    if max(cam.shape) > side:
        cam = cv2.resize(np.asarray(cam, np.float32), (side, side), interpolation=cv2.INTER_AREA)
    truth = scale_boxes(truth, factor[0], factor[1])
    control = random_maps(1, zlib.crc32(key.encode()), side=side)[0]
    return best_ious(cam, truth), best_ious(control, truth)


def box_accuracy(ious: np.ndarray, deltas=IOU_DELTAS) -> np.ndarray:
    """BoxAcc(t, d): len(deltas) x thresholds, the share of pairs (rows of ``ious``) whose best IoU is >= d."""
    ious = np.asarray(ious, np.float64).reshape(-1, len(CAM_THRESHOLDS))
    return np.stack([(ious >= d).mean(0) if len(ious) else np.zeros(ious.shape[1]) for d in deltas])


def maxboxacc_table(curves: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Per source (model / random map) and class (and "all"): pairs, MaxBoxAccV2, and per IoU d
    the best box accuracy and the threshold that reaches it. ``curves``: image_id, class_id,
    source, CURVE_COLUMNS."""
    rows = []
    for source, by_source in curves.groupby("source", sort=False):
        groups = [*((schema.class_name(int(c)), g) for c, g in by_source.groupby("class_id")), ("all", by_source)]
        for name, group in groups:
            acc = box_accuracy(group[CURVE_COLUMNS].to_numpy())
            row = {"source": source, "class": name, "n_pairs": len(group), "maxboxacc_v2": float(acc.max(1).mean())}
            for d, curve in zip(IOU_DELTAS, acc):
                row[f"boxacc@{d}"] = float(curve.max())
                row[f"best_t@{d}"] = float(CAM_THRESHOLDS[int(np.argmax(curve))])
            rows.append(row)
    return pd.DataFrame(rows)


def curve_table(curves: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """BoxAcc(t, d) in long form: source, class (and "all"), iou (d), threshold, accuracy."""
    rows = []
    for source, by_source in curves.groupby("source", sort=False):
        groups = [*((schema.class_name(int(c)), g) for c, g in by_source.groupby("class_id")), ("all", by_source)]
        for name, group in groups:
            for d, curve in zip(IOU_DELTAS, box_accuracy(group[CURVE_COLUMNS].to_numpy())):
                rows += [(source, name, d, t, float(a)) for t, a in zip(CAM_THRESHOLDS, curve)]
    return pd.DataFrame(rows, columns=["source", "class", "iou", "threshold", "accuracy"])


def plot_box_accuracy(curves: pd.DataFrame, path) -> None:
    """Box accuracy against the map threshold over every pair, one line per IoU d, the random-map
    control dashed: where the model's curve peaks is the threshold to use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrcam.files import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (source, group), style in zip(curves.groupby("source", sort=False), ("-", "--")):
        for d, curve, colour in zip(IOU_DELTAS, box_accuracy(group[CURVE_COLUMNS].to_numpy()), ("C0", "C1", "C2")):
            ax.plot(CAM_THRESHOLDS, curve, style, color=colour, label=f"{source}, IoU >= {d} (max {curve.max():.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="heat map threshold", ylabel="box accuracy (share of truth image-classes)",
           title=f"Box accuracy over {len(curves) // max(1, curves['source'].nunique())} truth image-classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path, bbox_inches="tight")


def random_detections(probs: pd.DataFrame, sizes: dict[str, tuple[float, float]], rules: BoxRules,
                      thresholds: np.ndarray, side: int = 256) -> pd.DataFrame:
    """The submission rows localize would write if every map were random: each image's classes
    above their decision ``thresholds`` (``probs``: image_id + one column per class id, in order)
    get boxes cut from a random map seeded by the pair, scored with the classifier's probability."""
    rows = []
    values = probs.drop(columns="image_id").to_numpy(np.float64)
    for image_id, p in zip(probs["image_id"], values):
        if image_id not in sizes:
            continue
        h, w = sizes[image_id]
        for c in np.flatnonzero(p > thresholds):
            cam = random_maps(1, zlib.crc32(f"{image_id}/{c}".encode()), side=side)[0]
            boxes, scores = cam_to_boxes(cam, float(p[c]), rules(c))
            rows += [(image_id, int(c), s, *b) for b, s in zip(scale_boxes(boxes, w / side, h / side), scores)]
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)
