"""What ``localize`` writes: the pictures (in background threads, while the next batch runs),
then the tables, merged over torchrun ranks by rank 0.

Tables: ``submission.csv`` (every input image once, the "No finding" group appended),
``cam_submission.csv`` (refine only: the CAM boxes), ``probabilities.csv``, ``peaks.csv`` (each
truth class's map peak, for the pointing game), ``bb_results.csv`` and ``failures.csv``; where
truth is known, ``maxboxacc.csv`` (MaxBoxAccV2 per class, with its random-map control),
``box_accuracy.csv`` and ``box_accuracy.png`` (box accuracy against the map threshold) and
``box_curves.csv`` (each truth image and class's best IoU at every threshold: what ``evaluate
--ci`` resamples). A run without truth removes an earlier run's copies of these, so that no
figure of another model is read as this one's.
"""
from __future__ import annotations

import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrcam.boxes import BoxRules, Detections, cut_map, scale_boxes
from cxrcam.config import Config
from cxrcam.data.sources import Source
from cxrcam.data.tables import DETECTION_COLUMNS
from cxrcam.evaluation.localization import match_boxes
from cxrcam.evaluation.weak import CURVE_COLUMNS, curve_table, maxboxacc_table, plot_box_accuracy
from cxrcam.files import write_csv
from cxrcam.localize.step import NO_TRUTH, ImageResult
from cxrcam.outputs.pictures import PICTURE_SIZE, write_pictures
from cxrcam.data.submission import normal_scores, submission_format, write_submission
from cxrcam.outputs.postprocess import two_class_filter
from cxrcam.runtime import dist
from cxrcam.schemas import Schema

FAILURE_COLUMNS = ["image_id", "path", "reason"]
CURVE_FILES = ("maxboxacc.csv", "box_accuracy.csv", "box_accuracy.png", "box_curves.csv")  # from truth only
PEAK_COLUMNS = ["image_id", "class_id", "peak_x", "peak_y"]


@dataclass
class LocalizeSummary:
    images: int
    failed: int
    boxes: int
    truth_boxes: int
    mean_iou: float  # over truth boxes, best prediction each
    hit_rate: float  # share of truth boxes with IoU > eval.iou_thr
    maxboxacc: float  # MaxBoxAccV2 over every truth image and class (NaN: no truth)
    maxboxacc_control: float  # the same for random maps
    seconds: float
    out: Path


class Painter:
    """Draws each image's four pictures in two background threads; at most 64 wait (flat memory).
    ``proposals``: refine pictures also show the CAM boxes, faint, under the detections;
    ``min_score``: boxes scored below it are not drawn (the tables keep them)."""

    def __init__(self, out: Path, schema: Schema, rules: BoxRules, truth: dict, proposals: bool = False,
                 enabled: bool = True, size: int = PICTURE_SIZE, min_score: float = 0.0):
        self.out, self.schema, self.rules, self.truth, self.proposals = out, schema, rules, truth, proposals
        self.size, self.min_score = size, min_score
        self.pool = ThreadPoolExecutor(2) if enabled else None
        self.pending: deque = deque()

    def __call__(self, result: ImageResult, image: torch.Tensor) -> None:
        if self.pool is None:
            return
        sx, sy = result.scale
        truth_boxes, truth_classes = self.truth.get(result.image_id, NO_TRUTH)
        picture = np.round(image[0].cpu().numpy() * 255).astype(np.uint8)
        # refined boxes too: the predicted classes' boxes alone, above the drawing floor
        drawn = np.isin(result.final[1], result.plan.predicted) & (result.final[2] >= self.min_score)
        self.pending.append(self.pool.submit(
            write_pictures, self.out, result.image_id, picture, self.schema,
            (scale_boxes(truth_boxes, sx, sy), truth_classes), tuple(a[drawn] for a in result.final), result.maps,
            [self.rules(c).threshold for c in result.plan.shown], result.cam[:2] if self.proposals else None,
            self.size, self._cuts(result)))
        while len(self.pending) > 64:
            self.pending.popleft().result()

    def _cuts(self, result: ImageResult) -> np.ndarray | None:
        """The maps the shown classes' thresholds cut for the mask, where that is not the map itself
        (``boxes.threshold_mode``); None when every shown class cuts its map (no copy)."""
        modes = [self.rules(c).threshold_mode for c in result.plan.shown]
        if all(mode == "fixed" for mode in modes):
            return None
        return np.array([cut_map(m, mode) for m, mode in zip(result.maps, modes)]).reshape(result.maps.shape)

    def close(self) -> None:
        for job in self.pending:
            job.result()
        if self.pool is not None:
            self.pool.shutdown()


