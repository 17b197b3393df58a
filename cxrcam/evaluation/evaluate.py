"""``cxrcam evaluate``: score a submission against ground truth the way the benchmarks do.

Ground truth (``read_ground_truth``): a ``prepare`` cache, a dataset folder as released, a
VinBigData ``train.csv`` (readers fused as the config says), an NIH ``BBox_List_2017.csv``,
or an RSNA ``stage_2_train_labels.csv``. Predictions: a ``submission.csv``, or a localize /
refine output folder (its ``submission.csv``, plus ``probabilities.csv`` for AUROC,
``peaks.csv`` for the pointing game, ``maxboxacc.csv`` for MaxBoxAccV2, and ``localize.json``,
whose box settings the random-map control uses, so that the control cuts its maps as the
model's maps were cut). The control also gives an mAP: the same classifier's boxes cut from
random maps (``control_map``).

NIH boxes cover only some images and classes, so NIH detection metrics run on the images
that have boxes; VinBigData and RSNA truth is complete, so every image counts and images
without findings are VinBigData's "No finding" truth.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.boxes import BoxRules, points_in_boxes
from cxrcam.calibration import box_rules
from cxrcam.config import BoxConfig, Config, class_thresholds, from_dict
from cxrcam.data.submission import parse_submission
from cxrcam.data.tables import BOX_COLUMNS, read_table, report_invalid, target_columns
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.coco import coco_ap
from cxrcam.evaluation.detection import ClassAP, voc_map, with_no_finding
from cxrcam.evaluation.rsna import image_scores, summary
from cxrcam.evaluation.weak import (CURVE_COLUMNS, accuracy_table, confusion_pointing, random_control,
                                    random_detections)
from cxrcam.files import atomic_write_text, save_figure, write_csv, write_json
from cxrcam.schemas import NIH, RSNA, SCHEMAS, Schema

NIH_SIDE = 1024  # every released NIH image is 1024 x 1024


@dataclass
class GroundTruth:
    schema: Schema
    image_ids: list[str]  # the images the metrics run over
    boxes: pd.DataFrame  # finding boxes, original pixels
    labels: pd.DataFrame | None  # image_id + y_<id> (image-level labels), when known
    sizes: dict[str, tuple[float, float]]  # image_id -> (height, width), when known
    complete: bool  # every finding is boxed: an image without boxes is normal
    invalid: pd.DataFrame  # truth rows the reader dropped or fixed (tables.INVALID_COLUMNS)


def read_ground_truth(path: str | Path, config: Config = Config()) -> GroundTruth:
    """Truth from a cache or dataset folder (recognised as localize recognises its input), or
    from a label table file."""
    from cxrcam.data.readers import nih_from_tables, read_vinbig, rsna_from_table
    from cxrcam.data.sources import detect_dataset, open_source

    path = Path(path)
    if not path.exists():
        raise CxrcamError(f"ground truth not found: {path}")
    if path.is_dir():
        if not (path / "cache.json").is_file() and detect_dataset(path) is None:
            raise CxrcamError(f"{path}: not a cache, and no label table "
                              f"({', '.join(t for s in SCHEMAS.values() for t in s.label_tables)})")
        source = open_source(path, config=config)
        schema, images, boxes, invalid = source.schema, source.images, source.truth, source.invalid
    else:
        table = read_table(path)
        columns = set(table.columns)
        if {"image_id", "class_id", "rad_id", "x_min"} <= columns:
            # with the images beside it (train.csv + train/), boxes past an image's edge are clipped to
            # the size its header gives, as prepare clips them
            tables = read_vinbig(path.parent, config.fusion, table=path)
        elif {"patientId", "Target"} <= columns:
            tables = rsna_from_table(table)
        elif "Finding Label" in columns or any(str(c).startswith("Bbox") for c in columns):
            labels = table.iloc[:, 1].astype(str).groupby(table.iloc[:, 0].astype(str), sort=False)
            entry = labels.agg(lambda names: "|".join(sorted(set(names)))).rename("Finding Labels").reset_index()
            entry.columns = ["Image Index", "Finding Labels"]
            entry["Patient ID"] = entry["Image Index"]
            tables = nih_from_tables(entry, table)
        else:
            raise CxrcamError(f"{path}: not a VinBigData train.csv, NIH BBox_List_2017.csv or RSNA labels table "
                              f"(columns: {', '.join(map(str, table.columns))})")
        schema, images, boxes, invalid = tables.schema, tables.images, tables.boxes, tables.invalid
    complete = schema is not NIH
    ids = list(images["image_id"].astype(str)) if complete else sorted(set(boxes["image_id"]))
    sizes = {}
    if {"height", "width"} <= set(images.columns):
        known = images.dropna(subset=["height", "width"])
        sizes = dict(zip(known["image_id"], zip(known["height"].astype(float), known["width"].astype(float))))
    if schema is NIH:
        sizes = {i: sizes.get(i, (NIH_SIDE, NIH_SIDE)) for i in ids}
    labels = images[["image_id", *target_columns(schema)]] if set(target_columns(schema)) <= set(images.columns) else None
    if schema is NIH and path.is_file():
        labels = None  # a box list alone says nothing about the images' other findings
    boxes = boxes[boxes["image_id"].isin(set(ids))][["image_id", "class_id", *BOX_COLUMNS]].reset_index(drop=True)
    return GroundTruth(schema, ids, boxes, labels, sizes, complete, invalid)


def _prediction_files(pred: Path) -> tuple[Path, Path | None, Path | None, Path | None]:
    """submission.csv and, in a localize/refine folder, probabilities.csv, peaks.csv, localize.json."""
    if pred.is_dir():
        found = [pred / n for n in ("submission.csv", "probabilities.csv", "peaks.csv", "localize.json")]
        if not found[0].is_file():
            raise CxrcamError(f"{pred}: no submission.csv")
        return found[0], *(p if p.is_file() else None for p in found[1:])
    return pred, None, None, None


def _pointing(truth: pd.DataFrame, peaks: pd.DataFrame) -> pd.Series:
    """Per truth box, 1 when its class's map peak (localize's peaks.csv) lies inside, else 0 (NaN: no peak)."""
    at = truth[["image_id", "class_id"]].merge(peaks, on=["image_id", "class_id"], how="left")
    inside = points_in_boxes(truth[BOX_COLUMNS].to_numpy(), at["peak_x"].to_numpy(), at["peak_y"].to_numpy())
    return pd.Series(np.where(at["peak_x"].notna(), inside.astype(float), np.nan))


def describe(saved: dict) -> tuple[str, bool]:
    """(what a localize/refine folder's submission is, by meaning; whether its boxes are CAM boxes),
    from its localize.json (empty: a submission file alone)."""
    if not saved:
        return "submission", False
    config = saved.get("config", {})
    boxes, refine = config.get("boxes", {}), config.get("refine", {})
    if saved.get("detector"):
        if refine.get("proposals") == "rpn":
            return ("plain detector" if refine.get("gate") == "none" else "detector + classifier gate"), False
        return "refined (Faster R-CNN)", False
    if boxes.get("calibration"):
        return "CAM-only, calibrated", True
    return f"CAM-only, threshold {boxes.get('threshold')}", True


def _box_settings(saved: dict, config: Config, n_classes: int) -> tuple[BoxRules, np.ndarray]:
    """The box settings the predictions were made with (localize.json: the config and any
    calibration), for the random-map control, and the decision threshold of each class (the
    probability above which a class got boxes)."""
    boxes = saved.get("config", {}).get("boxes", {})
    rules, _ = box_rules(from_dict(BoxConfig, boxes, "boxes.") if boxes else config.boxes)
    saved_thresholds = saved.get("decision_thresholds")
    if saved_thresholds:
        return rules, np.asarray(saved_thresholds, np.float64)
    return rules, class_thresholds(rules.default.min_prob, None, n_classes)


@dataclass
class Scored:
    """One submission scored against its truth: the metrics, and what their intervals need."""

    metrics: dict
    truth: GroundTruth
    voc_truth: pd.DataFrame  # the truth the VOC metric scored ("No finding" boxes included)
    detections: pd.DataFrame
    per_class: list[ClassAP]
    weak: pd.DataFrame | None  # the ChestX-ray8 table (model and control rows)
    probs: pd.DataFrame | None
    points: pd.Series | None  # pointing game per truth box
    curves: Path | None  # localize's box_curves.csv: each truth (image, class) pair's best-IoU curve
    rsna: np.ndarray | None = None  # each image's RSNA score (NaN: not scored), in RSNA's format


def score(pred: str | Path, gt: str | Path, fmt: str = "vinbig", config: Config = Config(),
          probs: str | Path | None = None, lenient: bool = False, control: bool = True,
          out: Path | None = None) -> Scored:
    """Every metric the inputs allow (see :func:`evaluate`), keeping what the bootstrap needs."""
    submission, found_probs, peaks, settings = _prediction_files(Path(pred))
    saved = json.loads(settings.read_text()) if settings else {}
    label, cam_boxes = describe(saved)
    if not cam_boxes:
        peaks = None  # the pointing game scores the classifier's maps, not a detector's boxes
    truth = read_ground_truth(gt, config)
    if saved.get("schema") not in (None, truth.schema.name):
        raise CxrcamError(f"{pred} holds {saved['schema']} predictions; {gt} is {truth.schema.name} truth: "
                          f"their classes differ, evaluate against the same dataset")
    report_invalid(truth.invalid, out)
    if fmt == "rsna" and truth.schema is not RSNA:
        raise CxrcamError(f"--format rsna needs RSNA ground truth; {gt} is {truth.schema.name}")
    dets, counts = _read_submission(submission, truth, fmt, lenient)
    if not saved:  # a bare submission file: nothing says which dataset's classes its ids are
        _check_class_ids(dets, truth, submission)
    _check_extent(dets, truth, submission)
    metrics = {"format": fmt, "ground_truth": str(Path(gt).resolve()), "submission_label": label, "cam_boxes": cam_boxes,
               **counts,
               "iou_thr": config.eval.iou_thr}
    voc_truth, per_class, rsna = _detection_metrics(truth, dets, fmt, config.eval.iou_thr, metrics)
    if truth.complete and not len(truth.boxes) and truth.schema.no_finding_id is not None:
        findings = int((dets["class_id"] != truth.schema.no_finding_id).sum())
        warnings.warn(f"{gt}: every truth image is normal, so mAP@{config.eval.iou_thr} is the \"No finding\" AP "
                      f"alone and findings mAP is undefined; the {findings} finding boxes predicted are "
                      f"false positives no figure here counts", stacklevel=2)
    prob_table = _read_probabilities(Path(probs) if probs else found_probs, truth.schema)
    rules, thresholds = _box_settings(saved, config, truth.schema.num_findings)
    weak, points = None, None
    if len(truth.boxes):
        if peaks is not None:
            peak_table = pd.read_csv(peaks, dtype={"image_id": str})
            points = _pointing(truth.boxes, peak_table)
            metrics["pointing_confusion"] = confusion_pointing(truth.boxes, peak_table)
        weak = _weak_metrics(truth, dets, voc_truth, points, rules if control and truth.sizes else None, thresholds,
                             prob_table, config.eval.iou_thr, metrics)
    pred_dir = Path(pred) if Path(pred).is_dir() else None
    curves = None
    if cam_boxes and pred_dir is not None and (pred_dir / "maxboxacc.csv").is_file():  # the maps' own figure
        metrics["maxboxacc"] = pd.read_csv(pred_dir / "maxboxacc.csv").to_dict(orient="records")
        curves = pred_dir / "box_curves.csv" if (pred_dir / "box_curves.csv").is_file() else None
    if prob_table is not None and truth.labels is not None:
        metrics.update(_classification(truth, prob_table, thresholds))
    return Scored(metrics, truth, voc_truth, dets, per_class, weak, prob_table, points, curves, rsna)


def evaluate(pred: str | Path, gt: str | Path, fmt: str = "vinbig", config: Config = Config(),
             probs: str | Path | None = None, lenient: bool = False, out: str | Path | None = None,
             control: bool = True, plots: bool = True, bootstrap: int = 0, seed: int = 0) -> dict:
    """All metrics that the inputs allow, as a dict; with ``out``, also metrics.json, metrics.md
    and (``plots``) the AP and PR-curve plots there. ``bootstrap``: that many resamples of the
    images give each headline figure a 95% interval (``ci``; :mod:`cxrcam.evaluation.bootstrap`)."""
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    scored = score(pred, gt, fmt, config, probs, lenient, control, out)
    metrics = scored.metrics
    if bootstrap:
        from cxrcam.evaluation.bootstrap import bootstrap as resample

        result = resample([bootstrap_inputs(scored)], len(scored.truth.image_ids), bootstrap, seed)
        metrics["ci"] = {name: f["ci"] for name, f in result["submissions"][0].items()}
        metrics["bootstrap"] = {k: result[k] for k in ("method", "level", "resamples", "seed", "unit")}
    metrics = _clean(metrics)
    if out is not None:
        _write(out, metrics, scored.weak, scored.per_class if plots else None, scored.truth.schema)
    return metrics


def bootstrap_inputs(scored: Scored):
    """What :mod:`cxrcam.evaluation.bootstrap` resamples for one scored submission, matched once."""
    from cxrcam.evaluation.bootstrap import Inputs, match_classes
    from cxrcam.evaluation.weak import box_overlaps

    truth, schema = scored.truth, scored.truth.schema
    index = pd.Index(truth.image_ids)
    classes = match_classes(scored.voc_truth, scored.detections, truth.image_ids, scored.metrics["iou_thr"])
    names = {c: schema.class_name(c) for c in classes}
    x = Inputs(classes, list(range(schema.num_findings)), names)
    if scored.probs is not None and truth.labels is not None:
        joined = pd.DataFrame({"image_id": truth.image_ids}).merge(truth.labels, on="image_id", how="left").merge(
            scored.probs, on="image_id", how="left")
        x.labels = joined[target_columns(schema)].to_numpy(np.float64)
        x.probs = joined[list(schema.findings)].to_numpy(np.float64)
    if len(truth.boxes):
        boxes = box_overlaps(truth.boxes, scored.detections)
        x.boxes = pd.DataFrame({"image": index.get_indexer(boxes["image_id"]), "best_iou": boxes["best_iou"],
                                "best_iobb": boxes["best_iobb"]})
        if scored.points is not None:
            x.boxes["pointing"] = scored.points.to_numpy(float)
    x.rsna = scored.rsna
    if scored.curves is not None:
        table = pd.read_csv(scored.curves, dtype={"image_id": str})
        table = table[(table["source"] == "model") & table["image_id"].isin(index)]
        x.curves = (index.get_indexer(table["image_id"]), table[CURVE_COLUMNS].to_numpy(np.float64))
    return x


def _read_submission(submission: Path, truth: GroundTruth, fmt: str, lenient: bool) -> tuple[pd.DataFrame, dict]:
    """The submission's detections of the truth's images, and the counts of what was left out."""
    schema, truth_ids = truth.schema, set(truth.image_ids)
    n_classes = schema.num_findings + (schema.no_finding_id is not None)
    dets, listed, skipped = parse_submission(submission, n_classes, truth_ids if truth.complete else None, lenient,
                                             "rsna" if fmt == "rsna" else "vinbig")
    ignored = int((~dets["image_id"].isin(truth_ids)).sum())
    dets = dets[dets["image_id"].isin(truth_ids)]
    unlisted = len(truth_ids - listed)
    if not listed:
        warnings.warn(f"{submission} has no rows: every image is scored as predicting nothing", stacklevel=3)
    elif unlisted:
        warnings.warn(f"{unlisted} of {len(truth.image_ids)} ground-truth images have no row in {submission}: "
                      f"scored as predicting nothing", stacklevel=3)
    # absolute: a report written from another folder links to it all the same
    return dets, {"submission": str(submission.resolve()), "dataset": schema.name, "images": len(truth.image_ids),
                  "truth_boxes": len(truth.boxes), "predictions": len(dets), "predictions_ignored": ignored,
                  "rows_skipped": skipped, "images_not_listed": unlisted, "truth_rows_invalid": len(truth.invalid),
                  "images_without_prediction": len(truth_ids - set(dets["image_id"]))}


# names that mean the same finding in two datasets' class lists (beside names they share)
SAME_FINDING = {"Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening",
                "Pulmonary fibrosis": "Fibrosis", "Nodule/Mass": "Nodule"}


def _check_class_ids(dets: pd.DataFrame, truth: GroundTruth, submission: Path) -> None:
    """A warning where a bare submission's class ids fit another dataset's class list better than the
    truth's (VinBigData ids scored against NIH's box list), or its 1 x 1 "No finding" rows use another id."""
    schema = truth.schema
    corner = (dets[BOX_COLUMNS].to_numpy() == [0, 0, 1, 1]).all(1)
    odd = dets.loc[corner & (dets["class_id"] != schema.no_finding_id), "class_id"]
    if len(odd) and odd.nunique() == 1 and len(odd) >= max(2, 0.5 * dets["image_id"].nunique()):
        warnings.warn(f"{submission}: {len(odd)} rows are \"0 0 1 1\" boxes of class {int(odd.iloc[0])}, the way "
                      f"another dataset writes \"No finding\"; {schema.name}'s is "
                      f"{schema.no_finding_id if schema.no_finding_id is not None else 'absent'}", stacklevel=3)
    found = set(zip(dets["image_id"], dets["class_id"].astype(int)))
    true = set(zip(truth.boxes["image_id"], truth.boxes["class_id"].astype(int)))
    own = len(found & true)
    for other in SCHEMAS.values():
        if other is schema or other.num_findings < 2:
            continue
        as_truth = {}
        for c, name in enumerate(other.findings):
            try:
                as_truth[c] = schema.class_id(SAME_FINDING.get(name, name))
            except KeyError:
                continue
        theirs = len({(i, as_truth[c]) for i, c in found if c in as_truth} & true)
        if theirs >= 5 and theirs > 2 * own:
            warnings.warn(f"{submission}: its class ids fit {other.name}'s class list better than {schema.name}'s "
                          f"({theirs} truth findings predicted when read as {other.name} classes, {own} as "
                          f"{schema.name}): was it made for {other.name}? Its boxes are scored as {schema.name} "
                          f"classes", stacklevel=3)


def _check_extent(dets: pd.DataFrame, truth: GroundTruth, submission: Path) -> None:
    """A warning for boxes reaching beyond twice their image's size (where sizes are known): another
    frame's coordinates (a cache's, or scaled twice), scored as they are."""
    if not truth.sizes or not len(dets):
        return
    hw = np.array([truth.sizes.get(i, (np.nan, np.nan)) for i in dets["image_id"]], np.float64)
    b = dets[BOX_COLUMNS].to_numpy(np.float64)
    far = (b[:, 0] < -hw[:, 1]) | (b[:, 1] < -hw[:, 0]) | (b[:, 2] > 2 * hw[:, 1]) | (b[:, 3] > 2 * hw[:, 0])
    if far.any():
        k = int(np.flatnonzero(far)[0])
        warnings.warn(f"{submission}: {int(far.sum())} of {len(dets)} boxes reach beyond twice their image's size "
                      f"(e.g. {dets['image_id'].iloc[k]}, {hw[k, 1]:g} x {hw[k, 0]:g} px: box "
                      f"{', '.join(f'{v:g}' for v in b[k])}): coordinates in another frame? They are scored as they "
                      f"are", stacklevel=3)


def _detection_metrics(truth: GroundTruth, dets: pd.DataFrame, fmt: str, iou_thr: float, metrics: dict
                       ) -> tuple[pd.DataFrame, list[ClassAP], np.ndarray | None]:
    """VOC mAP (with VinBigData's "No finding" where the truth is complete), COCO or RSNA into
    ``metrics``; returns the truth the VOC metric scored, its per-class results, and (RSNA) each
    image's RSNA score, which the bootstrap re-weights."""
    schema, voc_truth = truth.schema, truth.boxes
    if truth.complete and schema.no_finding_id is not None:
        voc_truth = with_no_finding(truth.boxes, truth.image_ids, schema.no_finding_id)
    metrics["map"], per_class = voc_map(voc_truth, dets, iou_thr)
    metrics["ap"] = {schema.class_name(r.class_id): r.ap for r in per_class}
    metrics["n_truth"] = {schema.class_name(r.class_id): r.n_truth for r in per_class}
    if fmt == "coco":
        findings = list(range(schema.num_findings))
        metrics["coco_ap"] = coco_ap(truth.boxes, dets, truth.image_ids, findings)
        metrics["coco_ap40"] = coco_ap(truth.boxes, dets, truth.image_ids, findings, iou_thrs=[0.4])
    rsna = None
    if fmt == "rsna":
        rsna = image_scores(truth.boxes, dets, list(truth.image_ids))
        metrics["rsna_score"], metrics["rsna_images_scored"] = summary(rsna)
    return voc_truth, per_class, rsna


def _read_probabilities(probs: Path | None, schema: Schema) -> pd.DataFrame | None:
    if probs is None:
        return None
    table = read_table(probs, dtype={"image_id": str})
    missing = [c for c in schema.findings if c not in table.columns]
    if missing:
        other = next((s.name for s in SCHEMAS.values() if s is not schema and set(s.findings) <= set(table.columns)),
                     None)
        if other:
            raise CxrcamError(f"{probs} holds {other} class probabilities; the ground truth is {schema.name}: "
                              f"evaluate against the same dataset")
        raise CxrcamError(f"{probs}: missing class column(s) {', '.join(missing)}")
    table = table[["image_id", *schema.findings]]
    values = table[list(schema.findings)].apply(pd.to_numeric, errors="coerce")
    bad = values.isna() | ~np.isfinite(values)
    if bad.to_numpy().any():  # text, blanks, NaN or inf: not a probability at all
        row, col = np.argwhere(bad.to_numpy())[0]
        raise CxrcamError(f"{probs} row {row + 2} ({table.iat[row, 0]}): {schema.findings[col]} is "
                          f"{table.iat[row, col + 1]!r}, not a probability ({int(bad.to_numpy().sum())} such value(s))")
    repeated = table["image_id"][table["image_id"].duplicated(keep=False)]
    if len(repeated):
        rows = ", ".join(str(r + 2) for r in np.flatnonzero(table["image_id"].to_numpy() == repeated.iloc[0]))
        raise CxrcamError(f"{probs} rows {rows}: image {repeated.iloc[0]!r} is listed more than once")
    outside = (values < 0) | (values > 1)
    if outside.to_numpy().any():
        row, col = np.argwhere(outside.to_numpy())[0]
        warnings.warn(f"{probs}: {int(outside.to_numpy().sum())} value(s) outside [0, 1] (row {row + 2}, "
                      f"{schema.findings[col]}: {values.iat[row, col]:g}): logits rather than probabilities? AUROC "
                      f"ranks them as they are; sensitivity and specificity use thresholds in [0, 1]", stacklevel=3)
    return table.assign(**{c: values[c] for c in schema.findings})


def _weak_metrics(truth: GroundTruth, dets: pd.DataFrame, voc_truth: pd.DataFrame, points: pd.Series | None,
                  rules: BoxRules | None, thresholds: np.ndarray, prob_table: pd.DataFrame | None, iou_thr: float,
                  metrics: dict) -> pd.DataFrame:
    """The ChestX-ray8 accuracies and pointing game, beside the random-map control (``rules``: the
    box settings the predictions were cut with; None: no control), and the control's mAP (boxes
    from random maps for the classes above their decision ``thresholds``)."""
    schema = truth.schema
    weak = accuracy_table(truth.boxes, dets, schema, points).assign(source="model")
    if rules is not None:
        metrics["control_threshold"] = rules.default.threshold
        metrics["control_calibration"] = rules.default.calibration or None
        ctrl = random_control(truth.boxes, truth.sizes, schema, rules).assign(source="random map")
        weak = pd.concat([weak, ctrl], ignore_index=True)
        if prob_table is not None:  # the same classifier's boxes cut from random maps: the mAP control
            random_dets = pd.concat([random_detections(prob_table, truth.sizes, rules, thresholds),
                                     dets[dets["class_id"] >= schema.num_findings]], ignore_index=True)
            metrics["control_map"], control_ap = voc_map(voc_truth, random_dets, iou_thr)
            metrics["control_ap"] = {schema.class_name(r.class_id): r.ap for r in control_ap}
    metrics["localization"] = weak.to_dict(orient="records")
    return weak


def _classification(truth: GroundTruth, prob_table: pd.DataFrame, thresholds: np.ndarray) -> dict:
    """AUROC per class, and sensitivity and specificity at the decision thresholds the predictions used."""
    from cxrcam.evaluation.classification import (  # scikit-learn: 1 s to import
        auroc_per_class, defined_mean, mean_auroc, sensitivity_specificity)

    schema = truth.schema
    joined = truth.labels.merge(prob_table, on="image_id")
    if len(joined) < len(truth.labels):
        warnings.warn(f"{len(truth.labels) - len(joined)} of {len(truth.labels)} ground-truth images have no "
                      f"probabilities" + ("; no AUROC (the probabilities are of other images)" if not len(joined)
                                          else ": AUROC over the rest"), stacklevel=3)
    labels, probs = joined[target_columns(schema)].to_numpy(), joined[list(schema.findings)].to_numpy()
    per = auroc_per_class(labels, probs)
    sens, spec = sensitivity_specificity(labels, probs, thresholds)
    return {"auroc": {c: float(v) for c, v in zip(schema.findings, per)}, "mean_auroc": mean_auroc(per),
            "decision_thresholds": {c: float(t) for c, t in zip(schema.findings, thresholds)},
            "sensitivity": {c: float(v) for c, v in zip(schema.findings, sens)},
            "specificity": {c: float(v) for c, v in zip(schema.findings, spec)},
            "mean_sensitivity": defined_mean(sens), "mean_specificity": defined_mean(spec)}  # NaN -> null in JSON


def _write(out: Path, metrics: dict, weak: pd.DataFrame | None, per_class: list[ClassAP] | None,
           schema: Schema) -> None:
    """metrics.json, metrics.md, localization.csv and (``per_class`` given) the plots."""
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "metrics.md", markdown(metrics))
    if weak is not None:
        write_csv(out / "localization.csv", weak)
    if per_class is not None:
        _plots(per_class, schema, out)


