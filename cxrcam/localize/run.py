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

import torch

from cxrcam.calibration import filter_range
from cxrcam.cam.checkpoint import CheckpointMaps
from cxrcam.config import Config, config_to_dict
from cxrcam.data.images import warn_squashed
from cxrcam.data.sources import open_source
from cxrcam.data.tables import boxes_by_image, report_invalid
from cxrcam.errors import CxrcamError
from cxrcam.files import write_json
from cxrcam.localize.step import Step
from cxrcam.localize.write import Collector, LocalizeSummary, Painter, merge_ranks, write_outputs
from cxrcam.outputs.pictures import PICTURE_SIZE, remove_pictures
from cxrcam.runtime import dist
from cxrcam.schemas import Schema


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


def _check_calibration(maps: CheckpointMaps, source) -> None:
    """Thresholds calibrated on the images being scored flatter every figure: say so."""
    seen = set(maps.calibration.image_ids if maps.calibration else ()) & set(source.images["image_id"])
    if seen:
        warnings.warn(f"{maps.calibration.path} was calibrated on {len(seen)} of these {len(source.images)} images: "
                      f"their localisation figures are optimistic; calibrate on a held-out fold", stacklevel=3)


def localize(checkpoint: str | Path | list, data: str | Path, out: str | Path, config: Config = Config(),
             dataset: str | None = None, classes: list[str] | None = None, pictures: bool = True,
             progress: bool = True, detector: str | Path | None = None, picture_size: int = PICTURE_SIZE,
             show_proposals: bool = False, draw_min_score: float = 0.0) -> LocalizeSummary | None:
    """Localise every image of ``data`` with the classifier ``checkpoint`` (or several: an ensemble,
    :class:`~cxrcam.cam.checkpoint.CheckpointMaps`); outputs in ``out``.

    ``detector``: a ``train-detector`` checkpoint that refines the CAM boxes (``cxrcam refine``,
    see :mod:`cxrcam.detection.refine`); ``submission.csv`` then holds the refined detections and
    ``cam_submission.csv`` the CAM boxes. Pictures are ``picture_size`` px on the long side at least,
    with the boxes scored ``draw_min_score`` or more; ``show_proposals`` adds the CAM boxes, faint, to
    refine's. Returns the summary on rank 0 (None on other ranks)."""
    start, out = time.perf_counter(), Path(out)
    info = dist.setup(config.runtime.device)
    maps = CheckpointMaps(checkpoint, config, info.device)
    schema = maps.schema
    source = open_source(data, dataset, config)
    if source.schema is not None and source.schema.name != schema.name:
        raise CxrcamError(f"{maps.paths[0]} predicts {schema.name} classes; {data} is a {source.schema.name} dataset")
    refiner = _refiner(detector, config, info.device, schema, checkpoint)
    truth = boxes_by_image(source.truth)
    _check_calibration(maps, source)
    two_class = filter_range(config.boxes, maps.calibration, refiner.filter if refiner is not None else None)
    step = Step(maps.rules, truth, maps.thresholds, parse_classes(classes, schema), pictures, refiner)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        report_invalid(source.invalid, out)
        if (out / "localize.json").is_file():  # a previous run's folder: its pictures go
            remove_pictures(out)
    if info.distributed:
        torch.distributed.barrier()  # no rank paints before the old pictures are gone

    shard = source.readable.iloc[info.rank::info.world_size].reset_index(drop=True)
    collected = Collector(schema, refiner is not None)
    painter = Painter(out, schema, maps.rules, truth, refiner is not None and show_proposals, pictures, picture_size,
                      draw_min_score)
    seen: dict[str, tuple[float, float]] = {}
    desc = ("refine " if refiner else "localize ") + maps.cam.method
    for batch in maps.stream(shard, lambda row, p: step.plan(p, shard.at[row, "image_id"]), desc,
                             progress and info.is_main):
        for image_id, path, reason in batch.failed:
            collected.fail(image_id, path, reason)
        if batch.maps is None:
            continue
        seen.update(zip(batch.ids, batch.sizes))
        for b, result in enumerate(step(batch.x, batch.ids, batch.sizes, batch.maps)):
            collected.add(result)
            painter(result, batch.x[b])
    painter.close()
    warn_squashed(seen)

    parts = merge_ranks(collected.tables(), out, info)
    summary = None
    if parts is not None:
        summary = write_outputs(parts, source, schema, config, out, start, refined=refiner is not None,
                                two_class=two_class)
        cam_info = {"method": maps.cam.method, "target_layer": maps.cam.target_name}
        if maps.class_layers:  # calibrate's per-class maps
            cam_info["class_layers"] = maps.class_layers
        write_json(out / "localize.json", {"checkpoint": [str(p) for p in maps.paths] if len(maps.paths) > 1
                                           else str(checkpoint), "detector": detector and str(detector),
                                           "schema": schema.name,
                                           "data": str(data), "classes": classes,
                                           "pictures": pictures, "picture_size": picture_size,
                                           "draw_min_score": draw_min_score,
                                           "decision_thresholds": [float(t) for t in maps.thresholds],
                                           "cam": cam_info,
                                           "filter": {"low": two_class[0], "high": two_class[1]},
                                           "refine": refiner and {"iou": refiner.iou, "scale": refiner.scale,
                                                                  "min_score": refiner.min_score},
                                           "config": config_to_dict(config)})
    dist.cleanup()
    return summary


__all__ = ["localize", "parse_classes"]
