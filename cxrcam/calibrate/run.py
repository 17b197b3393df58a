"""``calibrate()``: the whole map-to-box procedure chosen on a small boxed set, never the scored one.

Choe et al. (CVPR 2020) show that the threshold that cuts a CAM decides most of a weakly
supervised localisation score, and that it must be chosen on held-out images with boxes; the
issue-26 measurements showed the map itself (method and layer) matters as much. Here:

1. for each candidate map (``--maps``: the configured one first, then by default LayerCAM at the
   backbone's next-to-last stage, alone and fused with the last), stream the boxed images (by
   default the cache's validation fold) through the classifier once, keeping each needed map's
   components at every threshold (:mod:`.sweep`), and its box accuracy curves;
2. per class, AP@0.4 against the threshold with the configured box score and min_area, on all the
   images and on each half of them (split by image id); a class with fewer than ``min_boxes``
   truth boxes takes the threshold best for the mean of the well-boxed classes;
3. the evidence, without overfitting a few boxes: each threshold is chosen on one half and scored
   on the other, both ways. A candidate map replaces the configured one only if it beats the
   configured map at the configured threshold on each half (the best mean of those that do);
   within the chosen map, a class keeps its calibrated threshold only where that held-out AP beats
   the configured threshold's on each half, else the configured threshold. The thresholds kept are
   then chosen on all images. A well-boxed class may also take another candidate of the same method
   (a finer one, layer2 with layer3) where its own held-out AP beats the chosen map's on each half:
   one pass at both maps' layers then serves every class (:meth:`BaseCAM.use_class_layers`);
4. MaxBoxAccV2 and its random-map control for every candidate;
5. the 2-class filter's thresholds (:func:`~cxrcam.outputs.postprocess.choose_filter`) for the
   boxes the chosen settings give, with the same held-out confirmation;
6. ``calibration.json`` (the map, each class's setting, and the evidence; ``localize --threshold
   calibration.json``, ``refine`` and pseudo-boxes read it) and plots next to it.

Each candidate map is tried in each threshold mode asked for (``--modes``;
:func:`~cxrcam.boxes.cut_map`; the configured one by default), a (map, mode) pair being one
candidate; each class's box scale is chosen after its threshold, with the same held-out
confirmation. Given several checkpoints (an ensemble), their mean probabilities
choose the ensemble's operating points first (recorded; localize and refine use them).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.boxes import THRESHOLD_MODES, components, scale_boxes
from cxrcam.boxes.from_cam import X0, Y1
from cxrcam.calibrate.sweep import (SCALES, SWEEP, ClassMaps, Pair, ap_at, choose_threshold, class_boxes, on_grid,
                                   sweep_class, truth_of)
from cxrcam.calibration import SETTING_KEYS, write_calibration
from cxrcam.cam import map_name, parse_layers, parse_map, resolve_layer
from cxrcam.cam.checkpoint import CheckpointMaps, needed_classes
from cxrcam.config import Config
from cxrcam.data.sources import open_source
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS, boxes_by_image, target_columns
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.detection import truth_by_image
from cxrcam.evaluation.weak import CURVE_COLUMNS, maxboxacc_table, pair_curves, plot_box_accuracy
from cxrcam.files import save_figure
from cxrcam.outputs.postprocess import choose_filter_where_complete
from cxrcam.runtime import dist
from cxrcam.runtime.progress import progress_bar


@dataclass
class Calibration:
    images: int
    classes: dict  # class name -> its entry in calibration.json
    mean_ap_default: float  # mean AP over the calibrated classes, configured map and threshold
    mean_ap: float  # ... with the chosen map at the chosen thresholds (optimistic: chosen on these images)
    maxboxacc: float  # of the chosen map
    maxboxacc_control: float
    seconds: float
    out: Path
    maps: list[dict]  # every candidate map with its evidence
    chosen: dict  # the map localize will use: method, target_layer, and why
    filter: dict | None = None  # the 2-class filter's thresholds and evidence (None: no labels to choose by)


def _images(source, fold: str, config: Config, data: Path) -> pd.DataFrame:
    images = source.readable
    if fold == "val":
        if source.kind != "cache" or "fold" not in images.columns:
            raise CxrcamError(f"{data} is a {source.kind}, not a `cxrcam prepare` cache: it has no validation fold "
                              f"(--fold val); pass --fold all to calibrate on all its images (never the ones you score)")
        images = images[images["fold"] == config.split.val_fold].reset_index(drop=True)
    boxed = set(source.truth["image_id"])
    if not boxed & set(images["image_id"]):
        raise CxrcamError(f"{data}: no truth boxes on the {len(images)} calibration images; calibration needs a "
                          f"boxed set (VinBigData's train.csv, NIH's BBox_List_2017.csv)")
    return images


def candidate_maps(model, config: Config, maps: list[str] | None) -> list[tuple[str, str]]:
    """(method, target_layer) of each candidate, the configured map first. ``maps``: "method" or
    "method@layer[,layer]" strings; default: Grad-CAM++ at the pooling's input, and LayerCAM at the
    backbone's next-to-last stage, alone and fused with the last (docs/BENCHMARKS.md, issue 26)."""
    configured = parse_map(config.cam.method, config.cam.target_layer)
    if maps is None:
        stages = [s["module"] for s in getattr(getattr(model, "backbone", model), "feature_info", [])]
        maps = ["gradcam++", *([f"layercam@{stages[-2]}", f"layercam@{stages[-2]},{stages[-1]}"]
                               if len(stages) >= 2 else [])]
    found = [configured]
    for entry in map(parse_map, maps):
        if entry not in found:
            found.append(entry)
    return found