def headline(m: dict) -> dict[str, tuple[float | None, float | None]]:
    """The headline figures of one evaluate's metrics, each as (model, random-map control); None
    where not measured (the control needs a localize folder, the CAM figures its maps)."""
    overall = {row["source"]: row for row in m.get("localization", []) if row["class"] == "all"}
    wsol = {row["source"]: row for row in m.get("maxboxacc", []) if row["class"] == "all"}
    model, control = overall.get("model", {}), overall.get("random map", {})
    row = {"findings mAP@0.4": (findings_map(m["ap"]), findings_map(m.get("control_ap", {})) if "control_ap" in m
                                else None),
           "MaxBoxAccV2": (wsol.get("model", {}).get("maxboxacc_v2"), wsol.get("random map", {}).get("maxboxacc_v2"))}
    for key, label in (("iou@0.1", "T(IoU)=0.1"), ("iou@0.5", "T(IoU)=0.5"), ("iobb@0.5", "T(IoBB)=0.5"),
                       ("pointing", "pointing game")):
        row[label] = (model.get(key), control.get(key))
    confusion = m.get("pointing_confusion") or {}
    row["pointing, own class (multi-finding images)"] = (confusion.get("own"), None)
    row["pointing, another finding's box"] = (confusion.get("confused"), None)
    return row


