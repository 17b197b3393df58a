"""Confidence intervals and paired comparisons for ``cxrcam evaluate``, by bootstrap over images.

What is resampled: the ground-truth images, with replacement, ``n`` times (seeded); an image drawn
k times counts k times, with all its truth boxes and all its predictions. Every figure of a
resample is what the plain evaluator would give on that resample, without re-running it:

* matching is within an image, so the detections' true/false-positive flags are computed once;
  a resample only re-weights them (and the truth counts) by how often each image was drawn, and
  VOC AP is the weighted sum of each true positive's recall step times the precision envelope;
* AUROC is the weighted Mann-Whitney statistic (ties count half);
* the ChestX-ray8 accuracies, the pointing game and MaxBoxAccV2 are weighted shares over truth
  boxes / (image, class) pairs; the RSNA score is the weighted mean of the scored images' scores.

The intervals are percentile intervals (95% by default): BCa would need a jackknife, one full
evaluation per image, which costs more than the resamples on a 3,000-image test set; with 1,000
resamples the percentile interval is the one medical-imaging papers most often report.
Several submissions scored on the same resamples are a paired comparison: the interval and the
two-sided bootstrap p-value of each pair's difference (the share of resamples on the far side of
zero, doubled, at most 1) come from the same draws of images.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from cxrcam.evaluation.detection import match_detections, truth_by_image
from cxrcam.evaluation.weak import CURVE_COLUMNS, IOU_DELTAS

CHUNK = 200  # resamples computed at once: memory B x detections of a class
LEVEL = 0.95


def weights(n_images: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` x ``n_images``: how many times each image is drawn in each resample (seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n, n_images))
    return np.stack([np.bincount(row, minlength=n_images) for row in draws]).astype(np.float64)


@dataclass
class MatchedClass:
    """One class's detections, ranked best first, matched once."""

    image: np.ndarray  # index of each detection's image
    tp: np.ndarray  # its true-positive flag
    truth: np.ndarray  # truth boxes of the class per image index


def match_classes(truth: pd.DataFrame, detections: pd.DataFrame, image_ids: list[str], iou_thr: float
                  ) -> dict[int, MatchedClass]:
    """Every class of ``truth`` or ``detections``, matched as :func:`cxrcam.evaluation.detection.voc_map`
    matches them, indexed by position in ``image_ids``."""
    index = pd.Index(image_ids)
    out = {}
    for c in sorted(set(truth["class_id"]) | set(detections["class_id"])):
        t, d = truth[truth["class_id"] == c], detections[detections["class_id"] == c]
        order = np.argsort(-d["score"].to_numpy(np.float64), kind="stable")
        ids = d["image_id"].to_numpy()[order]
        boxes = d[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)[order]
        tp = match_detections(truth_by_image(t), ids, boxes, iou_thr)
        counts = np.bincount(index.get_indexer(t["image_id"]), minlength=len(index)).astype(np.float64)
        out[int(c)] = MatchedClass(index.get_indexer(ids), tp, counts)
    return out


def weighted_ap(m: MatchedClass, w: np.ndarray) -> np.ndarray:
    """VOC 2010 AP of the class under each row of image weights ``w`` (B x images); NaN where a
    resample holds none of its truth boxes."""
    n_truth = w @ m.truth
    hits = np.flatnonzero(m.tp)
    if not len(hits):
        return np.where(n_truth > 0, 0.0, np.nan)
    # Only the true positives' precisions matter: between two of them precision only falls (false
    # positives add to the count alone), so the envelope at a true positive is the largest precision
    # at this or a later true positive.
    counts = np.cumsum(w[:, m.image[:hits[-1] + 1]], axis=1)[:, hits]
    tp_weight = w[:, m.image[hits]]
    precision = np.cumsum(tp_weight, axis=1) / np.maximum(counts, np.finfo(np.float64).eps)
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_truth > 0, (tp_weight * envelope).sum(1) / n_truth, np.nan)


