"""``submission.csv`` in the competition's own format: VinBigData's ``image_id,PredictionString``
with groups of ``class_id confidence x_min y_min x_max y_max`` in original pixels, or, for RSNA
data, RSNA's ``patientId,PredictionString`` with groups of ``confidence x y width height``.

Written by localize and refine, read by evaluate, in this one module (the header says which layout a file has; a row
that would read as both is refused). Every input image gets exactly one row; VinBigData's "No
finding" is the group ``<no_finding_id> p_normal 0 0 1 1``; an image that could not be read keeps
an empty string, so it is visible, never dropped.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.boxes import xywh_to_xyxy
from cxrcam.data.tables import DETECTION_COLUMNS, empty_boxes, no_finding_rows, read_table
from cxrcam.errors import CxrcamError
from cxrcam.files import write_csv


def normal_scores(probs: np.ndarray, rule: str = "max") -> np.ndarray:
    """p_normal per image from finding probabilities (N x C): ``max`` = 1 - max_c p_c (the
    largest P(no finding) the marginals allow; ranks an image by its most likely finding),
    ``product`` = prod_c (1 - p_c) (findings assumed independent)."""
    probs = np.asarray(probs, np.float64)
    return 1 - probs.max(1) if rule == "max" else np.prod(1 - probs, axis=1)


ID_COLUMN = {"vinbig": "image_id", "rsna": "patientId"}


def submission_format(schema) -> str:
    """The competition format a dataset's submissions are written in: RSNA's for RSNA, else VinBigData's."""
    return "rsna" if schema.name == "rsna" else "vinbig"


def prediction_string(group: pd.DataFrame, fmt: str = "vinbig") -> str:
    """One image's detections (DETECTION_COLUMNS) as a PredictionString, best score first."""
    group = group.sort_values("score", ascending=False, kind="stable")
    if fmt == "rsna":
        return " ".join(f"{r.score:.6g} {r.x_min:.8g} {r.y_min:.8g} {r.x_max - r.x_min:.8g} {r.y_max - r.y_min:.8g}"
                        for r in group.itertuples())
    return " ".join(f"{int(r.class_id)} {r.score:.6g} {r.x_min:.8g} {r.y_min:.8g} {r.x_max:.8g} {r.y_max:.8g}"
                    for r in group.itertuples())


def submission_table(image_ids: list[str], detections: pd.DataFrame, normal: pd.Series | None = None,
                     no_finding_id: int | None = 14, fmt: str = "vinbig") -> pd.DataFrame:
    """``image_id,PredictionString`` (``patientId,...`` for ``fmt`` rsna) with every id in ``image_ids``
    once, in that order. ``normal`` (image_id -> p_normal) appends the "No finding" group to those images."""
    dets = detections[DETECTION_COLUMNS]
    if normal is not None and no_finding_id is not None:
        extra = no_finding_rows(normal.index, no_finding_id, normal.to_numpy())
        dets = pd.concat([dets, extra], ignore_index=True) if len(dets) else extra
    strings = (dets.groupby("image_id", sort=False).apply(prediction_string, fmt=fmt, include_groups=False)
               if len(dets) else {})
    return pd.DataFrame({ID_COLUMN[fmt]: image_ids, "PredictionString": [strings.get(i, "") for i in image_ids]})


def write_submission(path: str | Path, image_ids: list[str], detections: pd.DataFrame,
                     normal: pd.Series | None = None, no_finding_id: int | None = 14, fmt: str = "vinbig"
                     ) -> pd.DataFrame:
    table = submission_table(image_ids, detections, normal, no_finding_id, fmt)
    write_csv(path, table)
    return table


def read_submission(path: str | Path, num_classes: int = 15, image_ids: set[str] | None = None,
                    lenient: bool = False, fmt: str = "vinbig") -> pd.DataFrame:
    """Parse a submission (``fmt`` vinbig or rsna) into DETECTION_COLUMNS, boxes as xyxy.
    A malformed row (odd token count, non-number, x_max < x_min, class outside
    0..num_classes-1, image not in ``image_ids``) is an error naming the row, or is skipped
    with a warning when ``lenient``."""
    return parse_submission(path, num_classes, image_ids, lenient, fmt)[0]


