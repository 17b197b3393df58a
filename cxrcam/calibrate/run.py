"""``calibrate()``: per-class heat map thresholds chosen on a small boxed set, never the scored one.

Choe et al. (CVPR 2020) show that the threshold that cuts a CAM decides most of a weakly
supervised localisation score, and that it must be chosen on held-out images with boxes. Here:

1. stream the boxed images (by default the cache's validation fold) through the classifier
   once, keeping each needed map's components at every threshold (:mod:`.sweep`);
2. per class, AP@0.4 against the threshold with the configured box score and min_area; the
   best threshold is the class's, and every other (score, min_area) is tried and reported;
   a class with fewer than ``min_boxes`` truth boxes takes the threshold best for all classes;
3. MaxBoxAccV2 and its random-map control on the same images;
4. ``calibration.json`` (``localize --threshold calibration.json`` reads it) and a plot of AP
   against threshold per class, next to it.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrcam.boxes import components, scale_boxes
from cxrcam.calibrate.sweep import SWEEP, Pair, choose_threshold, sweep_class, truth_of
from cxrcam.cam import create_cam
from cxrcam.config import Config
from cxrcam.data.dataset import ImageFiles
from cxrcam.data.sources import open_source
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.weak import CURVE_COLUMNS, maxboxacc_table, pair_curves, plot_box_accuracy
from cxrcam.files import save_figure, write_json
from cxrcam.models import load_classifier
from cxrcam.schemas import get_schema


@dataclass
class Calibration:
    images: int
    classes: dict  # class name -> its entry in calibration.json
    mean_ap_default: float  # mean AP over the calibrated classes at the configured threshold
    mean_ap: float  # ... at their calibrated thresholds (optimistic: chosen on these images)
    maxboxacc: float
    maxboxacc_control: float
    seconds: float
    out: Path


def _images(source, fold: str, config: Config, data: Path) -> pd.DataFrame:
    images = source.readable
    if fold == "val":
        if "fold" not in images.columns:
            raise CxrcamError(f"{data} has no folds (not a `cxrcam prepare` cache): pass --fold all to calibrate "
                              f"on all its images")
        images = images[images["fold"] == config.split.val_fold].reset_index(drop=True)
    boxed = set(source.truth["image_id"])
    if not boxed & set(images["image_id"]):
        raise CxrcamError(f"{data}: no truth boxes on the {len(images)} calibration images; calibration needs a "
                          f"boxed set (VinBigData's train.csv, NIH's BBox_List_2017.csv)")
    return images


def _collect(model, config: Config, images: pd.DataFrame, truth: pd.DataFrame, size: int, progress: bool
             ) -> tuple[list[Pair], pd.DataFrame]:
    """Stream the images once: each predicted or true class's components (original pixels), and
    the box accuracy curves of every true class with their random-map control."""
    cam = create_cam(model, config.cam.method, config.cam.target_layer or None)
    by_image = {k: (g[BOX_COLUMNS].to_numpy(np.float64), g["class_id"].to_numpy()) for k, g in truth.groupby("image_id")}
    hw = images[["height", "width"]].to_numpy(np.float64) if {"height", "width"} <= set(images.columns) else None
    loader = DataLoader(ImageFiles(list(images["path"]), size), batch_size=config.cam.batch_size,
                        num_workers=config.cam.workers)
    pairs, curves = [], []
    min_prob = config.boxes.min_prob
    for x, idx, heights, widths, errors in tqdm(loader, desc="calibrate maps", unit="batch", disable=not progress):
        ids = [images.at[int(i), "image_id"] for i in idx]
        true = [set(by_image.get(i, (None, np.zeros(0)))[1].tolist()) for i in ids]

        def needed(logits):
            probs = logits.sigmoid().cpu().numpy()
            return sorted({c for p, t in zip(probs, true) for c in (*np.flatnonzero(p > min_prob), *t)})

        out = cam(x, needed)
        probs, maps = out.logits.sigmoid().cpu().numpy(), out.cams.cpu().numpy()
        for b, image_id in enumerate(ids):
            if errors[b]:
                continue
            h, w = (hw[int(idx[b])] if hw is not None and np.isfinite(hw[int(idx[b])]).all()
                    else (float(heights[b]), float(widths[b])))
            for k, c in enumerate(out.classes):
                if not (probs[b, c] > min_prob or c in true[b]):
                    continue
                rows = components(maps[b, k], SWEEP)  # at the input size: the boxes localize cuts
                rows[:, 1:5] = scale_boxes(rows[:, 1:5], w / size, h / size)
                pairs.append(Pair(image_id, c, float(probs[b, c]), bool(probs[b, c] > min_prob), rows))
                if c in true[b]:
                    boxes, classes = by_image[image_id]
                    model_ious, control = pair_curves(maps[b, k], scale_boxes(boxes[classes == c], size / w, size / h),
                                                      f"{image_id}/{c}")
                    curves += [(image_id, c, "model", *model_ious), (image_id, c, "random map", *control)]
    return pairs, pd.DataFrame(curves, columns=["image_id", "class_id", "source", *CURVE_COLUMNS])


def calibrate(checkpoint: str | Path, data: str | Path, out: str | Path, config: Config = Config(),
              dataset: str | None = None, fold: str = "val", min_boxes: int = 5, search: str = "threshold",
              progress: bool = True) -> Calibration:
    """Write ``out`` (calibration.json) and its plots; see the module docstring. ``search``:
    "threshold" sets each class's threshold; "all" also its box score and min_area."""
    start, out = time.perf_counter(), Path(out)
    model, ckpt = load_classifier(checkpoint)
    schema, size = get_schema(ckpt["schema"]), int(ckpt["input_size"])
    source = open_source(data, dataset, config)
    if source.schema is not None and source.schema.name != schema.name:
        raise CxrcamError(f"{checkpoint} predicts {schema.name} classes; {data} is a {source.schema.name} dataset")
    images = _images(source, fold, config, Path(data))
    truth = source.truth[source.truth["image_id"].isin(set(images["image_id"]))]
    pairs, curves = _collect(model, config, images, truth, size, progress)

    iou_thr, classes = config.eval.iou_thr, {}
    for c in tqdm(range(schema.num_findings), desc="calibrate sweep", unit="class", disable=not progress):
        class_truth = truth_of(truth, c)
        if len(class_truth):
            classes[schema.class_name(c)] = sweep_class([p for p in pairs if p.class_id == c], class_truth, c,
                                                        config.boxes, iou_thr)
    _choose(classes, min_boxes, search, config)
    table = maxboxacc_table(curves, schema)
    overall = table[table["class"] == "all"].set_index("source")["maxboxacc_v2"].to_dict()
    own = [e for e in classes.values() if e["source"] == "class"] or list(classes.values())
    result = Calibration(len(images), classes, float(np.mean([e["ap_default"] for e in own])),
                         float(np.mean([e["ap"] for e in own])), overall.get("model", math.nan),
                         overall.get("random map", math.nan), time.perf_counter() - start, out)
    write_json(out, {
        "checkpoint": str(checkpoint), "data": str(data), "fold": fold, "images": len(images),
        "search": search, "iou_thr": iou_thr, "min_boxes": min_boxes, "thresholds": list(SWEEP),
        "default": {k: getattr(config.boxes, k) for k in ("threshold", "score", "min_area")},
        "mean_ap": {"default": result.mean_ap_default, "calibrated": result.mean_ap},
        "maxboxacc": table.to_dict(orient="records"), "classes": classes,
        "image_ids": list(images["image_id"])})
    _plot(classes, config.boxes.threshold, out.with_suffix(".png"))
    if len(curves):
        plot_box_accuracy(curves, out.with_name(out.stem + "_box_accuracy.png"))
    return result


