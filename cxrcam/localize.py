"""``cxrcam localize``: classifier heat maps -> boxes, pictures, ``bb_results.csv``, ``submission.csv``.

Read top to bottom: open the input (a ``prepare`` cache, a dataset folder as released, or any
folder of DICOM/PNG/JPEG), stream it through a DataLoader (constant memory), compute all
classes' maps per batch (closed form when the model allows), turn the maps of the predicted
classes into boxes in original pixels, draw the pictures in a background thread, and write
the tables at the end. Under torchrun each rank takes every world_size-th image and rank 0
merges the parts. An unreadable image is listed in ``failures.csv`` and keeps an empty
prediction in ``submission.csv``.

``cxrcam refine`` is this same loop with one more step per batch: the CAM boxes go to a
Faster R-CNN's RoI heads as extra proposals (:mod:`cxrcam.detection.refine`), and its
detections replace them in ``submission.csv`` (the CAM boxes go to ``cam_submission.csv``).
"""
from __future__ import annotations

import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxrcam.boxes import cam_peak, cam_to_boxes, scale_boxes
from cxrcam.cam import FastCAM, create_cam, scale_cams
from cxrcam.config import Config, config_to_dict
from cxrcam.data.dataset import image_tensor
from cxrcam.data.images import IMAGE_SUFFIXES, read_image
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS, empty_boxes
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.localization import match_boxes
from cxrcam.io import write_csv, write_json
from cxrcam.models import load_classifier
from cxrcam.outputs.pictures import write_pictures
from cxrcam.outputs.submission import normal_scores, write_submission
from cxrcam.schemas import Schema, get_schema
from cxrcam.train import dist

NO_TRUTH = (np.zeros((0, 4)), np.zeros(0, np.int64))  # (boxes, class ids) of an image without truth

# a dataset folder as released is recognised by its label table
DATASET_MARKERS = {"vinbig": "train.csv", "nih": "Data_Entry_2017*.csv", "rsna": "stage_2_train_labels.csv"}


@dataclass
class Source:
    """The images to localise and the truth known for them (original pixels)."""

    schema: Schema | None  # None: a plain folder of images, no labels
    images: pd.DataFrame  # image_id, path, and height/width (NaN: taken from decoding)
    truth: pd.DataFrame  # BOX_TABLE_COLUMNS
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # image_id, path, reason


def open_source(data: str | Path, dataset: str | None = None, config: Config = Config()) -> Source:
    """A cache (has cache.json), a dataset folder (``dataset`` or recognised by its table), a
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
        return Source(cache.schema, images[["image_id", "path", "height", "width"]], cache.boxes, failures)
    if dataset is None and data.is_dir():
        dataset = next((k for k, pattern in DATASET_MARKERS.items() if any(data.glob(pattern))), None)
    if dataset not in (None, "images"):
        tables = read_dataset(dataset, data, config.fusion)
        missing = tables.images["path"].isna()
        failures = [(i, "", "file not found") for i in tables.images.loc[missing, "image_id"]]
        images = tables.images.loc[~missing, ["image_id", "path"]].assign(height=np.nan, width=np.nan)
        return Source(tables.schema, images, tables.boxes, failures)
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CxrcamError(f"no images (DICOM, PNG, JPEG) found in {data}")
    ids = [p.stem if data.is_file() else str(p.relative_to(data).with_suffix("")) for p in files]
    images = pd.DataFrame({"image_id": ids, "path": [str(p) for p in files], "height": np.nan, "width": np.nan})
    return Source(None, images, empty_boxes(), [])


class _Images(Dataset):
    """Decode one image at the model's input size; a failure becomes a reason, not an exception."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            d = read_image(self.paths[i], self.size)
            return image_tensor(d.image), i, d.orig_height, d.orig_width, ""
        except Exception as exc:  # ImageReadError or anything a decoder throws
            return torch.zeros(1, self.size, self.size), i, 0, 0, str(exc) or type(exc).__name__