def parse_submission(path: str | Path, num_classes: int = 15, image_ids: set[str] | None = None,
                     lenient: bool = False, fmt: str = "vinbig") -> tuple[pd.DataFrame, set[str], int]:
    """``read_submission``'s detections, the ids the file lists and the number of rows skipped
    (returned apart: pandas deep-copies ``attrs`` on every operation, 40x slower evaluate)."""
    path = Path(path)
    if not path.is_file():
        raise CxrcamError(f"submission not found: {path}")
    table = read_table(path, dtype=str, keep_default_na=False)
    id_col = next((c for c in ("image_id", "patientId") if c in table.columns), None)
    if id_col is None or "PredictionString" not in table.columns:
        raise CxrcamError(f"{path}: expected columns image_id,PredictionString (VinBigData) or "
                          f"patientId,PredictionString (RSNA) (found: {', '.join(table.columns)})")
    xywh = fmt == "rsna" or id_col == "patientId"  # RSNA's groups: confidence x y width height
    told = id_col == ID_COLUMN["rsna" if xywh else "vinbig"]  # the header agrees with the layout read
    table = table.rename(columns={id_col: "image_id"})
    _check_unique_ids(table["image_id"], path, lenient)
    records, skipped = [], 0
    for row, (image_id, text) in enumerate(zip(table["image_id"], table["PredictionString"]), start=2):
        try:
            records.extend(_parse(image_id, text, num_classes, image_ids, xywh, told))
        except ValueError as exc:
            message = f"{path} row {row} ({image_id}): {exc}"
            if not lenient:
                raise CxrcamError(message + " (use --lenient to skip such rows)") from None
            warnings.warn(message + "; row skipped", stacklevel=2)
            skipped += 1
    found = pd.DataFrame(records, columns=DETECTION_COLUMNS) if records else empty_boxes(DETECTION_COLUMNS)
    return found, set(table["image_id"]), skipped


def _check_unique_ids(ids: pd.Series, path: Path, lenient: bool) -> None:
    """An image listed twice would have both rows' boxes scored (Kaggle rejects such a file):
    an error naming the rows, or with ``lenient`` a warning (the rows' boxes are merged)."""
    repeated = ids[ids.duplicated(keep=False)]
    if repeated.empty:
        return
    first = repeated.iloc[0]
    rows = ", ".join(str(r + 2) for r in np.flatnonzero(ids.to_numpy() == first))
    message = (f"{path} rows {rows}: image id {first!r} is listed more than once "
               f"({repeated.nunique()} such id(s))")
    if not lenient:
        raise CxrcamError(message + " (use --lenient to merge their boxes)")
    warnings.warn(message + "; their boxes are merged", stacklevel=3)


def _parse(image_id: str, text: str, num_classes: int, image_ids: set[str] | None, xywh: bool,
           told: bool = True) -> list[tuple]:
    """One row's detections; where the header does not name the layout (``told``) a row that reads
    both as groups of 6 and of 5 is refused."""
    if image_ids is not None and image_id not in image_ids:
        raise ValueError("image id not in the ground truth")
    found = _groups(image_id, text, num_classes, xywh)
    if not told and found and len(text.split()) % 30 == 0:  # groups of 5 and of 6 both fit: the other reads too?
        try:
            _groups(image_id, text, num_classes, not xywh)
        except ValueError:
            return found
        raise ValueError("reads both as VinBigData groups (class confidence x_min y_min x_max y_max) and as RSNA "
                         "groups (confidence x y width height): name the layout by the header (image_id for "
                         "VinBigData, patientId for RSNA)")
    return found


def _groups(image_id: str, text: str, num_classes: int, xywh: bool) -> list[tuple]:
    tokens = text.split()
    n = 5 if xywh else 6
    if len(tokens) % n:
        layout = "confidence x y width height" if xywh else "class confidence x_min y_min x_max y_max"
        raise ValueError(f"{len(tokens)} tokens, not groups of {n} ({layout})")
    out = []
    for k in range(0, len(tokens), n):
        group = tokens[k:k + n] if not xywh else ["0", *tokens[k:k + n]]
        try:
            cls = float(group[0])
            score, x0, y0, x1, y1 = map(float, group[1:])
        except ValueError:
            raise ValueError(f"non-number in group {k // n + 1}: {' '.join(tokens[k:k + n])!r}") from None
        if xywh:
            if x1 < 0 or y1 < 0:
                raise ValueError(f"negative width or height in group {k // n + 1}")
            x0, y0, x1, y1 = xywh_to_xyxy([x0, y0, x1, y1])[0]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise ValueError(f"unknown class {group[0]!r} in group {k // n + 1}")
        if not all(np.isfinite([score, x0, y0, x1, y1])):
            raise ValueError(f"non-finite value in group {k // n + 1}")
        if x1 < x0 or y1 < y0:
            raise ValueError(f"x_max < x_min or y_max < y_min in group {k // n + 1}")
        out.append((image_id, int(cls), score, x0, y0, x1, y1))
    return out
