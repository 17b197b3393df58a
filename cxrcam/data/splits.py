"""Cross-validation folds: by patient (never by image), stratified by finding, seeded.

Each image gets ``fold`` in 0..n_folds-1; images of an official test list keep ``fold == -1``
and are never put in a training fold. Datasets without patient ids (VinBigData) group by image.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cxrcam.data.tables import target_columns
from cxrcam.errors import CxrcamError
from cxrcam.schemas import Schema


def assign_folds(images: pd.DataFrame, schema: Schema, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Return a copy of ``images`` with a ``fold`` column filled in."""
    out = images.copy()
    test = out["fold"].to_numpy() == -1 if "fold" in out else np.zeros(len(out), bool)
    pool = np.flatnonzero(~test)
    if n_folds < 2:
        raise CxrcamError(f"split.n_folds must be at least 2, got {n_folds}")
    if len(pool) < n_folds:
        raise CxrcamError(f"cannot split {len(pool)} images into {n_folds} folds")
    y = out[target_columns(schema)].to_numpy()[pool]
    # Stratify on each image's rarest finding (or "normal"), the multi-label proxy
    # most VinBigData/NIH pipelines use with StratifiedKFold.
    freq = y.sum(axis=0)
    rarity = np.where(y > 0, freq[None, :], np.inf)
    key = np.where(y.any(axis=1), rarity.argmin(axis=1), schema.num_findings)
    patient = out["patient_id"].where(out["patient_id"].notna(), out["image_id"]).astype(str).to_numpy()
    folds = np.full(len(out), -1, dtype=np.int64)
    if np.bincount(key).max() < n_folds:  # no class fills every fold: stratifying is impossible
        warnings.warn(f"{len(pool)} images: no finding (or normal) has {n_folds} images to stratify {n_folds} folds "
                      f"by; folds drawn at random by patient (seed {seed})", stacklevel=2)
        groups, index = np.unique(patient[pool], return_inverse=True)
        order = np.random.default_rng(seed).permutation(len(groups))
        folds[pool] = (np.argsort(order) % n_folds)[index]
    else:
        from sklearn.model_selection import StratifiedGroupKFold  # here: a second to import, for prepare alone

        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # small classes with fewer members than folds are fine
            warnings.simplefilter("ignore", UserWarning)
            for k, (_, held) in enumerate(splitter.split(pool, key, groups=patient[pool])):
                folds[pool[held]] = k
    out["fold"] = folds
    return out


def train_val_rows(folds: np.ndarray, val_fold: int, where: object = "the cache") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) for holding out ``val_fold``; official test rows (-1) in neither."""
    val = np.flatnonzero(folds == val_fold)
    train = np.flatnonzero((folds != val_fold) & (folds != -1))
    if len(val) == 0 or len(train) == 0:
        raise CxrcamError(f"split.val_fold={val_fold} leaves {len(train)} training and {len(val)} validation "
                          f"images in {where}; folds present: {sorted(set(folds.tolist()))}")
    return train, val
