"""Read VinBigData, NIH ChestX-ray14 and RSNA Pneumonia exactly as released.

Each reader returns :class:`~cxrcam.data.tables.DatasetTables` (see that module for the
columns). Images listed in a table but absent on disk keep ``path`` empty; ``prepare``
reports them as failures instead of dropping them silently.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.boxes import xywh_to_xyxy
from cxrcam.config import FusionConfig
from cxrcam.data.fusion import MAJORITY, fuse_boxes
from cxrcam.data.images import DICOM_SUFFIXES, IMAGE_SUFFIXES, image_size
from cxrcam.data.tables import (BOX_COLUMNS, BOX_TABLE_COLUMNS, DatasetTables, check_boxes, empty_boxes,
                                invalid_rows, joined_invalid, numeric, read_table, require_columns, soft_columns,
                                target_columns)
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH, RSNA, SCHEMAS, VINBIG, Schema

VINBIG_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS]


def read_dataset(kind: str, root: str | Path, fusion: FusionConfig = FusionConfig()) -> DatasetTables:
    """Read the dataset ``kind`` (a name of :data:`~cxrcam.schemas.SCHEMAS`) from its released folder layout."""
    readers = {VINBIG.name: read_vinbig, NIH.name: read_nih, RSNA.name: read_rsna}
    if kind not in readers:
        raise CxrcamError(f"unknown dataset {kind!r}; choose one of {', '.join(SCHEMAS)}")
    root = Path(root)
    if not root.is_dir():
        raise CxrcamError(f"dataset folder not found: {root}")
    return readers[kind](root, fusion=fusion)


def index_images(folder: Path | None) -> dict[str, Path]:
    """Map file stem and file name -> path for every image in ``folder`` (DICOM preferred).
    VinBigData and RSNA ids are stems; NIH ids are file names."""
    found: dict[str, Path] = {}
    if folder is None or not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES and (p.stem not in found or suffix in DICOM_SUFFIXES):
            found[p.stem] = found[p.name] = p
    return found


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir() and any(c.iterdir())), None)


def _image_table(schema: Schema, ids: pd.Index, paths: dict[str, Path], patient: pd.Series,
                 hard: np.ndarray, soft: np.ndarray) -> pd.DataFrame:
    images = pd.DataFrame({"image_id": ids.astype(str)})
    images["path"] = [str(paths[i]) if i in paths else None for i in images["image_id"]]
    images["width"] = pd.array([pd.NA] * len(images), dtype="Int64")
    images["height"] = pd.array([pd.NA] * len(images), dtype="Int64")
    images["patient_id"] = patient.astype(str).to_numpy()
    images["fold"] = 0
    images[target_columns(schema)] = hard.astype(np.int8)
    images[soft_columns(schema)] = soft.astype(np.float32)
    _fill_sizes(images)
    return images


def _fill_sizes(images: pd.DataFrame) -> None:
    """Original width/height from file headers (no pixel decoding), where files exist."""
    have = images["path"].notna().to_numpy()
    if not have.any():
        return

    def probe(path: str):
        try:
            return image_size(path)
        except Exception:  # an unreadable file is reported by whoever decodes it
            return (pd.NA, pd.NA)

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(probe, images.loc[have, "path"]))
    images.loc[have, "height"] = [s[0] for s in sizes]
    images.loc[have, "width"] = [s[1] for s in sizes]


def read_vinbig(root: Path, fusion: FusionConfig = FusionConfig(),
                table: Path | None = None) -> DatasetTables:
    """``root/train.csv`` + ``root/train/<image_id>.dicom`` (or ``.dcm``/``.png``, or files in root);
    a labelled held-out split is ``test.csv`` + ``test/``."""
    table = table or next((root / n for n in VINBIG.label_tables if (root / n).is_file()), root / "train.csv")
    df = read_table(table)
    return vinbig_from_table(df, index_images(_first_dir(root / table.stem, root)), fusion, str(table))


def vinbig_from_table(df: pd.DataFrame, paths: dict[str, Path] | None = None,
                      fusion: FusionConfig = FusionConfig(), source: str = "train.csv") -> DatasetTables:
    require_columns(df, VINBIG_COLUMNS, source)
    schema = VINBIG
    class_id = numeric(df, ["class_id"], source, blank=False)["class_id"]
    bad = ~class_id.between(0, schema.num_findings) | (class_id != class_id.round())
    if bad.any():
        raise CxrcamError(f"{source} row {int(np.flatnonzero(bad)[0]) + 2}: class_id {class_id[bad].iloc[0]:g} "
                          f"is not one of 0..{schema.num_findings}")
    df = df.assign(image_id=df["image_id"].astype(str), class_id=class_id.astype(int),
                   row=np.arange(len(df)) + 2, **numeric(df, BOX_COLUMNS, source))
    # a row whose class_name is not its class_id's name is trusted for neither
    names = np.array([*schema.findings, schema.no_finding])
    wrong = (df["class_name"].astype(str).str.strip() != names[df["class_id"]]).to_numpy()
    invalid = [invalid_rows(source, df["row"][wrong], df["image_id"][wrong], "class_name disagrees with class_id")]
    df = df[~wrong]
    ids = pd.Index(df["image_id"].unique())
    findings = df[df["class_id"] != schema.no_finding_id]
    # soft target = share of the image's readers who marked the class
    n_readers = df.groupby("image_id")["rad_id"].nunique().reindex(ids)
    marked = (findings.groupby(["image_id", "class_id"])["rad_id"].nunique()
              .unstack(fill_value=0).reindex(index=ids, columns=range(schema.num_findings), fill_value=0))
    soft = marked.to_numpy(np.float32) / n_readers.to_numpy(np.float32)[:, None]
    # a finding is an image's label where any reader marked it; with fusion.method=majority, where 2 of 3 did
    needed = np.minimum(MAJORITY, n_readers.to_numpy())[:, None] if fusion.method == "majority" else 1
    images = _image_table(schema, ids, paths or {}, pd.Series(ids), marked.to_numpy() >= needed, soft)
    images["patient_id"] = None  # VinBigData releases no patient ids
    raw, bad_boxes = check_boxes(findings[BOX_TABLE_COLUMNS], findings["row"], images, source)
    return DatasetTables(schema, images, fuse_boxes(raw, fusion, n_readers.to_dict()),
                         joined_invalid(*invalid, bad_boxes))


def read_nih(root: Path, fusion: FusionConfig = FusionConfig()) -> DatasetTables:
    """``root/images/*.png`` + ``Data_Entry_2017*.csv`` [+ ``BBox_List_2017.csv``]
    [+ ``train_val_list.txt``/``test_list.txt``]. NIH boxes have one reader; ``fusion`` is unused."""
    entries = sorted(root.glob("Data_Entry_2017*.csv"))
    if not entries:
        raise CxrcamError(f"{root}: no Data_Entry_2017*.csv label table")
    bbox = root / "BBox_List_2017.csv"
    test_list = root / "test_list.txt"
    return nih_from_tables(read_table(entries[-1]), read_table(bbox) if bbox.is_file() else None,
                           index_images(_first_dir(root / "images", root)),
                           test_list.read_text().split() if test_list.is_file() else None)


def nih_from_tables(entry: pd.DataFrame, bbox: pd.DataFrame | None = None,
                    paths: dict[str, Path] | None = None, test_ids: list[str] | None = None) -> DatasetTables:
    schema = NIH
    require_columns(entry, ["Image Index", "Finding Labels", "Patient ID"], "Data_Entry_2017.csv")
    again = entry["Image Index"].astype(str).duplicated().to_numpy()  # one image, one row: the first is kept
    invalid = [invalid_rows("Data_Entry_2017.csv", np.flatnonzero(again) + 2, entry["Image Index"][again],
                            "image listed again")]
    entry = entry[~again]
    ids = pd.Index(entry["Image Index"].astype(str))
    hard = np.zeros((len(ids), schema.num_findings), np.float32)
    for row, labels in enumerate(entry["Finding Labels"].astype(str)):
        for name in labels.split("|"):
            try:
                cid = schema.class_id(name.strip())
            except KeyError as exc:
                raise CxrcamError(f"Data_Entry_2017.csv row {row + 2}: {exc.args[0]}") from None
            if cid != schema.no_finding_id:
                hard[row, cid] = 1
    images = _image_table(schema, ids, paths or {}, entry["Patient ID"], hard, hard)
    if test_ids is not None:
        images.loc[images["image_id"].isin(set(test_ids)), "fold"] = -1
    boxes = empty_boxes()
    if bbox is not None:
        if bbox.shape[1] < 6:
            raise CxrcamError("BBox_List_2017.csv: expected columns Image Index, Finding Label, x, y, w, h")
        xyxy = xywh_to_xyxy(numeric(bbox, list(bbox.columns[2:6]), "BBox_List_2017.csv", blank=False).to_numpy())
        boxes = pd.DataFrame(xyxy, columns=BOX_COLUMNS)
        boxes.insert(0, "class_id", [_nih_class(n, row) for row, n in enumerate(bbox.iloc[:, 1].astype(str))])
        boxes.insert(0, "image_id", bbox.iloc[:, 0].astype(str).to_numpy())
        boxes["rad_id"] = "nih"
        boxes, bad_boxes = check_boxes(boxes, np.arange(len(boxes)) + 2, images, "BBox_List_2017.csv")
        invalid.append(bad_boxes)
    return DatasetTables(schema, images, boxes, joined_invalid(*invalid))


def _nih_class(name: str, row: int) -> int:
    try:
        return NIH.class_id(name.strip())
    except KeyError:
        raise CxrcamError(f"BBox_List_2017.csv row {row + 2}: unknown NIH finding {name!r} "
                          f"(one of {', '.join(NIH.findings)})") from None


def read_rsna(root: Path, fusion: FusionConfig = FusionConfig()) -> DatasetTables:
    """``root/stage_2_train_labels.csv`` + ``<patientId>.dcm`` in ``stage_2_train_images/`` or root."""
    table = root / "stage_2_train_labels.csv"
    paths = index_images(_first_dir(root / "stage_2_train_images", root))
    return rsna_from_table(read_table(table), paths)


def rsna_from_table(df: pd.DataFrame, paths: dict[str, Path] | None = None) -> DatasetTables:
    schema = RSNA
    require_columns(df, ["patientId", "x", "y", "width", "height", "Target"], "stage_2_train_labels.csv")
    ids = pd.Index(df["patientId"].astype(str).unique())
    positive = df.groupby("patientId")["Target"].max().reindex(ids).to_numpy(np.float32)[:, None]
    images = _image_table(schema, ids, paths or {}, pd.Series(ids), positive, positive)
    pos = df.reset_index(drop=True)
    pos = pos[pos["Target"] == 1]
    xywh = numeric(pos, ["x", "y", "width", "height"], "stage_2_train_labels.csv").to_numpy()
    boxes = pd.DataFrame(xywh_to_xyxy(xywh), columns=BOX_COLUMNS)
    boxes.insert(0, "class_id", 0)
    boxes.insert(0, "image_id", pos["patientId"].astype(str).to_numpy())
    boxes["rad_id"] = "rsna"
    boxes, invalid = check_boxes(boxes, pos.index + 2, images, "stage_2_train_labels.csv")
    return DatasetTables(schema, images, boxes, invalid)


__all__ = ["read_dataset", "read_vinbig", "read_nih", "read_rsna", "vinbig_from_table",
           "nih_from_tables", "rsna_from_table", "index_images"]