def candidate_modes(config: Config, modes: list[str] | None) -> list[str]:
    """The threshold modes tried on each map (``boxes.threshold_mode``), the configured one first;
    default: the configured one alone (on the tables' world Otsu's and the percentile cuts lost
    beyond noise and the peak-relative cut equalled the fixed one: docs/BENCHMARKS.md, issue 36)."""
    found = [config.boxes.threshold_mode]
    for mode in modes or ():
        if mode not in THRESHOLD_MODES:
            raise CxrcamError(f"--modes: unknown threshold mode {mode!r}; choose among {', '.join(THRESHOLD_MODES)}")
        if mode not in found:
            found.append(mode)
    return found


def _collect(maps: CheckpointMaps, images: pd.DataFrame, truth: pd.DataFrame, progress: bool,
             desc: str, modes: list[str]) -> tuple[dict[str, list[Pair]], pd.DataFrame, pd.DataFrame]:
    """Stream the images once through the map pass: per threshold mode, each predicted or true
    class's components (original pixels); the box accuracy curves of every true class with
    their random-map control; and every image's probabilities (image id -> one per class)."""
    by_image, size = boxes_by_image(truth), maps.size
    no_truth = (np.zeros((0, 4)), np.zeros(0, np.int64))

    def plan(row: int, p: np.ndarray):  # calibrate's addition: the truth classes
        return needed_classes(p, maps.thresholds, extra=by_image.get(images.at[row, "image_id"], no_truth)[1])

    pairs, curves, seen = {mode: [] for mode in modes}, [], {}
    for batch in maps.stream(images, plan, desc, progress, leave=False):
        if batch.maps is None:
            continue
        probs = batch.maps.probs
        seen.update(zip(batch.ids, np.asarray(probs, np.float64)))
        for b, (image_id, (h, w), need) in enumerate(zip(batch.ids, batch.sizes, batch.maps.plans)):
            for c in need.need:
                cam = batch.maps.map(b, c)
                for mode in modes:
                    rows = components(cam, SWEEP, mode=mode)  # at the input size: the boxes localize cuts
                    rows[:, X0:Y1 + 1] = scale_boxes(rows[:, X0:Y1 + 1], w / size, h / size)
                    pairs[mode].append(Pair(image_id, c, float(probs[b, c]), c in need.predicted, rows, (h, w)))
                if c in need.extra:
                    boxes, classes = by_image[image_id]
                    model_ious, control = pair_curves(cam, scale_boxes(boxes[classes == c], size / w, size / h),
                                                      f"{image_id}/{c}")
                    curves += [(image_id, c, "model", *model_ious), (image_id, c, "random map", *control)]
    return (pairs, pd.DataFrame(curves, columns=["image_id", "class_id", "source", *CURVE_COLUMNS]),
            pd.DataFrame.from_dict(seen, orient="index"))