class Collector:
    """The rows of every table, image by image (one rank's share under torchrun)."""

    def __init__(self, schema: Schema, refined: bool):
        self.schema, self.refined = schema, refined
        self.rows: dict[str, list] = {"detections": [], "cam_detections": [], "probabilities": [], "peaks": [],
                                      "curves": [], "failures": []}

    def add(self, r: ImageResult) -> None:
        self.rows["detections"] += _rows(r.image_id, r.final, *r.scale)
        if self.refined:
            self.rows["cam_detections"] += _rows(r.image_id, r.cam, *r.scale)
        self.rows["probabilities"].append((r.image_id, *r.probs))
        self.rows["peaks"] += [(r.image_id, c, x, y) for c, x, y in r.peaks]
        for c, model, control in r.curves:
            self.rows["curves"] += [(r.image_id, c, "model", *model), (r.image_id, c, "random map", *control)]

    def fail(self, image_id: str, path: str, reason: str) -> None:
        self.rows["failures"].append((image_id, path, reason))

    def tables(self) -> dict[str, pd.DataFrame]:
        columns = {"detections": DETECTION_COLUMNS, "cam_detections": DETECTION_COLUMNS,
                   "probabilities": ["image_id", *self.schema.findings], "peaks": PEAK_COLUMNS,
                   "curves": ["image_id", "class_id", "source", *CURVE_COLUMNS], "failures": FAILURE_COLUMNS}
        return {name: pd.DataFrame(rows, columns=columns[name]) for name, rows in self.rows.items()}


def _rows(image_id: str, pred: Detections, sx: float, sy: float) -> list[tuple]:
    """DETECTION_COLUMNS rows of one image's (boxes in input pixels, classes, scores), in original pixels."""
    boxes, classes, scores = pred
    return [(image_id, int(c), float(s), *box) for box, c, s in zip(scale_boxes(boxes, 1 / sx, 1 / sy), classes, scores)]


def merge_ranks(parts: dict[str, pd.DataFrame], out: Path, info: dist.DistInfo) -> dict[str, pd.DataFrame] | None:
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


def write_outputs(parts: dict[str, pd.DataFrame], source: Source, schema: Schema, config: Config, out: Path,
                  start: float, refined: bool, two_class: tuple[float, float] = (0.0, 1.0)) -> LocalizeSummary:
    """The tables of a run (rank 0), in the input's image order; the summary printed at the end.
    ``two_class``: the 2-class filter's (low, high) (:func:`~cxrcam.calibration.filter_range`)."""
    order = {image_id: k for k, image_id in enumerate(source.images["image_id"])}
    probs = parts["probabilities"].sort_values("image_id", key=lambda s: s.map(order), kind="stable")
    detections, cam_detections = (parts[k].sort_values(["image_id", "class_id", "score"], ascending=[True, True, False])
                                  for k in ("detections", "cam_detections"))
    failures = pd.concat([pd.DataFrame(source.failures, columns=FAILURE_COLUMNS), parts["failures"]],
                         ignore_index=True)
    normal = pd.Series(normal_scores(probs[list(schema.findings)].to_numpy(), config.boxes.normal_score),
                       index=probs["image_id"].to_numpy())
    image_ids = list(source.images["image_id"]) + [i for i, _, _ in source.failures if i not in order]
    fmt = submission_format(schema)  # the competition's own format for its data
    for path, found in (("submission.csv", detections), *((("cam_submission.csv", cam_detections),) if refined else ())):
        kept, rows = two_class_filter(found, normal if schema.no_finding_id is not None else None, *two_class,
                                      p_normal=normal)
        write_submission(out / path, image_ids, kept, rows, schema.no_finding_id, fmt)
    write_csv(out / "probabilities.csv", probs.reset_index(drop=True))
    write_csv(out / "peaks.csv", parts["peaks"])
    write_csv(out / "failures.csv", failures)
    results = match_boxes(source.truth, detections, schema, config.eval.iou_thr, parts["peaks"])
    write_csv(out / "bb_results.csv", results)
    truth_rows = results[results["gt_x_min"].notna()]
    wsol = {"model": float("nan"), "random map": float("nan")}
    curves = parts["curves"]
    if len(curves):
        table = maxboxacc_table(curves, schema)
        write_csv(out / "maxboxacc.csv", table)
        write_csv(out / "box_accuracy.csv", curve_table(curves, schema))
        write_csv(out / "box_curves.csv", curves[curves["source"] == "model"].round(4))
        plot_box_accuracy(curves, out / "box_accuracy.png")
        wsol.update(table[table["class"] == "all"].set_index("source")["maxboxacc_v2"].to_dict())
    else:
        for name in CURVE_FILES:
            (out / name).unlink(missing_ok=True)
    return LocalizeSummary(len(image_ids), len(failures), len(detections), len(truth_rows),
                           float(truth_rows["iou"].mean()) if len(truth_rows) else float("nan"),
                           float(truth_rows["hit"].mean()) if len(truth_rows) else float("nan"),
                           wsol["model"], wsol["random map"], time.perf_counter() - start, out)


__all__ = ["LocalizeSummary", "Painter", "Collector", "merge_ranks", "write_outputs"]