def _choose(classes: dict, min_boxes: int, search: str, config: Config) -> None:
    """Each class's setting: its own best where it has ``min_boxes`` truth boxes, else the
    threshold best for the mean AP of the classes that do (the configured one unless beaten)."""
    own = [e for e in classes.values() if e["n_truth"] >= min_boxes]
    if not own:
        warnings.warn(f"no class has {min_boxes} truth boxes among the calibration images: one threshold for all "
                      f"classes, from {sum(e['n_truth'] for e in classes.values())} boxes; calibrate on a larger "
                      f"boxed set for per-class thresholds", stacklevel=3)
    mean_curve = np.mean([e["curve"] for e in own or classes.values()], axis=0)
    shared_t, _ = choose_threshold(mean_curve, config.boxes.threshold)
    for e in classes.values():
        e["source"] = "class" if e["n_truth"] >= min_boxes else "all classes"
        if e["source"] != "class":
            e["threshold"], e["ap"] = float(shared_t), e["curve"][SWEEP.index(shared_t)]
        elif search == "all":
            e.update({k: e["best_setting"][k] for k in ("score", "min_area", "threshold", "ap")})
        e.setdefault("score", config.boxes.score)
        e.setdefault("min_area", config.boxes.min_area)


def _plot(classes: dict, default: float, path: Path) -> None:
    """AP@0.4 against the threshold, one panel per class, the chosen threshold marked."""
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
                     f"{'' if e['source'] == 'class' else ' (shared)'}")
    fig.suptitle(f"AP against heat map threshold (dotted: the default {default})")
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")


__all__ = ["calibrate", "Calibration"]