def ensemble_operating_points(maps: CheckpointMaps, images: pd.DataFrame, progress: bool) -> np.ndarray:
    """An ensemble's decision thresholds: each class's F1 operating point (as ``train-classifier``
    chooses a checkpoint's) on the members' mean probabilities over ``images`` (with labels); NaN
    where a class has too few positives."""
    from cxrcam.evaluation.classification import operating_points

    columns = target_columns(maps.schema)
    if not set(columns) <= set(images.columns):
        raise CxrcamError("calibrating an ensemble chooses its operating points on labelled images; these have no "
                          "labels (calibrate on a `cxrcam prepare` cache or a dataset folder)")
    probs = np.full((len(images), maps.schema.num_findings), np.nan)
    nothing = needed_classes(np.zeros(maps.schema.num_findings), maps.thresholds, predict=False)
    for batch in maps.stream(images, lambda row, p: nothing, "ensemble probabilities", progress, leave=False):
        if batch.maps is not None:
            probs[batch.rows] = batch.maps.probs
    known = np.isfinite(probs).all(1)
    return operating_points(images.loc[known, columns].to_numpy(np.float64), probs[known])


def half_of(image_id: str) -> int:
    """0 or 1: the half of the calibration images an image belongs to (stable across runs)."""
    return zlib.crc32(str(image_id).encode()) % 2


def _sweep(pairs: list[Pair], truth: pd.DataFrame, schema, config: Config, progress: bool, mode: str) -> dict:
    """Each boxed class's AP curve on all images and on each half (the other box settings are
    tried for the chosen map alone: :func:`_other_settings`)."""
    classes, iou_thr = {}, config.eval.iou_thr
    boxes = dataclasses.replace(config.boxes, threshold_mode=mode)
    for c in progress_bar(range(schema.num_findings), desc="calibrate sweep", unit="class", disable=not progress,
                          leave=False):
        class_truth = truth_of(truth, c)
        if not len(class_truth):
            continue
        classes[schema.class_name(c)] = sweep_class([p for p in pairs if p.class_id == c], class_truth, c,
                                                    boxes, iou_thr, others=False, half=half_of)
    return classes


def _other_settings(classes: dict, pairs: list[Pair], truth: pd.DataFrame, config: Config, mode: str) -> None:
    """Every other box score and min_area, tried for each class of the chosen map (``best_setting``)."""
    boxes = dataclasses.replace(config.boxes, threshold_mode=mode)
    for e in classes.values():
        c = e["class_id"]
        e["best_setting"] = sweep_class([p for p in pairs if p.class_id == c], truth_of(truth, c), c, boxes,
                                        config.eval.iou_thr)["best_setting"]


def _held_out(classes: dict, min_boxes: int, default: float) -> None:
    """Each class's held-out AP on each half with a calibrated threshold (chosen on the other half)
    and with the configured ``default`` threshold, and their means; a class with fewer than
    ``min_boxes`` boxes is scored with the threshold best for the mean of the well-boxed ones."""
    own = [e for e in classes.values() if e["n_truth"] >= min_boxes] or list(classes.values())
    k0 = SWEEP.index(on_grid(default))
    shared = []
    for h in (0, 1):
        curves = np.array([e["halves"][h] for e in own], np.float64)
        defined = curves[np.isfinite(curves).all(1)]
        shared.append(choose_threshold(defined.mean(0) if len(defined) else curves[0], default)[0])
    for e in classes.values():
        a, b = (np.asarray(curve) for curve in e["halves"])
        if e["n_truth"] >= min_boxes:
            t_a, t_b = choose_threshold(a, default)[0], choose_threshold(b, default)[0]
        else:
            t_a, t_b = shared
        e["heldout_halves"] = [float(a[SWEEP.index(t_b)]), float(b[SWEEP.index(t_a)])]  # half 0 by 1's choice ...
        e["default_halves"] = [float(a[k0]), float(b[k0])]
        e["heldout_ap"] = float(np.mean(e["heldout_halves"]))
        e["heldout_ap_default"] = float(np.mean(e["default_halves"]))