@dataclass
class LocalizeSummary:
    images: int
    failed: int
    boxes: int
    truth_boxes: int
    mean_iou: float  # over truth boxes, best prediction each
    hit_rate: float  # share of truth boxes with IoU > eval.iou_thr
    seconds: float
    out: Path


def _parse_classes(classes: list[str] | None, schema: Schema) -> list[int] | None:
    if not classes:
        return None
    ids = []
    for name in classes:
        try:
            ids.append(int(name) if name.isdigit() else schema.class_id(name))
        except KeyError:
            raise CxrcamError(f"--classes: unknown {schema.name} class {name!r}; "
                              f"choose from {', '.join(schema.findings)}") from None
        if not 0 <= ids[-1] < schema.num_findings:
            raise CxrcamError(f"--classes: class id {ids[-1]} out of range 0..{schema.num_findings - 1}")
    return ids


def localize(checkpoint: str | Path, data: str | Path, out: str | Path, config: Config = Config(),
             dataset: str | None = None, classes: list[str] | None = None, pictures: bool = True,
             progress: bool = True, detector: str | Path | None = None) -> LocalizeSummary | None:
    """Localise every image of ``data`` with the classifier ``checkpoint``; outputs in ``out``.

    ``detector``: a ``train-detector`` checkpoint that refines the CAM boxes (``cxrcam refine``,
    see :mod:`cxrcam.detection.refine`); ``submission.csv`` then holds the refined detections and
    ``cam_submission.csv`` the CAM boxes. Returns the summary on rank 0 (None on other ranks)."""
    start = time.perf_counter()
    out = Path(out)
    info = dist.setup()
    model, ckpt = load_classifier(checkpoint, info.device)
    schema, size = get_schema(ckpt["schema"]), int(ckpt["input_size"])
    source = open_source(data, dataset, config)
    if source.schema is not None and source.schema.name != schema.name:
        raise CxrcamError(f"{checkpoint} predicts {schema.name} classes; {data} is a {source.schema.name} dataset")
    shown_classes = _parse_classes(classes, schema)
    bcfg = config.boxes
    cam = create_cam(model, config.cam.method, config.cam.target_layer or None)
    refiner = None
    if detector is not None:
        from cxrcam.detection.refine import Refiner

        refiner = Refiner(detector, config.refine, info.device)
        if refiner.ckpt["schema"] != schema.name:
            raise CxrcamError(f"{detector} detects {refiner.ckpt['schema']} classes; {checkpoint} predicts {schema.name}")
    all_classes = list(range(schema.num_findings))
    truth_by_image = {k: (g[BOX_COLUMNS].to_numpy(np.float64), g["class_id"].to_numpy())
                      for k, g in source.truth.groupby("image_id")}
    out.mkdir(parents=True, exist_ok=True)

    rows = np.arange(len(source.images))[info.rank::info.world_size]
    shard = source.images.iloc[rows].reset_index(drop=True)
    known_hw = shard[["height", "width"]].to_numpy(np.float64)
    loader = DataLoader(_Images(list(shard["path"]), size), batch_size=config.cam.batch_size,
                        num_workers=config.cam.workers, persistent_workers=False)
    detections, cam_detections, probs_rows, peaks, failures = [], [], [], [], []
    painter = ThreadPoolExecutor(2) if pictures else None
    pending: deque = deque()
    bar = tqdm(total=len(shard), desc=("refine " if refiner else "localize ") + config.cam.method, unit="img",
               disable=not (progress and info.is_main))
    for x, idx, heights, widths, errors in loader:
        good = [k for k, e in enumerate(errors) if not e]
        failures += [(shard.at[int(idx[k]), "image_id"], shard.at[int(idx[k]), "path"], errors[k])
                     for k in range(len(errors)) if errors[k]]
        bar.update(len(idx))
        if not good:
            continue
        x, idx = x[good].to(info.device), idx[good].numpy()
        ids = [shard.at[int(i), "image_id"] for i in idx]
        if isinstance(cam, FastCAM):  # every class's map comes with the forward pass
            maps, logits = cam.raw_maps(x, all_classes)
            cols = all_classes
        else:
            with torch.no_grad():
                logits = model(x).float()
        probs = torch.sigmoid(logits).cpu().numpy()
        plans = [_plan(p, image_id, truth_by_image, shown_classes, bcfg.min_prob, pictures)
                 for p, image_id in zip(probs, ids)]
        if not isinstance(cam, FastCAM):  # one backward per class: only the classes some image needs
            cols = sorted({c for _, _, need in plans for c in need})
            maps, _ = cam.raw_maps(x, cols)
        cam_preds, views = [], []  # per image: CAM boxes (input pixels); scales, maps, classes for the rest
        for b, (i, image_id, p, (predicted, shown, need)) in enumerate(zip(idx, ids, probs, plans)):
            h, w = known_hw[i] if np.isfinite(known_hw[i]).all() else (float(heights[good[b]]), float(widths[good[b]]))
            sx, sy = size / w, size / h  # input pixels per original pixel
            probs_rows.append((image_id, *p))
            scaled = scale_cams(maps[b, [cols.index(c) for c in need]][None], (size, size))[0].cpu().numpy() \
                if need else np.zeros((0, size, size), np.float32)
            boxes, labels, scores = [np.zeros((0, 4))], [np.zeros(0, np.int64)], [np.zeros(0)]
            for c in predicted:
                bx, sc = cam_to_boxes(scaled[need.index(c)], float(p[c]), bcfg)
                boxes.append(bx)
                scores.append(sc)
                labels.append(np.full(len(bx), c))
            cam_preds.append((np.concatenate(boxes), np.concatenate(labels).astype(np.int64), np.concatenate(scores)))
            for c in sorted(set(truth_by_image.get(image_id, NO_TRUTH)[1].tolist())):
                px, py = cam_peak(scaled[need.index(c)])
                peaks.append((image_id, int(c), px / sx, py / sy))
            views.append((sx, sy, scaled, need, shown, predicted))
        final = refiner(x, [boxes for boxes, _, _ in cam_preds], probs) if refiner else cam_preds
        for b, (image_id, cam_pred, pred, (sx, sy, scaled, need, shown, predicted)) in enumerate(
                zip(ids, cam_preds, final, views)):
            detections += _rows(image_id, pred, sx, sy)
            if refiner:
                cam_detections += _rows(image_id, cam_pred, sx, sy)
            if painter is not None:
                truth_boxes, truth_cls = truth_by_image.get(image_id, NO_TRUTH)
                picture = np.round(x[b, 0].cpu().numpy() * 255).astype(np.uint8)
                drawn = np.isin(pred[1], predicted)  # refined boxes too: only the classes the classifier predicts
                pending.append(painter.submit(
                    write_pictures, out, image_id, picture, schema, (scale_boxes(truth_boxes, sx, sy), truth_cls),
                    tuple(a[drawn] for a in pred), scaled[[need.index(c) for c in shown]], bcfg.threshold,
                    cam_pred[:2] if refiner else None))
                while len(pending) > 64:  # bounded: memory stays constant
                    pending.popleft().result()
    bar.close()
    for job in pending:
        job.result()
    if painter is not None:
        painter.shutdown()

    parts = {"detections": pd.DataFrame(detections, columns=DETECTION_COLUMNS),
             "cam_detections": pd.DataFrame(cam_detections, columns=DETECTION_COLUMNS),
             "probabilities": pd.DataFrame(probs_rows, columns=["image_id", *schema.findings]),
             "peaks": pd.DataFrame(peaks, columns=["image_id", "class_id", "peak_x", "peak_y"]),
             "failures": pd.DataFrame(failures, columns=["image_id", "path", "reason"])}
    parts = _merge_ranks(parts, out, info)
    if parts is None:
        dist.cleanup()
        return None
    summary = _write_outputs(parts, source, schema, config, out, start, refined=refiner is not None)
    write_json(out / "localize.json", {"checkpoint": str(checkpoint), "detector": detector and str(detector),
                                       "data": str(data), "classes": classes,
                                       "pictures": pictures, "config": config_to_dict(config)})
    dist.cleanup()
    return summary


