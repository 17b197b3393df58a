"""``cxrcam prepare``: decode every image once into a resized training cache, and read it back.

Layout of a cache folder::

    cache.json      dataset, schema, image size, fusion and split settings
    images/<id>.png size x size 8-bit grey
    manifest.csv    one row per cached image: the common image table plus
                    file, scale_x, scale_y (cache pixels per original pixel)
    boxes.csv       fused boxes in original pixels (x_min..) and in the cache frame (cx_min..)
    failures.csv    image_id, path, reason for every image that could not be cached
    progress.jsonl  append-only log of finished images; lets an interrupted run resume

Box coordinates map back exactly: original = cache / scale (both stored in full precision).
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cxrcam.boxes import scale_boxes
from cxrcam.config import Config, config_to_dict
from cxrcam.data.images import read_image, warn_squashed
from cxrcam.data.tables import BOX_COLUMNS, read_table, report_invalid, require_columns
from cxrcam.errors import CxrcamError, ImageReadError
from cxrcam.files import atomic_write_bytes, remove_stale_temporaries, write_csv, write_json
from cxrcam.runtime.progress import progress_bar
from cxrcam.schemas import Schema, get_schema

CACHE_BOX_COLUMNS = ["cx_min", "cy_min", "cx_max", "cy_max"]


@dataclass
class PrepareResult:
    cached: int
    skipped: int  # already done by an earlier run
    failed: int
    seconds: float


def _convert(job: tuple[str, str, str, int]) -> tuple[str, int | None, int | None, str | None]:
    """Worker: decode one image, resize, write PNG atomically. Never raises."""
    image_id, src, dst, size = job
    try:
        decoded = read_image(src, size)
        ok, png = cv2.imencode(".png", decoded.image)
        if not ok:
            raise ImageReadError(f"{src}: PNG encoding failed")
        atomic_write_bytes(dst, png.tobytes())
        return image_id, decoded.orig_height, decoded.orig_width, None
    except ImageReadError as exc:
        return image_id, None, None, str(exc)
    except Exception as exc:  # keep a 15,000-image run alive whatever one file does
        return image_id, None, None, f"{src}: {type(exc).__name__}: {exc}"


def _worker_init(parent: int | None = None) -> None:
    """Decoding setup; ``parent``: the pid a pool worker must not outlive (None: in-process)."""
    cv2.setNumThreads(1)  # one process per core; no oversubscription
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel ends this worker when the process that started it dies, so a prepare
    killed with SIGKILL leaves no decoding processes behind (nor, once they are gone, the
    resource tracker that waits on them)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _stamp(path: str) -> str:
    """Which file an image was cached from: its path, size and modification time (another dataset
    or a rewritten file under the same image id is decoded again, not taken from the cache)."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_progress(path: Path) -> dict[str, tuple[int, int, str | None]]:
    """image id -> (height, width, source stamp; None in logs written before stamps)."""
    done: dict[str, tuple[int, int, str | None]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["id"]] = (int(rec["h"]), int(rec["w"]), rec.get("src"))
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
    return done


CACHE_FILES = ("cache.json", "manifest.csv", "boxes.csv", "failures.csv", "progress.jsonl", "invalid_rows.csv")


def _check_existing(out: Path, dataset: str, size: int, overwrite: bool) -> None:
    """A cache of another dataset or size is refused, or with ``overwrite`` removed first (its files
    and images, nothing else in the folder)."""
    meta_path = out / "cache.json"
    if overwrite:
        for name in CACHE_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / "images").is_dir():
            shutil.rmtree(out / "images")
        return
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("dataset") != dataset or meta.get("size") != size:
            raise CxrcamError(f"{out} holds a {meta.get('dataset')} cache at {meta.get('size')} px; "
                              f"choose another --out for {dataset} at {size} px, or pass --overwrite to replace it")


