"""``localize()``, read top to bottom: open the input, stream it through a DataLoader (constant
memory), localise each batch (:mod:`cxrcam.localize.step`), draw the pictures in the
background and write the tables at the end (:mod:`cxrcam.localize.write`).

Under torchrun each rank takes every world_size-th image and rank 0 merges the parts. An
unreadable image is listed in ``failures.csv`` and keeps an empty prediction in ``submission.csv``.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrcam.boxes import BoxRules
from cxrcam.cam import create_cam
from cxrcam.config import Config, config_to_dict
from cxrcam.data.images import warn_squashed
from cxrcam.data.dataset import ImageFiles
from cxrcam.data.sources import open_source
from cxrcam.data.tables import BOX_COLUMNS, report_invalid
from cxrcam.errors import CxrcamError
from cxrcam.files import write_json
from cxrcam.localize.step import Step
from cxrcam.localize.write import Collector, LocalizeSummary, Painter, merge_ranks, write_outputs
from cxrcam.models import decision_thresholds, load_classifier
from cxrcam.outputs.pictures import PICTURE_SIZE, remove_pictures
from cxrcam.runtime import dist
from cxrcam.runtime.progress import progress_bar
from cxrcam.schemas import Schema, get_schema


def parse_classes(classes: list[str] | None, schema: Schema) -> list[int] | None:
    """``--classes`` names or ids -> class ids (None: all)."""
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


def _refiner(detector: str | Path | None, config: Config, device, schema: Schema, checkpoint: str | Path):
    if detector is None:
        return None
    from cxrcam.detection.refine import Refiner

    refiner = Refiner(detector, config.refine, device)
    if refiner.ckpt["schema"] != schema.name:
        raise CxrcamError(f"{detector} detects {refiner.ckpt['schema']} classes; {checkpoint} predicts {schema.name}")
    return refiner


def _check_calibration(rules: BoxRules, source, path: str) -> None:
    """Thresholds calibrated on the images being scored flatter every figure: say so."""
    seen = set(rules.calibrated_on) & set(source.images["image_id"])
    if seen:
        warnings.warn(f"{path} was calibrated on {len(seen)} of these {len(source.images)} images: their "
                      f"localisation figures are optimistic; calibrate on a held-out fold", stacklevel=3)


def localize(checkpoint: str | Path, data: str | Path, out: str | Path, config: Config = Config(),
             dataset: str | None = None, classes: list[str] | None = None, pictures: bool = True,
             progress: bool = True, detector: str | Path | None = None, picture_size: int = PICTURE_SIZE,
             show_proposals: bool = False, draw_min_score: float = 0.0) -> LocalizeSummary | None:
    """Localise every image of ``data`` with the classifier ``checkpoint``; outputs in ``out``.

    ``detector``: a ``train-detector`` checkpoint that refines the CAM boxes (``cxrcam refine``,
    see :mod:`cxrcam.detection.refine`); ``submission.csv`` then holds the refined detections and
    ``cam_submission.csv`` the CAM boxes. Pictures are ``picture_size`` px on the long side at least,
    with the boxes scored ``draw_min_score`` or more; ``show_proposals`` adds the CAM boxes, faint, to
    refine's. Returns the summary on rank 0 (None on other ranks)."""
    start, out = time.perf_counter(), Path(out)
    info = dist.setup(config.runtime.device)
    model, ckpt = load_classifier(checkpoint, info.device)
    schema, size = get_schema(ckpt["schema"]), int(ckpt["input_size"])
    source = open_source(data, dataset, config)
    if source.schema is not None and source.schema.name != schema.name:
        raise CxrcamError(f"{checkpoint} predicts {schema.name} classes; {data} is a {source.schema.name} dataset")
    refiner = _refiner(detector, config, info.device, schema, checkpoint)
    truth = {k: (g[BOX_COLUMNS].to_numpy(np.float64), g["class_id"].to_numpy()) for k, g in source.truth.groupby("image_id")}
    rules = BoxRules.from_config(config.boxes)
    rules.check_schema(schema)
    _check_calibration(rules, source, config.boxes.calibration)
    thresholds = decision_thresholds(ckpt, config.boxes.min_prob)
    cam = create_cam(model, *rules.cam_settings(config.cam))
    step = Step(cam, config, truth, thresholds,
                parse_classes(classes, schema), pictures, refiner, rules)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        report_invalid(source.invalid, out)
        if (out / "localize.json").is_file():  # a previous run's folder: its pictures go
            remove_pictures(out)
    if info.distributed:
        torch.distributed.barrier()  # no rank paints before the old pictures are gone

    shard = source.readable.iloc[info.rank::info.world_size].reset_index(drop=True)
    known_hw = shard[["height", "width"]].to_numpy(np.float64)
    loader = DataLoader(ImageFiles(list(shard["path"]), size), batch_size=config.cam.batch_size,
                        num_workers=config.cam.workers, persistent_workers=False)
    collected = Collector(schema, refiner is not None)
    painter = Painter(out, schema, rules, truth, refiner is not None and show_proposals, pictures, picture_size,
                      draw_min_score)
    bar = progress_bar(total=len(shard), desc=("refine " if refiner else "localize ") + config.cam.method, unit="img",
               disable=not (progress and info.is_main))
    seen: dict[str, tuple[float, float]] = {}
    for x, idx, heights, widths, errors in loader:
        bar.update(len(idx))
        for k in (k for k, e in enumerate(errors) if e):
            collected.fail(shard.at[int(idx[k]), "image_id"], shard.at[int(idx[k]), "path"], errors[k])
        good = [k for k, e in enumerate(errors) if not e]
        if not good:
            continue
        rows = idx[good].numpy()
        sizes = [tuple(known_hw[i]) if np.isfinite(known_hw[i]).all() else (float(heights[k]), float(widths[k]))
                 for i, k in zip(rows, good)]
        seen.update((shard.at[int(i), "image_id"], hw) for i, hw in zip(rows, sizes))
        x = x[good].to(info.device)
        for b, result in enumerate(step(x, [shard.at[int(i), "image_id"] for i in rows], sizes)):
            collected.add(result)
            painter(result, x[b])
    bar.close()
    painter.close()
    warn_squashed(seen)

    parts = merge_ranks(collected.tables(), out, info)
    summary = None
    if parts is not None:
        summary = write_outputs(parts, source, schema, config, out, start, refined=refiner is not None)
        write_json(out / "localize.json", {"checkpoint": str(checkpoint), "detector": detector and str(detector),
                                           "schema": schema.name,
                                           "data": str(data), "classes": classes,
                                           "pictures": pictures, "picture_size": picture_size,
                                           "draw_min_score": draw_min_score,
                                           "decision_thresholds": [float(t) for t in thresholds],
                                           "cam": {"method": cam.method, "target_layer": cam.target_name},
                                           "config": config_to_dict(config)})
    dist.cleanup()
    return summary


__all__ = ["localize", "parse_classes"]