def _rows(image_id: str, pred: tuple[np.ndarray, np.ndarray, np.ndarray], sx: float, sy: float) -> list[tuple]:
    """DETECTION_COLUMNS rows of one image's (boxes in input pixels, classes, scores), in original pixels."""
    boxes, classes, scores = pred
    return [(image_id, int(c), float(s), *box) for box, c, s in zip(scale_boxes(boxes, 1 / sx, 1 / sy), classes, scores)]


def _plan(p: np.ndarray, image_id: str, truth_by_image: dict, shown_classes: list[int] | None,
          min_prob: float, pictures: bool) -> tuple[list[int], list[int], list[int]]:
    """For one image: (predicted classes: above the floor, among ``--classes`` if given, they get
    boxes; shown classes: drawn in the pictures; every class whose scaled map is needed, which
    adds the truth classes for the pointing game)."""
    predicted = [c for c in (shown_classes or range(len(p))) if p[c] > min_prob]
    shown = (shown_classes or predicted or [int(np.argmax(p))]) if pictures else []
    truth = truth_by_image.get(image_id, NO_TRUTH)[1].tolist()
    return predicted, shown, sorted({int(c) for c in (*predicted, *shown, *truth)})


def _merge_ranks(parts: dict[str, pd.DataFrame], out: Path, info: dist.DistInfo) -> dict[str, pd.DataFrame] | None:
    """Single process: the parts themselves. Under torchrun: every rank writes its parts,
    rank 0 reads them all back (None on the other ranks)."""
    if not info.distributed:
        return parts
    folder = out / ".parts"
    folder.mkdir(exist_ok=True)
    for name, table in parts.items():
        write_csv(folder / f"{name}.{info.rank}.csv", table)
    torch.distributed.barrier()
    if not info.is_main:
        return None
    merged = {name: pd.concat([pd.read_csv(folder / f"{name}.{r}.csv", dtype={"image_id": str, "path": str})
                               for r in range(info.world_size)], ignore_index=True) for name in parts}
    shutil.rmtree(folder, ignore_errors=True)
    return merged


