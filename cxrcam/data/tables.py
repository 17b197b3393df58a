"""The common form every dataset reader produces, and its column names (defined once).

images: one row per image: ``image_id, path, width, height, patient_id, fold``, then a hard
    target ``y_<id>`` (0/1) and a soft target ``soft_<id>`` (share of readers who marked the
    class) per finding class.
boxes: one row per box in original pixels: ``image_id, class_id, x_min, y_min, x_max,
    y_max, rad_id`` (the reader, or ``"wbf"``/``"union"`` after fusion).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.schemas import Schema

BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
BOX_TABLE_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "rad_id"]
# predictions (localize, refine, a parsed submission.csv): boxes in original pixels
DETECTION_COLUMNS = ["image_id", "class_id", "score", *BOX_COLUMNS]
NORMAL_BOX = (0.0, 0.0, 1.0, 1.0)  # VinBigData's "No finding" box, in truth and submissions
# truth rows a reader dropped or fixed: the file, its row as a spreadsheet numbers it, what and what was done
INVALID_COLUMNS = ["file", "row", "image_id", "problem", "action"]
INVALID_FILE = "invalid_rows.csv"


def no_finding_rows(image_ids, class_id: int, scores=None) -> pd.DataFrame:
    """The "No finding" box of each image: truth rows, or predictions when ``scores`` are given."""
    rows = pd.DataFrame({"image_id": list(image_ids), "class_id": class_id})
    if scores is not None:
        rows["score"] = scores
    rows[BOX_COLUMNS] = NORMAL_BOX
    return rows


def boxes_by_image(truth: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (its truth boxes in BOX_COLUMNS, float64; their class ids)."""
    return {k: (g[BOX_COLUMNS].to_numpy(np.float64), g["class_id"].to_numpy()) for k, g in truth.groupby("image_id")}


def target_columns(schema: Schema) -> list[str]:
    return [f"y_{i}" for i in range(schema.num_findings)]


def soft_columns(schema: Schema) -> list[str]:
    return [f"soft_{i}" for i in range(schema.num_findings)]


def no_invalid() -> pd.DataFrame:
    return pd.DataFrame(columns=INVALID_COLUMNS)


def joined_invalid(*parts: pd.DataFrame) -> pd.DataFrame:
    """INVALID_COLUMNS tables as one (empty ones left out, so no all-NA column warnings)."""
    parts = [t for t in parts if len(t)]
    return pd.concat(parts, ignore_index=True) if parts else no_invalid()


@dataclass
class DatasetTables:
    schema: Schema
    images: pd.DataFrame
    boxes: pd.DataFrame
    invalid: pd.DataFrame = field(default_factory=no_invalid)  # INVALID_COLUMNS


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


def invalid_rows(source: str, rows, image_ids, problem: str, action: str = "dropped") -> pd.DataFrame:
    """INVALID_COLUMNS rows for the table rows ``rows`` (spreadsheet numbers) of ``source``."""
    rows = np.asarray(rows, dtype=np.int64)
    return pd.DataFrame({"file": source, "row": rows, "image_id": np.asarray(image_ids, dtype=object).astype(str),
                         "problem": problem, "action": action}, columns=INVALID_COLUMNS)


def check_boxes(boxes: pd.DataFrame, rows, images: pd.DataFrame, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Truth boxes a metric can trust, and INVALID_COLUMNS rows for the others. A box with a
    missing coordinate, inverted or with zero area is dropped; one past the image's edge is
    clipped to it (dropped when nothing is left). Edges are checked where the image's size is
    known (``images``: image_id, width, height), else only against 0. ``rows`` are the boxes'
    row numbers in ``source``."""
    xy = boxes[BOX_COLUMNS].to_numpy(np.float64)
    size = images.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
    size = size.astype("float64").reindex(boxes["image_id"].astype(str)).to_numpy()
    limit = np.where(np.isnan(size), np.inf, size)
    clipped = np.clip(xy, 0, np.concatenate([limit, limit], axis=1))
    missing = np.isnan(xy).any(axis=1)
    inverted = ~missing & ((xy[:, 2] < xy[:, 0]) | (xy[:, 3] < xy[:, 1]))
    moved = ~missing & ~inverted & (clipped != xy).any(axis=1)
    empty = ~missing & ~inverted & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    rows, ids = np.asarray(rows), boxes["image_id"].to_numpy()
    cases = [(missing, "missing coordinate", "dropped"), (inverted, "inverted (max < min)", "dropped"),
             (empty & moved, "outside the image", "dropped"), (empty & ~moved, "zero area", "dropped"),
             (moved & ~empty, "past the image edge", "clipped to the image")]
    invalid = [invalid_rows(source, rows[m], ids[m], problem, action) for m, problem, action in cases]
    keep = ~(missing | inverted | empty)
    kept = boxes.assign(**dict(zip(BOX_COLUMNS, clipped.T)))[keep].reset_index(drop=True)
    return kept, joined_invalid(*invalid)


def report_invalid(invalid: pd.DataFrame, folder: Path | None = None) -> None:
    """One warning counting the truth rows dropped or fixed, by problem; with ``folder``, the rows
    are listed in ``folder/invalid_rows.csv`` (a previous run's list is removed when none are)."""
    from cxrcam.files import write_csv

    listed = Path(folder) / INVALID_FILE if folder is not None else None
    if not len(invalid):
        if listed is not None:
            listed.unlink(missing_ok=True)
        return
    if listed is not None:
        write_csv(listed, invalid.sort_values(["file", "row"], kind="stable"))
    counts = invalid.groupby(["problem", "action"], sort=False).size()
    parts = ", ".join(f"{n} {problem} ({action})" for (problem, action), n in counts.items())
    where = f"; listed in {listed}" if listed is not None else ""
    files = ", ".join(sorted(set(invalid["file"])))
    warnings.warn(f"{files}: {len(invalid)} invalid truth row(s): {parts}{where}", stacklevel=2)


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

