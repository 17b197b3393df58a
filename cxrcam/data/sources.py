"""What a command is pointed at, recognised once: a ``prepare`` cache, a dataset folder as
released, a plain folder of images, or one image file.

``open_source`` gives the images (with their labels and original sizes where known), the
truth boxes and the images that cannot be read; ``dataset.ImageFiles`` decodes them for a
DataLoader. (No torch here: ``evaluate`` reads truth through this module.)
``localize``/``refine`` stream the images, ``evaluate`` takes the truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.config import Config
from cxrcam.data.images import IMAGE_SUFFIXES
from cxrcam.data.tables import empty_boxes, no_invalid
from cxrcam.errors import CxrcamError
from cxrcam.schemas import PLAIN, SCHEMAS, Schema


@dataclass
class Source:
    """The images of an input and the truth known for them (original pixels)."""

    schema: Schema | None  # None: a plain folder of images, no labels
    # image_id, path (empty: file missing), height/width (NaN: taken from decoding), y_<id> labels when known
    images: pd.DataFrame
    truth: pd.DataFrame  # BOX_TABLE_COLUMNS
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # image_id, path, reason
    invalid: pd.DataFrame = field(default_factory=no_invalid)  # truth rows dropped or fixed by the reader
    kind: str = "folder"  # cache (with prepare's folds), dataset (a released layout), folder (plain images)

    @property
    def readable(self) -> pd.DataFrame:
        """The images that have a file."""
        return self.images[self.images["path"].notna()].reset_index(drop=True)


def detect_dataset(folder: Path) -> str | None:
    """The dataset whose label table lies in ``folder`` (None: none does)."""
    return next((name for name, s in SCHEMAS.items() if any(any(folder.glob(t)) for t in s.label_tables)), None)


def open_source(data: str | Path, dataset: str | None = None, config: Config = Config()) -> Source:
    """A cache (has cache.json), a dataset folder (``dataset`` or recognised by its label table), a
    plain folder of images (searched recursively) or one image file."""
    from cxrcam.data.cache import open_cache
    from cxrcam.data.readers import read_dataset

    data = Path(data)
    if not data.exists():
        raise CxrcamError(f"input not found: {data}")
    if (data / "cache.json").is_file():
        cache = open_cache(data)
        images = cache.images.assign(path=[str(data / f) for f in cache.images["file"]])
        failures = [(r.image_id, r.path, r.reason) for r in cache.failures.itertuples()]
        return Source(cache.schema, images, cache.boxes, failures, kind="cache")
    if dataset is None and data.is_dir():
        dataset = detect_dataset(data)
    if dataset not in (None, PLAIN):
        tables = read_dataset(dataset, data, config.fusion)
        images = tables.images.astype({"height": "float64", "width": "float64"})
        missing = images["path"].isna()
        failures = [(i, "", "file not found") for i in images.loc[missing, "image_id"]]
        return Source(tables.schema, images, tables.boxes, failures, tables.invalid, kind="dataset")
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CxrcamError(f"no images (DICOM, PNG, JPEG) found in {data}")
    ids = [p.stem if data.is_file() else str(p.relative_to(data).with_suffix("")) for p in files]
    _check_unique_ids(ids, files)
    images = pd.DataFrame({"image_id": ids, "path": [str(p) for p in files], "height": np.nan, "width": np.nan})
    return Source(None, images, empty_boxes(), [])


def _check_unique_ids(ids: list[str], files: list[Path]) -> None:
    """Two files under one id (``scan.dicom`` and ``scan.png``) would merge their boxes and
    overwrite each other's pictures: refuse, naming both."""
    seen: dict[str, Path] = {}
    for image_id, path in zip(ids, files):
        if image_id in seen:
            raise CxrcamError(f"{seen[image_id]} and {path} would both be image {image_id!r}: "
                              f"rename or move one of them")
        seen[image_id] = path


__all__ = ["Source", "open_source", "detect_dataset"]