def _write_outputs(parts: dict[str, pd.DataFrame], source: Source, schema: Schema, config: Config, out: Path,
                   start: float, refined: bool) -> LocalizeSummary:
    order = {image_id: k for k, image_id in enumerate(source.images["image_id"])}
    probs = parts["probabilities"].sort_values("image_id", key=lambda s: s.map(order), kind="stable")
    detections, cam_detections = (parts[k].sort_values(["image_id", "class_id", "score"], ascending=[True, True, False])
                                  for k in ("detections", "cam_detections"))
    failures = pd.concat([pd.DataFrame(source.failures, columns=["image_id", "path", "reason"]), parts["failures"]],
                         ignore_index=True)
    normal = pd.Series(normal_scores(probs[list(schema.findings)].to_numpy(), config.boxes.normal_score),
                       index=probs["image_id"].to_numpy())
    image_ids = list(source.images["image_id"]) + [i for i, _, _ in source.failures if i not in order]
    write_submission(out / "submission.csv", image_ids, detections, normal, schema.no_finding_id)
    if refined:
        write_submission(out / "cam_submission.csv", image_ids, cam_detections, normal, schema.no_finding_id)
    write_csv(out / "probabilities.csv", probs.reset_index(drop=True))
    write_csv(out / "failures.csv", failures)
    results = match_boxes(source.truth, detections, schema, config.eval.iou_thr, parts["peaks"])
    write_csv(out / "bb_results.csv", results)
    truth_rows = results[results["gt_x_min"].notna()]
    return LocalizeSummary(len(image_ids), len(failures), len(detections), len(truth_rows),
                           float(truth_rows["iou"].mean()) if len(truth_rows) else float("nan"),
                           float(truth_rows["hit"].mean()) if len(truth_rows) else float("nan"),
                           time.perf_counter() - start, out)


__all__ = ["localize", "open_source", "Source", "LocalizeSummary"]
