"""The one map pass: a classifier checkpoint opened with its calibration, streamed over images.

``localize`` (and ``refine``), ``calibrate`` (once per candidate map) and the detector's CAM pass
(pseudo-boxes and CAM proposals) all come through here:

1. :class:`CheckpointMaps` loads the classifier with its schema, input size and decision
   thresholds (:func:`~cxrcam.models.decision_thresholds`), and the calibration the config names
   (:mod:`cxrcam.calibration`): each class's box settings and the heat map they were chosen for;
2. :func:`needed_classes` decides which classes one image needs maps of: the predicted ones
   (above their decision thresholds), plus each stage's own (the pictures and ``--classes`` in
   localize, the truth classes in localize and calibrate, the labels in the detector pass);
3. :meth:`CheckpointMaps.stream` decodes the images in a DataLoader and yields, batch by batch,
   the probabilities and each image's maps of the classes it needs (one CAM call,
   :meth:`~cxrcam.cam.base.BaseCAM.pairs`: an image is not mapped for the classes its neighbours
   in the batch need, and on a GPU only the maps asked for come to the CPU).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cxrcam.calibration import box_rules
from cxrcam.cam.base import BaseCAM, map_name, parse_map, target_weights
from cxrcam.cam.ensemble import EnsembleCAM
from cxrcam.cam.factory import create_cam
from cxrcam.config import Config
from cxrcam.data.dataset import ImageFiles
from cxrcam.errors import CxrcamError
from cxrcam.models import decision_thresholds, load_classifier
from cxrcam.runtime.progress import progress_bar
from cxrcam.schemas import get_schema


@dataclass
class Plan:
    """The classes one image needs maps of, and why."""

    predicted: list[int]  # above their decision thresholds (among the stage's ``only``): they get boxes
    shown: list[int]  # drawn in the pictures
    extra: list[int]  # the stage's own: truth classes (pointing game, calibration), labels (pseudo-boxes)
    need: list[int]  # all of them, each once


def needed_classes(probs: np.ndarray, thresholds: np.ndarray, only: Sequence[int] | None = None,
                   predict: bool = True, show: bool = False, extra: Sequence[int] = ()) -> Plan:
    """One image's :class:`Plan` from its probabilities: the predicted classes (``predict``; among
    ``only`` when given), the shown ones (``show``: ``only``, or else the predicted), and ``extra``."""
    predicted = [c for c in (only or range(len(probs))) if probs[c] > thresholds[c]] if predict else []
    shown = list(only or predicted) if show else []
    extra = sorted({int(c) for c in extra})
    return Plan(predicted, shown, extra, sorted({int(c) for c in (*predicted, *shown, *extra)}))


@dataclass
class MapBatch:
    """One batch's probabilities (B x all classes), plans, and the maps each image needs (input
    pixels): ``map(b, c)`` is image b's map of class c."""

    probs: np.ndarray
    plans: list[Plan]
    maps: np.ndarray  # P x H x W, image by image, each image's ``plan.need`` in order

    def __post_init__(self) -> None:
        self._at = {(b, c): k for k, (b, c) in enumerate((b, c) for b, p in enumerate(self.plans) for c in p.need)}

    def map(self, b: int, c: int) -> np.ndarray:
        return self.maps[self._at[(b, int(c))]]

    def __len__(self) -> int:
        return len(self._at)


@dataclass
class Streamed:
    """One batch of :meth:`CheckpointMaps.stream`: the readable images, and the ones that failed."""

    rows: np.ndarray  # each readable image's row in the streamed table
    ids: list[str]
    sizes: list[tuple[float, float]]  # original (height, width)
    x: torch.Tensor  # B x 1 x S x S in [0, 1], on the model's device
    maps: MapBatch | None  # None where every image of the batch failed
    failed: list[tuple[str, str, str]]  # image_id, path, reason