def findings_map(ap: dict[str, float | None]) -> float | None:
    """mAP over the 14 findings alone: "No finding" is scored from the same p_normal in every
    submission, so it only dilutes a comparison of boxes."""
    values = [v for name, v in ap.items() if name != "No finding" and v is not None]
    return sum(values) / len(values) if values else None


def _clean(value):
    """NaN -> None, numpy scalars -> Python: valid JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(metrics: dict) -> str:
    """The per-class table (AP, truth boxes, AUROC) and the headline numbers."""
    counts = [f"{metrics[k]} {label}" for k, label in (("predictions_ignored", "predictions of unknown images ignored"),
                                                        ("rows_skipped", "malformed rows skipped"),
                                                        ("images_not_listed", "images missing from the submission"))
              if metrics.get(k)]
    lines = [f"**{metrics['dataset']}**: {metrics['images']} images, {metrics['truth_boxes']} truth boxes, "
             f"{metrics['predictions']} predictions" + "".join(f"; {c}" for c in counts), ""]
    head = [f"mAP@{metrics['iou_thr']} (VOC 2010) = {_fmt(metrics['map'])}"]
    for key, label in [("control_map", "random-map control mAP"), ("coco_ap", "COCO AP@[.5:.95]"),
                       ("coco_ap40", "COCO AP@.4"), ("rsna_score", "RSNA score"), ("mean_auroc", "mean AUROC")]:
        if key in metrics:
            head.append(f"{label} = {_fmt(metrics[key])}")
    lines += ["; ".join(head)]
    ci = metrics.get("ci")
    if ci:
        b = metrics["bootstrap"]
        lines += ["", f"{int(b['level'] * 100)}% {b['method']} intervals ({b['resamples']} bootstrap resamples of the "
                      f"images, seed {b['seed']}): " + "; ".join(
                          f"{k} [{_fmt(v[0])}, {_fmt(v[1])}]" for k, v in ci.items() if not k.startswith("AP "))]
    lines += ["", "| class | truth boxes | AP | AUROC |", "|---|---|---|---|"]
    auroc = metrics.get("auroc", {})
    for name, ap in metrics["ap"].items():
        interval = ci.get(f"AP {name}") if ci else None
        ap_text = _fmt(ap) + (f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "")
        lines.append(f"| {name} | {metrics['n_truth'][name]} | {ap_text} | {_fmt(auroc.get(name))} |")
    if "localization" in metrics:
        cols = {"iobb@0.1": "T(IoBB)=0.1", "iobb@0.5": "T(IoBB)=0.5", "iou@0.1": "T(IoU)=0.1", "iou@0.5": "T(IoU)=0.5",
                "pointing": "pointing"}
        lines += ["", "Weak localisation (ChestX-ray8 accuracy: share of truth boxes hit)", "",
                  "| source | class | boxes | " + " | ".join(cols.values()) + " |", "|---|---|---|" + "---|" * len(cols)]
        for row in metrics["localization"]:
            lines.append(f"| {row['source']} | {row['class']} | {row['n_boxes']} | "
                         + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    confusion = metrics.get("pointing_confusion")
    if confusion and confusion.get("pairs"):
        lines += ["", f"Class-confusion pointing game, {confusion['pairs']} truth (image, class) pairs on images with "
                      f"findings of several classes: the map's peak in a box of its own class {_fmt(confusion['own'])}; "
                      f"in another finding's box and none of its own {_fmt(confusion['confused'])}"]
    if "maxboxacc" in metrics:
        lines += ["", "MaxBoxAccV2 (Choe et al. 2020: best box accuracy over thresholds, mean over IoU 0.3/0.5/0.7)", "",
                  "| source | class | image-classes | MaxBoxAccV2 | best threshold at IoU 0.5 |", "|---|---|---|---|---|"]
        for row in metrics["maxboxacc"]:
            lines.append(f"| {row['source']} | {row['class']} | {row['n_pairs']} | {_fmt(row['maxboxacc_v2'])} | "
                         f"{_fmt(row['best_t@0.5'])} |")
    return "\n".join(lines) + "\n"


def _plots(per_class: list[ClassAP], schema: Schema, out: Path) -> None:
    """ap_per_class.png (bar chart) and pr_curves.png (precision-recall of each class with a hit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in per_class if r.n_truth > 0]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(scored) + 1.2))
    ax.barh([schema.class_name(r.class_id) for r in scored], [r.ap for r in scored],
            color=[np.array(schema.colour(r.class_id)) / 255 for r in scored])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP")
    ax.set_title(f"AP per class (mAP {np.mean([r.ap for r in scored]) if scored else float('nan'):.3f})")
    fig.tight_layout()  # not bbox_inches="tight": measuring every artist's extent doubles the plotting time
    save_figure(fig, out / "ap_per_class.png")

    curves = [r for r in scored if r.ap > 0]  # a class with no hit has no curve to see: named, not drawn
    (out / "pr_curves.png").unlink(missing_ok=True)
    if not curves:
        return
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    missing = [schema.class_name(r.class_id) for r in scored if r.ap == 0]
    if missing:
        fig.suptitle("no box hit (AP 0): " + ", ".join(missing), fontsize=9, wrap=True)
    for ax, r in zip(axes.flat, curves):
        precision = np.maximum.accumulate(r.precision[::-1])[::-1] if len(r.precision) else r.precision
        corner = np.r_[True, np.diff(precision) != 0] | np.r_[np.diff(r.recall) != 0, True]  # the envelope's corners
        ax.step(r.recall[corner], precision[corner], where="post", color=np.array(schema.colour(r.class_id)) / 255)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{schema.class_name(r.class_id)} AP {r.ap:.2f}",
               xlabel="recall", ylabel="precision")
    fig.tight_layout()
    save_figure(fig, out / "pr_curves.png")


__all__ = ["evaluate", "read_ground_truth", "GroundTruth", "markdown", "headline", "findings_map"]