def weighted_auroc(labels: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of one class under each row of image weights (B x images): the weighted Mann-Whitney
    statistic, ties counting half; NaN where a resample lacks positives or negatives."""
    order = np.argsort(probs, kind="stable")
    p, pos = probs[order], labels[order] >= 0.5
    w = w[:, order]
    starts, ends = np.searchsorted(p, p, "left"), np.searchsorted(p, p, "right")
    negatives = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * ~pos, axis=1)], axis=1)
    below, tied = negatives[:, starts], negatives[:, ends] - negatives[:, starts]
    u = (w * pos * (below + 0.5 * tied)).sum(1)
    n_pos, n_neg = (w * pos).sum(1), (w * ~pos).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def weighted_share(values: np.ndarray, image: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean of per-item ``values`` (NaN items skipped) whose images are ``image``."""
    keep = np.isfinite(values)
    iw = w[:, image[keep]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (iw @ values[keep]) / iw.sum(1)


def weighted_maxboxacc(curves: np.ndarray, image: np.ndarray, w: np.ndarray) -> np.ndarray:
    """MaxBoxAccV2 of (image, class) pairs' best-IoU curves (pairs x thresholds) under each weight row."""
    iw = w[:, image]
    total = iw.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.mean([((iw @ (curves >= d)) / total).max(1) for d in IOU_DELTAS], axis=0)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the defined samples (NaN, NaN where none is)."""
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the share of resamples on the far side
    of zero from the mean difference (zero itself on both sides), at most 1."""
    d = differences[np.isfinite(differences)]
    if not len(d):
        return float("nan")
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


@dataclass
class Inputs:
    """What one submission's figures are computed from, matched once."""

    classes: dict[int, MatchedClass]
    findings: list[int]  # the class ids that are findings (not "No finding")
    names: dict[int, str]
    labels: np.ndarray | None = None  # images x findings, AUROC's truth
    probs: np.ndarray | None = None  # images x findings
    boxes: pd.DataFrame | None = None  # per truth box: image index, best_iou, best_iobb, pointing
    curves: tuple[np.ndarray, np.ndarray] | None = None  # (image index per pair, pairs x thresholds)
    rsna: np.ndarray | None = None  # per image, its RSNA score (NaN: skipped), when scored in RSNA's format


def figures(x: Inputs, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every headline figure under each row of image weights (B x images): name -> B values."""
    ap = {c: weighted_ap(m, w) for c, m in x.classes.items()}
    out: dict[str, np.ndarray] = {}
    present = np.array([ap[c] for c in ap]) if ap else np.full((1, len(w)), np.nan)
    with np.errstate(invalid="ignore"), _quiet():
        out["mAP@0.4"] = np.nanmean(present, axis=0)
        findings = [ap[c] for c in x.findings if c in ap]
        out["findings mAP@0.4"] = np.nanmean(findings, axis=0) if findings else np.full(len(w), np.nan)
    for c, values in ap.items():
        out[f"AP {x.names.get(c, c)}"] = values
    if x.labels is not None:
        per = np.array([weighted_auroc(x.labels[:, k], x.probs[:, k], w) for k in range(x.labels.shape[1])])
        with _quiet():
            out["mean AUROC"] = np.nanmean(per, axis=0)
    if x.boxes is not None and len(x.boxes):
        image = x.boxes["image"].to_numpy()
        for key, column, t in (("T(IoU)=0.1", "best_iou", 0.1), ("T(IoU)=0.5", "best_iou", 0.5),
                               ("T(IoBB)=0.5", "best_iobb", 0.5)):
            out[key] = weighted_share((x.boxes[column].to_numpy() > t).astype(float), image, w)
        if "pointing" in x.boxes:
            out["pointing game"] = weighted_share(x.boxes["pointing"].to_numpy(float), image, w)
    if x.curves is not None and len(x.curves[0]):
        out["MaxBoxAccV2"] = weighted_maxboxacc(x.curves[1], x.curves[0], w)
    if x.rsna is not None:
        out["RSNA score"] = weighted_share(x.rsna, np.arange(len(x.rsna)), w)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """np.nanmean of an all-NaN column warns; an undefined figure is NaN here, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


FEW_IMAGES = 20  # below this, resampling images gives intervals that say little (often a single point)


def bootstrap(inputs: list[Inputs], n_images: int, n: int = 1000, seed: int = 0, level: float = LEVEL) -> dict:
    """Every submission's figures with their intervals, and every pair's differences with their
    intervals and p-values, all on the same ``n`` resamples of the ``n_images`` images (a warning
    under :data:`FEW_IMAGES`)."""
    if n_images < FEW_IMAGES:
        warnings.warn(f"bootstrap intervals from {n_images} image(s): a resample can only repeat these few, so the "
                      f"intervals are degenerate or far too narrow; score at least {FEW_IMAGES} images "
                      f"(hundreds for a useful interval)", stacklevel=3)
    point = [{k: float(v[0]) for k, v in figures(x, np.ones((1, n_images))).items()} for x in inputs]
    w_all = weights(n_images, n, seed)
    samples: list[dict[str, list[np.ndarray]]] = [{} for _ in inputs]
    for start in range(0, n, CHUNK):
        w = w_all[start:start + CHUNK]
        for k, x in enumerate(inputs):
            for name, values in figures(x, w).items():
                samples[k].setdefault(name, []).append(values)
    drawn = [{name: np.concatenate(parts) for name, parts in s.items()} for s in samples]
    result = {"method": "percentile", "level": level, "resamples": n, "seed": seed, "unit": "image",
              "submissions": [{name: {"value": point[k][name], "ci": interval(drawn[k][name], level)}
                               for name in point[k]} for k in range(len(inputs))], "pairs": []}
    for i in range(len(inputs)):
        for j in range(i + 1, len(inputs)):
            pair = {}
            for name in point[i].keys() & point[j].keys():
                d = drawn[j][name] - drawn[i][name]
                pair[name] = {"difference": point[j][name] - point[i][name], "ci": interval(d, level),
                              "p": p_value(d)}
            result["pairs"].append({"a": i, "b": j, "figures": pair})
    result["samples"] = drawn
    return result


__all__ = ["bootstrap", "Inputs", "match_classes", "weights", "weighted_ap", "weighted_auroc", "weighted_share",
           "weighted_maxboxacc", "interval", "p_value", "figures", "CURVE_COLUMNS"]