class CheckpointMaps:
    """A classifier checkpoint (or several: an ensemble, :mod:`cxrcam.cam.ensemble`) with its
    calibration: model, schema, input size, decision thresholds, each class's box settings
    (``rules``), and the CAM engine of the map those settings are for (the calibration's, else the
    config's; ``calibrated=False`` ignores a calibration, as calibrate does).

    An ensemble's decision thresholds are the operating points its calibration chose on the
    members' mean validation probabilities, else (or where a class has none) the mean of the
    members' own."""

    def __init__(self, checkpoint: str | Path | Sequence[str | Path], config: Config,
                 device: str | torch.device = "cpu", calibrated: bool = True):
        self.config = config
        self.paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
        loaded = [load_classifier(path, device) for path in self.paths]
        self.models = [model for model, _ in loaded]
        self.model, self.ckpt = loaded[0]
        self.schema, self.size = get_schema(self.ckpt["schema"]), int(self.ckpt["input_size"])
        for path, (_, ckpt) in zip(self.paths[1:], loaded[1:]):
            ours, theirs = (self.ckpt["schema"], self.size), (ckpt["schema"], int(ckpt["input_size"]))
            if ours != theirs:
                raise CxrcamError(f"an ensemble's checkpoints must share classes and input size: {self.paths[0]} is "
                                  f"{ours[0]} at {ours[1]} px, {path} is {theirs[0]} at {theirs[1]} px")
        self.thresholds = np.mean([decision_thresholds(ckpt, config.boxes.min_prob) for _, ckpt in loaded], axis=0)
        boxes = config.boxes if calibrated else dataclasses.replace(config.boxes, calibration="")
        self.rules, self.calibration = box_rules(boxes, self.schema)
        self._ensemble_points()
        chosen = self.calibration.cam if self.calibration is not None and self.calibration.cam else {}
        self.class_layers: dict | None = chosen.get("class_layers")  # calibrate's per-class maps, if any
        self.cam: BaseCAM | EnsembleCAM = self.use_map(*self._chosen_map(), self.class_layers)

    def _ensemble_points(self) -> None:
        """An ensemble's calibrated operating points, where its calibration chose them for as many
        checkpoints (``boxes.min_prob=auto`` only)."""
        points = self.calibration.operating_points if self.calibration is not None else None
        if len(self.paths) < 2 or not points or self.config.boxes.min_prob != "auto":
            return
        if len(self.calibration.checkpoints) != len(self.paths):
            warnings.warn(f"{self.calibration.path.name} chose operating points for {len(self.calibration.checkpoints)} "
                          f"checkpoints, not these {len(self.paths)}: the mean of theirs is used", stacklevel=3)
            return
        saved = np.asarray([np.nan if v is None else v for v in points], np.float64)
        self.thresholds = np.where(np.isnan(saved), self.thresholds, saved)

    def _chosen_map(self) -> tuple[str, str]:
        """(method, target_layer): the calibration's (its thresholds were chosen for that map), else the
        config's. Where the calibration's is not the configured map, one line says so."""
        configured = parse_map(self.config.cam.method, self.config.cam.target_layer)
        if self.calibration is None or self.calibration.cam is None:
            return configured
        chosen = parse_map(self.calibration.cam["method"], self.calibration.cam.get("target_layer") or "")
        if chosen != configured:
            warnings.warn(f"{self.calibration.path.name} chose {map_name(*chosen)} maps (its thresholds are for "
                          f"them); the configured cam.method={configured[0]} cam.target_layer={configured[1]!r} is "
                          f"not used", stacklevel=3)
        return chosen

    def use_map(self, method: str, layer: str | None, class_layers: dict | None = None) -> BaseCAM | EnsembleCAM:
        """Cut maps of ``method`` at ``layer`` from now on (calibrate's candidates); ``class_layers``
        (class id -> some of those layers): the classes whose maps fuse fewer of them
        (:meth:`~cxrcam.cam.base.BaseCAM.use_class_layers`)."""
        engines = [create_cam(model, method, layer or None) for model in self.models]
        for engine in engines if class_layers else ():
            engine.use_class_layers(class_layers, self.schema.num_findings)
        self.cam = engines[0] if len(engines) == 1 else EnsembleCAM(engines)
        return self.cam

    def __call__(self, x: torch.Tensor, plan_of: Callable[[int, np.ndarray], Plan]) -> MapBatch:
        """One batch: ``plan_of(b, probs)`` gives image b's plan; one CAM call computes each image's
        maps of its ``plan.need`` (each class's map; with ``cam.target=contrastive``, each class
        against the image's other predicted classes)."""
        plans: list[Plan] = []
        contrastive = self.config.cam.target == "contrastive"

        def targets(logits: torch.Tensor) -> list[torch.Tensor]:
            probs = torch.sigmoid(logits).cpu().numpy()
            plans[:] = [plan_of(b, p) for b, p in enumerate(probs)]
            return [target_weights(p.need, logits.shape[1], [p.predicted] * len(p.need) if contrastive else None)
                    for p in plans]

        out = self.cam.pairs(x, targets)
        return MapBatch(torch.sigmoid(out.logits).cpu().numpy(), plans, out.maps.cpu().numpy())

    def stream(self, images: pd.DataFrame, plan_of: Callable[[int, np.ndarray], Plan], desc: str,
               progress: bool = True, leave: bool = True, size: int | None = None) -> Iterator[Streamed]:
        """Decode ``images`` (image_id, path, and height/width where known) at ``size`` (the model's
        input size by default; the detector pass keeps its cache's frame) and yield each batch's maps;
        ``plan_of(row, probs)`` plans the image of ``images``' row. An unreadable image is yielded in
        ``failed``, never raised."""
        cam = self.config.cam
        known_hw = (images[["height", "width"]].to_numpy(np.float64) if {"height", "width"} <= set(images.columns)
                    else np.full((len(images), 2), np.nan))
        loader = DataLoader(ImageFiles(list(images["path"]), size or self.size), batch_size=cam.batch_size,
                            num_workers=cam.workers, persistent_workers=False)
        bar = progress_bar(total=len(images), desc=desc, unit="img", disable=not progress, leave=leave)
        for x, idx, heights, widths, errors in loader:
            bar.update(len(idx))
            failed = [(images.at[int(idx[k]), "image_id"], images.at[int(idx[k]), "path"], e)
                      for k, e in enumerate(errors) if e]
            good = [k for k, e in enumerate(errors) if not e]
            rows = idx[good].numpy()
            sizes = [tuple(known_hw[i]) if np.isfinite(known_hw[i]).all() else (float(heights[k]), float(widths[k]))
                     for i, k in zip(rows, good)]
            x = x[good].to(next(self.model.parameters()).device)
            maps = self(x, lambda b, p: plan_of(int(rows[b]), p)) if good else None
            yield Streamed(rows, [images.at[int(i), "image_id"] for i in rows], sizes, x, maps, failed)
        bar.close()


__all__ = ["CheckpointMaps", "MapBatch", "Plan", "Streamed", "needed_classes"]
