"""The common form every dataset reader produces, and its column names (defined once).

images: one row per image: ``image_id, path, width, height, patient_id, fold``, then a hard
    target ``y_<id>`` (0/1) and a soft target ``soft_<id>`` (share of readers who marked the
    class) per finding class.
boxes: one row per box in original pixels: ``image_id, class_id, x_min, y_min, x_max,
    y_max, rad_id`` (the reader, or ``"wbf"``/``"union"`` after fusion).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.schemas import Schema

BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
BOX_TABLE_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "rad_id"]
# predictions (localize, refine, a parsed submission.csv): boxes in original pixels
DETECTION_COLUMNS = ["image_id", "class_id", "score", *BOX_COLUMNS]
NORMAL_BOX = (0.0, 0.0, 1.0, 1.0)  # VinBigData's "No finding" box, in truth and submissions


def no_finding_rows(image_ids, class_id: int, scores=None) -> pd.DataFrame:
    """The "No finding" box of each image: truth rows, or predictions when ``scores`` are given."""
    rows = pd.DataFrame({"image_id": list(image_ids), "class_id": class_id})
    if scores is not None:
        rows["score"] = scores
    rows[BOX_COLUMNS] = NORMAL_BOX
    return rows


def target_columns(schema: Schema) -> list[str]:
    return [f"y_{i}" for i in range(schema.num_findings)]


def soft_columns(schema: Schema) -> list[str]:
    return [f"soft_{i}" for i in range(schema.num_findings)]


@dataclass
class DatasetTables:
    schema: Schema
    images: pd.DataFrame
    boxes: pd.DataFrame


def empty_boxes(columns: list[str] = BOX_TABLE_COLUMNS) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object" if c in ("image_id", "rad_id") else "float64")
                         for c in columns}).astype({"class_id": "int64"})


def require_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    """A table missing a column is a user error: name the columns and the file."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        from cxrcam.errors import CxrcamError

        raise CxrcamError(f"{source}: missing column(s) {', '.join(missing)} "
                          f"(found: {', '.join(map(str, df.columns))})")


def numeric(df: pd.DataFrame, columns: list[str], source: str, blank: bool = True) -> pd.DataFrame:
    """``columns`` as floats. Text, or an empty cell unless ``blank``, is a user error naming the
    file, the row (as a spreadsheet numbers it: header = 1) and the column."""
    values = df[columns].apply(pd.to_numeric, errors="coerce")
    bad = (values.isna() & (df[columns].notna() if blank else True)).to_numpy()
    if bad.any():
        from cxrcam.errors import CxrcamError

        row, col = np.argwhere(bad)[0]
        cell = df[columns[col]].iloc[row]
        what = "is empty" if pd.isna(cell) else f"{cell!r} is not a number"
        raise CxrcamError(f"{source} row {row + 2}: {columns[col]} {what}")
    return values


def read_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures (missing, empty, binary, malformed) are one line naming the file."""
    from cxrcam.errors import CxrcamError

    path = Path(path)
    if not path.is_file():
        raise CxrcamError(f"table not found: {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise CxrcamError(f"{path}: empty file, not a CSV table") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise CxrcamError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None