def _gains_on_both_halves(candidate: dict, baseline: dict) -> bool:
    """Whether a candidate map, thresholds chosen on one half, beats the configured map at the
    configured threshold on each half it did not choose on (the mean could hide a loss on one)."""
    ours = [_mean(e["heldout_halves"][h] for e in candidate["classes"].values()) for h in (0, 1)]
    theirs = [_mean(e["default_halves"][h] for e in baseline["classes"].values()) for h in (0, 1)]
    return all(o > t + 1e-9 for o, t in zip(ours, theirs))


def _configured(entry: dict, config: Config) -> None:
    """A class at the configured box setting: no calibration gain held out for it."""
    entry.update(threshold=on_grid(config.boxes.threshold), ap=entry["ap_default"], score=config.boxes.score,
                 min_area=config.boxes.min_area, threshold_mode=config.boxes.threshold_mode,
                 source="configured (no held-out gain)")


def _choose_scales(classes: dict, pairs: list[Pair], truth: pd.DataFrame, config: Config, min_boxes: int) -> None:
    """Each well-boxed class's box scale (:data:`SCALES`) at its chosen setting: chosen on one half
    of the images and scored on the other, both ways; kept only where that beats the configured
    ``boxes.scale`` on each half (then chosen on all images), as thresholds are. Among scales tied at
    the best AP, the one nearest the configured scale."""
    default = config.boxes.scale
    grid = sorted({*SCALES, default})
    for e in classes.values():
        e["scale"] = default
        if e["n_truth"] < min_boxes:
            continue
        setting = dataclasses.replace(config.boxes, **{k: e[k] for k in ("score", "min_area", "threshold_mode")})
        curves = ap_at(ClassMaps.of([p for p in pairs if p.class_id == e["class_id"]]),
                       truth_by_image(truth_of(truth, e["class_id"])),
                       [(e["threshold"], dataclasses.replace(setting, scale=f)) for f in grid],
                       config.eval.iou_thr, half=half_of)
        if not np.isfinite(curves).all():
            continue
        k0 = grid.index(default)
        change = np.abs(np.log(np.asarray(grid) / default))

        def best(curve: np.ndarray) -> int:  # of the scales at the best AP, the least change
            tied = np.flatnonzero(curve >= curve.max() - 1e-9)
            return int(tied[np.argmin(change[tied])])

        held = [curves[1, best(curves[2])], curves[2, best(curves[1])]]  # half 0 by 1's choice, and back
        e["scale_halves"], e["scale_default_halves"] = [float(v) for v in held], [float(curves[1, k0]),
                                                                                    float(curves[2, k0])]
        if all(h > d + 1e-9 for h, d in zip(held, e["scale_default_halves"])):
            e["scale"], e["ap"] = float(grid[best(curves[0])]), float(curves[0].max())


