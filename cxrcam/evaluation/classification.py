"""Image-level classification metrics: AUROC per class (scikit-learn), the per-class operating points
that decide which classes an image is called positive for, and sensitivity and specificity there."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc_per_class(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC of each class column; NaN where a class has only one label value (undefined)."""
    targets = (np.asarray(targets) >= 0.5).astype(int)
    out = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        if 0 < targets[:, c].sum() < len(targets):
            out[c] = roc_auc_score(targets[:, c], probs[:, c])
    return out


def defined_mean(values: np.ndarray) -> float:
    """Mean over the classes where a figure is defined (NaN if none): a class without positives has
    no AUROC or sensitivity, and is left out rather than counted as 0."""
    values = np.asarray(values, np.float64)
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if len(valid) else float("nan")


def mean_auroc(per_class: np.ndarray) -> float:
    """Mean over the classes where AUROC is defined (NaN if none)."""
    return defined_mean(per_class)


MIN_POSITIVES = 3  # fewer validation positives than this: no operating point of the class's own


def operating_points(targets: np.ndarray, probs: np.ndarray, min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Each class's decision threshold: the probability that maximises F1 on these labels (a class
    is predicted when p > threshold), halfway between the lowest probability it calls positive and
    the next one below; NaN where a class has fewer than ``min_positives`` positives.

    F1 rather than Youden's J: J rewards specificity on the many normal images as much as
    sensitivity on the few positive ones, so at a finding's prevalence of a few percent it keeps
    enough false positives to put several false classes on every picture; F1 weighs the
    predicted positives' precision, which is what the boxes and pictures show."""
    from sklearn.metrics import precision_recall_curve

    targets = (np.asarray(targets) >= 0.5).astype(int)
    probs = np.asarray(probs, np.float64)
    out = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        if targets[:, c].sum() < min_positives:
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, c], probs[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        cut = cuts[int(np.argmax(f1))]
        below = probs[probs[:, c] < cut, c]
        out[c] = float((cut + below.max()) / 2) if len(below) else float(np.nextafter(cut, -np.inf))
    return out


def sensitivity_specificity(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the share of positives and of negatives called right at ``thresholds`` (p > t)
    (NaN where a class has no positive, or no negative)."""
    truth = np.asarray(targets) >= 0.5
    called = np.asarray(probs) > np.asarray(thresholds)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (called & truth).sum(0) / truth.sum(0)
        spec = (~called & ~truth).sum(0) / (~truth).sum(0)
    return np.where(truth.sum(0) > 0, sens, np.nan), np.where((~truth).sum(0) > 0, spec, np.nan)
