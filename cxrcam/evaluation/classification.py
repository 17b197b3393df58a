"""Image-level classification metrics (scikit-learn's AUROC per class)."""
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


def mean_auroc(per_class: np.ndarray) -> float:
    """Mean over the classes where AUROC is defined (NaN if none)."""
    valid = per_class[~np.isnan(per_class)]
    return float(valid.mean()) if len(valid) else float("nan")