def prepare(dataset: str, root: str | Path, out: str | Path, config: Config = Config(),
            progress: bool = True, overwrite: bool = False) -> PrepareResult:
    """Read ``dataset`` at ``root`` and cache it at ``out``; resumes where a run stopped, or with
    ``overwrite`` starts afresh."""
    from cxrcam.data.readers import read_dataset
    from cxrcam.data.splits import assign_folds

    start = time.perf_counter()
    out, size = Path(out), config.prepare.size
    if size < 16:
        raise CxrcamError(f"prepare.size must be at least 16 pixels, got {size}")
    _check_existing(out, dataset, size, overwrite)
    tables = read_dataset(dataset, root, config.fusion)
    out.mkdir(parents=True, exist_ok=True)
    report_invalid(tables.invalid, out)
    images = assign_folds(tables.images, tables.schema, config.split.n_folds, config.split.seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, out / "images")
    log_path = out / "progress.jsonl"
    stamps = {i: _stamp(p) for i, p in zip(images["image_id"], images["path"]) if isinstance(p, str)}
    done = {k: v[:2] for k, v in _read_progress(log_path).items()
            if (out / "images" / f"{k}.png").is_file() and v[2] in (None, stamps.get(k, v[2]))}
    stray = set(done) - set(images["image_id"])
    if stray:
        warnings.warn(f"{out}: {len(stray)} cached image(s) are not in this dataset and stay out of its manifest "
                      f"(pass --overwrite to start the cache afresh)", stacklevel=2)
        done = {k: v for k, v in done.items() if k not in stray}
    skipped = int(images["image_id"].isin(list(done)).sum())

    failures = [(i, None, "file not found") for i in images.loc[images["path"].isna(), "image_id"]]
    todo = images[images["path"].notna() & ~images["image_id"].isin(list(done))]
    if images["path"].isna().all():
        raise CxrcamError(f"no image files found under {root} for the {len(images)} images its table lists")
    jobs = [(r.image_id, r.path, str(out / "images" / f"{r.image_id}.png"), size) for r in todo.itertuples()]
    workers = config.prepare.workers or os.cpu_count() or 1
    sources = dict(zip(todo["image_id"], todo["path"]))
    bar = progress_bar(total=len(images), initial=skipped + len(failures), desc=f"prepare {dataset}",
               unit="img", disable=not progress)
    with open(log_path, "a") as log:
        def record(result):
            image_id, h, w, reason = result
            if reason is None:
                done[image_id] = (h, w)
                log.write(json.dumps({"id": image_id, "h": h, "w": w, "src": stamps.get(image_id)}) + "\n")
                log.flush()
            else:
                failures.append((image_id, sources[image_id], reason))
            bar.update()

        if workers == 1 or len(jobs) < 2:
            _worker_init()
            for job in jobs:
                record(_convert(job))
        else:
            ctx = multiprocessing.get_context("spawn")  # safe whatever threads the parent runs
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(os.getpid(),)) as pool:
                for result in pool.map(_convert, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8)))):
                    record(result)
    bar.close()
    warn_squashed({i: hw for i, hw in done.items() if i in sources})
    _write_tables(out, dataset, tables.schema, images, tables.boxes, done, failures, config)
    return PrepareResult(len(done) - skipped, skipped, len(failures), time.perf_counter() - start)


def _write_tables(out: Path, dataset: str, schema: Schema, images: pd.DataFrame, boxes: pd.DataFrame,
                  done: dict[str, tuple[int, int]], failures: list, config: Config) -> None:
    size = config.prepare.size
    manifest = images[images["image_id"].isin(list(done))].copy()
    manifest["height"] = [done[i][0] for i in manifest["image_id"]]
    manifest["width"] = [done[i][1] for i in manifest["image_id"]]
    manifest["file"] = "images/" + manifest["image_id"] + ".png"
    manifest["scale_x"] = size / manifest["width"].astype(np.float64)
    manifest["scale_y"] = size / manifest["height"].astype(np.float64)
    manifest = manifest.rename(columns={"path": "source"})
    cached = boxes[boxes["image_id"].isin(list(done))].merge(
        manifest[["image_id", "scale_x", "scale_y"]], on="image_id", how="left")
    cached[CACHE_BOX_COLUMNS] = scale_boxes(cached[BOX_COLUMNS].to_numpy(), cached["scale_x"].to_numpy(),
                                            cached["scale_y"].to_numpy())
    write_csv(out / "manifest.csv", manifest.reset_index(drop=True))
    write_csv(out / "boxes.csv", cached.drop(columns=["scale_x", "scale_y"]))
    write_csv(out / "failures.csv", pd.DataFrame(failures, columns=["image_id", "path", "reason"]))
    write_json(out / "cache.json", {
        "dataset": dataset, "schema": schema.name, "size": size, "images": len(manifest),
        "failed": len(failures), "config": config_to_dict(config)})


@dataclass
class Cache:
    """A prepared cache, read back: what every later command consumes."""

    root: Path
    schema: Schema
    size: int
    images: pd.DataFrame  # manifest.csv
    boxes: pd.DataFrame  # boxes.csv
    failures: pd.DataFrame

    def load(self, image_id: str) -> np.ndarray:
        """The cached size x size uint8 image."""
        row = self.images.loc[self.images["image_id"] == image_id, "file"]
        if row.empty:
            raise CxrcamError(f"image {image_id!r} is not in the cache at {self.root}")
        return read_image(self.root / row.iloc[0]).image


def open_cache(root: str | Path) -> Cache:
    root = Path(root)
    meta_path = root / "cache.json"
    if not meta_path.is_file():
        raise CxrcamError(f"{root} is not a cxrcam cache (no cache.json); run `cxrcam prepare` first")
    broken = "; run `cxrcam prepare` again into a new folder"
    try:
        meta = json.loads(meta_path.read_text())
        schema, size = get_schema(meta["schema"]), int(meta["size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CxrcamError(f"{meta_path}: corrupt cache description ({exc!r}){broken}") from None
    images = read_table(root / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    boxes = read_table(root / "boxes.csv", dtype={"image_id": str, "rad_id": str})
    failures = read_table(root / "failures.csv", dtype=str)
    require_columns(images, ["image_id", "file", "fold"], str(root / "manifest.csv"))
    return Cache(root, schema, size, images, boxes, failures)