def _choose(classes: dict, min_boxes: int, search: str, config: Config, mode: str, confirm: bool = False) -> None:
    """Each class's setting: its own best where it has ``min_boxes`` truth boxes, else the
    threshold best for the mean AP of the classes that do (the configured one unless beaten). With
    ``confirm``, a class whose calibrated threshold did not beat the configured one on both
    held-out halves (:func:`_held_out`) keeps the configured setting. ``mode``: the threshold mode
    the thresholds were chosen in."""
    own = [e for e in classes.values() if e["n_truth"] >= min_boxes]
    if not own:
        warnings.warn(f"no class has {min_boxes} truth boxes among the calibration images: one threshold for all "
                      f"classes, from {sum(e['n_truth'] for e in classes.values())} boxes; calibrate on a larger "
                      f"boxed set for per-class thresholds", stacklevel=3)
    mean_curve = np.mean([e["curve"] for e in own or classes.values()], axis=0)
    shared_t, _ = choose_threshold(mean_curve, config.boxes.threshold)
    default_t = on_grid(config.boxes.threshold)
    for e in classes.values():
        e["source"] = "class" if e["n_truth"] >= min_boxes else "all classes"
        if e["source"] != "class":
            e["threshold"], e["ap"] = float(shared_t), e["curve"][SWEEP.index(shared_t)]
        elif search == "all":
            e.update({k: e["best_setting"][k] for k in ("score", "min_area", "threshold", "ap")})
        gains = all(h > d + 1e-9 for h, d in zip(e.get("heldout_halves", ()), e.get("default_halves", ())))
        if confirm and not gains and e["threshold"] != default_t:
            _configured(e, config)
        e.setdefault("score", config.boxes.score)
        e.setdefault("min_area", config.boxes.min_area)
        e.setdefault("threshold_mode", mode)


def _class_maps(candidates: list[dict], best: dict, min_boxes: int, model) -> dict[str, dict]:
    """Class name -> the candidate map it takes instead of ``best``'s (issue 36: finer maps where a
    finding is small): a candidate of the same method and threshold mode whose held-out AP for that
    well-boxed class, threshold chosen on the other half, beats ``best``'s (at its calibrated and
    at the configured threshold) on each half; of several, the best mean. One pass at both maps'
    layers serves every class."""
    switched: dict[str, tuple[float, dict]] = {}
    for m in candidates:
        if m["method"] != best["method"] or m["threshold_mode"] != best["threshold_mode"] or \
                {resolve_layer(model, n) for n in parse_layers(m["target_layer"])} == \
                {resolve_layer(model, n) for n in parse_layers(best["target_layer"])}:
            continue
        for name, e in m["classes"].items():
            ours, theirs = best["classes"].get(name), e.get("heldout_halves")
            if ours is None or e["n_truth"] < min_boxes or not theirs:
                continue
            bar = [max(a, b) for a, b in zip(ours["heldout_halves"], ours["default_halves"])]
            if all(np.isfinite(theirs)) and all(t > b + 1e-9 for t, b in zip(theirs, bar)):
                if e["heldout_ap"] > switched.get(name, (-np.inf, None))[0]:
                    switched[name] = (e["heldout_ap"], m)
    return {name: m for name, (_, m) in switched.items()}


def _choose_filter(classes: dict, best: dict, images: pd.DataFrame, truth: pd.DataFrame, schema,
                   config: Config) -> dict | None:
    """The 2-class filter's thresholds (:func:`~cxrcam.outputs.postprocess.choose_filter_where_complete`)
    for the boxes localize would write with the chosen settings."""
    columns = target_columns(schema)
    if not set(columns) <= set(images.columns) or not len(best["probs"]):
        return None
    found = []
    for e in classes.values():
        setting = dataclasses.replace(config.boxes, **{k: e[k] for k in SETTING_KEYS if k in e})
        ids, boxes, scores = class_boxes(ClassMaps.of([p for p in best["pairs"] if p.class_id == e["class_id"]]),
                                         e["threshold"], setting)
        found.append(pd.DataFrame({"image_id": ids, "class_id": e["class_id"], "score": scores,
                                   **dict(zip(BOX_COLUMNS, boxes.reshape(-1, 4).T))}))
    detections = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=DETECTION_COLUMNS)
    return choose_filter_where_complete(detections, best["probs"], images.set_index("image_id")[columns], truth,
                                        schema, config.eval.iou_thr, half_of, config.boxes.normal_score)


def _mean(values) -> float:
    """The mean of the defined values (a class boxed in one half only has no held-out AP)."""
    values = np.asarray(list(values), np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def calibrate(checkpoint: str | Path | list, data: str | Path, out: str | Path, config: Config = Config(),
              dataset: str | None = None, fold: str = "val", min_boxes: int = 5, search: str = "threshold",
              progress: bool = True, maps: list[str] | None = None, modes: list[str] | None = None) -> Calibration:
    """Write ``out`` (calibration.json) and its plots; see the module docstring. ``checkpoint``: one
    classifier, or several (an ensemble: its operating points are chosen here too). ``search``:
    "threshold" sets each class's threshold; "all" also its box score and min_area. ``maps``:
    the candidate maps ("method@layer"; default: see :func:`candidate_maps`; [] tries only the
    configured one). ``modes``: the threshold modes tried on each besides the configured one
    (default: none)."""
    start, out = time.perf_counter(), Path(out)
    maps_of = CheckpointMaps(checkpoint, config, dist.pick_device(config.runtime.device), calibrated=False)
    schema = maps_of.schema
    source = open_source(data, dataset, config)
    if source.schema is not None and source.schema.name != schema.name:
        raise CxrcamError(f"{checkpoint} predicts {schema.name} classes; {data} is a {source.schema.name} dataset")
    images = _images(source, fold, config, Path(data))
    truth = source.truth[source.truth["image_id"].isin(set(images["image_id"]))]
    operating = None
    if len(maps_of.paths) > 1:  # the ensemble's own operating points, then its maps cut for the classes they predict
        operating = ensemble_operating_points(maps_of, images, progress)
        if config.boxes.min_prob == "auto":
            maps_of.thresholds = np.where(np.isnan(operating), maps_of.thresholds, operating)
    candidates = []
    for method, layer in candidate_maps(maps_of.model, config, maps):
        maps_of.use_map(method, layer)
        modes_tried = candidate_modes(config, modes)
        by_mode, curves, probs = _collect(maps_of, images, truth, progress, f"calibrate maps {map_name(method, layer)}",
                                   modes_tried)
        table = maxboxacc_table(curves, schema)
        overall = table[table["class"] == "all"].set_index("source")["maxboxacc_v2"].to_dict()
        for mode in modes_tried:
            classes = _sweep(by_mode[mode], truth, schema, config, progress, mode)
            _held_out(classes, min_boxes, config.boxes.threshold)
            candidates.append({"method": method, "target_layer": layer, "threshold_mode": mode, "classes": classes,
                               "curves": curves, "pairs": by_mode[mode], "table": table, "probs": probs,
                               "maxboxacc": overall.get("model", math.nan), "control": overall.get("random map", math.nan),
                               "heldout_ap": _mean(e["heldout_ap"] for e in classes.values()),
                               "heldout_ap_default": _mean(e["heldout_ap_default"] for e in classes.values())})
    baseline = candidates[0]["heldout_ap_default"]  # the configured map and mode at the configured threshold
    winners = [m for m in candidates if _gains_on_both_halves(m, candidates[0])]
    if winners:
        best = max(winners, key=lambda m: m["heldout_ap"])
        why = (f"held-out mean AP@{config.eval.iou_thr} {best['heldout_ap']:.4f} against {baseline:.4f} for the "
               f"configured map at threshold {config.boxes.threshold}, higher on each half")
    else:
        best, why = candidates[0], ("no candidate beat the configured map and threshold on both held-out halves: "
                                    "the configured procedure stands")
    switched = _class_maps(candidates, best, min_boxes, maps_of.model)
    classes = {**best["classes"], **{name: m["classes"][name] for name, m in switched.items()}}
    pairs = [p for p in best["pairs"] if schema.class_name(p.class_id) not in switched] + [
        p for name, m in switched.items() for p in m["pairs"] if schema.class_name(p.class_id) == name]
    _other_settings(classes, pairs, truth, config, best["threshold_mode"])
    if winners:
        _choose(classes, min_boxes, search, config, best["threshold_mode"], confirm=True)
    else:  # the configured procedure stands: every class at the configured setting, but a class on its own map
        for name, e in classes.items():
            if name not in switched:
                _configured(e, config)
        if switched:
            _choose({n: classes[n] for n in switched}, min_boxes, search, config, best["threshold_mode"], confirm=True)
    _choose_scales(classes, pairs, truth, config, min_boxes)
    two_class = _choose_filter(classes, {**best, "pairs": pairs}, images, truth, schema, config)
    own = [e for e in classes.values() if e["source"] == "class"] or list(classes.values())
    chosen = {"method": best["method"], "target_layer": best["target_layer"],
              "threshold_mode": best["threshold_mode"], "why": why}
    if switched:  # one pass at the union of the layers; each switched class fuses its own (BaseCAM.use_class_layers)
        layers = [resolve_layer(maps_of.model, n) for m in (best, *switched.values())
                  for n in parse_layers(m["target_layer"])]
        own_layers = {c: best["target_layer"] for c in range(schema.num_findings)}
        own_layers.update({classes[n]["class_id"]: m["target_layer"] for n, m in switched.items()})
        chosen.update(target_layer=",".join(dict.fromkeys(layers)),
                      class_layers={str(c): v for c, v in own_layers.items()})
        moved = ", ".join(f"{n} on {map_name(m['method'], m['target_layer'])}" for n, m in switched.items())
        chosen["why"] = f"{why}; {moved} (its own held-out AP higher on each half)"
    evidence = [{k: m[k] for k in ("method", "target_layer", "threshold_mode", "heldout_ap", "heldout_ap_default",
                                   "maxboxacc", "control")} for m in candidates]
    result = Calibration(len(images), classes, _mean(e["ap_default"] for e in own), _mean(e["ap"] for e in own),
                         best["maxboxacc"], best["control"], time.perf_counter() - start, out, evidence, chosen,
                         two_class)
    write_calibration(out, {
        "checkpoint": [str(p) for p in maps_of.paths] if len(maps_of.paths) > 1 else str(checkpoint),
        "operating_points": None if operating is None else [float(v) for v in operating],
        "data": str(data), "fold": fold, "images": len(images), "schema": schema.name,
        "search": search, "iou_thr": config.eval.iou_thr, "min_boxes": min_boxes, "thresholds": list(SWEEP),
        "default": {"threshold": config.boxes.threshold, "score": config.boxes.score, "min_area": config.boxes.min_area,
                    "threshold_mode": config.boxes.threshold_mode, "scale": config.boxes.scale,
                    "method": config.cam.method, "target_layer": config.cam.target_layer, "target": config.cam.target},
        "cam": chosen, "maps": evidence, "filter": two_class,
        "mean_ap": {"default": result.mean_ap_default, "calibrated": result.mean_ap},
        "maxboxacc": best["table"].to_dict(orient="records"), "classes": classes,
        "image_ids": list(images["image_id"])})
    _plot(classes, config.boxes.threshold, out.with_suffix(".png"))
    if len(best["curves"]):
        plot_box_accuracy(best["curves"], out.with_name(out.stem + "_box_accuracy.png"))
    return result


def _plot(classes: dict, default: float, path: Path) -> None:
    """AP against the threshold, one panel per class, the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, math.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, (name, e) in zip(axes.flat, classes.items()):
        ax.plot(SWEEP, e["curve"], color="C0")
        ax.axvline(default, color="grey", ls=":", lw=1)
        ax.plot([e["threshold"]], [e["ap"]], "o", color="C3")
        ax.set(xlim=(0, 1), ylim=(0, max(0.05, 1.1 * max(e["curve"]))), xlabel="threshold", ylabel="AP@0.4",
               title=f"{name} ({e['n_truth']} boxes)\nt={e['threshold']:.2f} AP {e['ap']:.2f}"
                     f"{'' if e['source'] == 'class' else ' (shared)' if e['source'] == 'all classes' else ' (kept)'}")
    fig.suptitle(f"AP against heat map threshold (dotted: the default {default})")
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")


__all__ = ["calibrate", "Calibration", "candidate_maps", "candidate_modes", "half_of"]
