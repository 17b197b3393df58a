"""Calibration, the WSOL metrics (MaxBoxAccV2 and its random-map control), per-class box rules,
and output_stride."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cxrcam
from cxrcam.boxes import THRESHOLD_MODES, components, maps_to_boxes, pairwise_iou
from cxrcam.calibrate.sweep import SCALES, SWEEP
from cxrcam.calibration import box_rules
from cxrcam.cam import CheckpointMaps, create_cam
from cxrcam.config import BoxConfig, load_config
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.weak import (CAM_THRESHOLDS, CURVE_COLUMNS, IOU_DELTAS, best_ious, box_accuracy,
                                    maxboxacc_table)
from cxrcam.files import load_checkpoint
from cxrcam.models import create_classifier, load_classifier
from cxrcam.schemas import VINBIG


def smooth_map(rng: np.random.Generator, side: int = 64) -> np.ndarray:
    cam = cv2.resize(rng.random((6, 6)).astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return (cam - cam.min()) / np.ptp(cam)


def reference_best_ious(cam: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Choe et al.'s multi-contour box evaluation, written from the paper with OpenCV contours:
    at each threshold, a bounding box per contour, the best IoU with any truth box."""
    out = []
    for t in CAM_THRESHOLDS:
        contours, _ = cv2.findContours((cam >= t).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in map(cv2.boundingRect, contours)], float)
        out.append(pairwise_iou(boxes, truth).max() if len(boxes) else 0.0)
    return np.array(out)


def test_maxboxacc_v2_against_the_definition():
    rng = np.random.default_rng(0)
    rows, curves = [], []
    for n in range(12):
        cam = smooth_map(rng)
        x, y = rng.integers(0, 40, 2)
        truth = np.array([[x, y, x + rng.integers(8, 24), y + rng.integers(8, 24)]], float)
        ours = best_ious(cam, truth)
        assert ours == pytest.approx(reference_best_ious(cam, truth))
        curves.append(ours)
        rows.append((f"img{n}", n % 2, "model", *ours))
    curves = np.array(curves)
    table = maxboxacc_table(pd.DataFrame(rows, columns=["image_id", "class_id", "source", *CURVE_COLUMNS]), VINBIG)
    overall = table[table["class"] == "all"].iloc[0]
    # BoxAcc(t, d) = share of pairs with best IoU >= d; MaxBoxAccV2 = mean over d of max over t
    expected = np.mean([max((curves[:, k] >= d).mean() for k in range(len(CAM_THRESHOLDS))) for d in IOU_DELTAS])
    assert overall["maxboxacc_v2"] == pytest.approx(expected) and overall["n_pairs"] == 12
    assert 0 < expected < 1
    assert box_accuracy(curves).shape == (3, len(CAM_THRESHOLDS))
    per_class = table[table["class"] != "all"]
    assert sorted(per_class["n_pairs"]) == [6, 6]


def test_contrast_and_every_statistic_of_a_component():
    cam = np.zeros((40, 40), np.float32)
    cam[10:20, 10:20] = 0.8
    cam[14, 14] = 1.0
    (row,) = components(cam, [0.5])
    t, x0, y0, x1, y1, area, mean, peak, contrast = row
    assert [x0, y0, x1, y1] == [10, 10, 20, 20] and area == pytest.approx(100 / 1600)
    assert mean == pytest.approx((99 * 0.8 + 1.0) / 100) and peak == pytest.approx(1.0)
    # the ring: the box grown by half its side (5 px) each way, minus the box: all zeros here
    assert contrast == pytest.approx(mean)
    cam[5:25, 5:25] += 0.3  # a brighter surrounding lowers the contrast by its mean
    cam[10:20, 10:20] -= 0.3
    (row,) = components(cam, [0.5])
    assert row[8] == pytest.approx(mean - 0.3, abs=1e-5)


def test_components_at_many_thresholds_match_a_loop_per_component():
    """components() shares one pass per threshold among its components; the definition: for
    each threshold and each 8-connected component, its own extent, mean and maximum."""
    rng = np.random.default_rng(3)
    for side in (48, 64):
        cam = smooth_map(rng, side)  # 6 x 6 bumps: several components at high thresholds
        rows = components(cam, SWEEP)
        expected = []
        for k, t in enumerate(SWEEP):
            n, labels = cv2.connectedComponents((cam >= t).astype(np.uint8), connectivity=8)
            for i in range(1, n):
                ys, xs = np.nonzero(labels == i)
                inside = cam[labels == i].astype(np.float64)
                expected.append([k, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, len(xs) / cam.size,
                                 inside.mean(), inside.max()])
        expected = np.array(expected)
        assert (np.bincount(expected[:, 0].astype(int)) > 1).any()  # the map has thresholds with several
        ours = rows[np.lexsort(rows[:, 4::-1].T), :8]  # by threshold, then box
        assert ours == pytest.approx(expected[np.lexsort(expected[:, 4::-1].T)])


def test_the_sweep_writes_the_boxes_localize_writes():
    """calibrate's vectorised class_boxes against localize's per-image score_components,
    for every score and a top_k and NMS that act on images with several components."""
    from cxrcam.boxes import score_components
    from cxrcam.calibrate.sweep import ClassMaps, Pair, class_boxes

    rng = np.random.default_rng(4)
    pairs = [Pair(f"img{n}", 0, float(rng.random()), n != 3, components(smooth_map(rng), SWEEP, mode=mode), (64, 64))
             for n, mode in zip(range(8), [*THRESHOLD_MODES] * 2)]
    maps = ClassMaps.of(pairs)
    for t in (0.3, 0.65, 0.9):
        for config in (BoxConfig(score="mean", top_k=2, nms_iou=0.1), BoxConfig(score="contrast", min_area=0.01),
                       BoxConfig(score="none", top_k=1), BoxConfig(score="max", top_k=0, nms_iou=1.0),
                       BoxConfig(scale=0.8), BoxConfig(scale=1.3, top_k=2)):
            ids, boxes, scores = class_boxes(maps, t, config)
            want = [(p.image_id, b, s) for p in pairs if p.predicted
                    for b, s in zip(*score_components(p.rows[p.rows[:, 0] == SWEEP.index(t)], p.prob, config,
                                                      p.size))]
            assert list(ids) == [w[0] for w in want]
            assert boxes.tolist() == [w[1].tolist() for w in want] and scores.tolist() == [w[2] for w in want]
    assert "img3" not in set(class_boxes(maps, 0.3, BoxConfig())[0])  # not predicted: no boxes


def test_per_class_rules_from_a_calibration(tmp_path):
    cam = np.zeros((1, 2, 32, 32), np.float32)
    cam[0, :, 4:12, 4:12] = 0.5
    cam[0, :, 6:10, 6:10] = 1.0
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"classes": {"Cardiomegaly": {"class_id": 3, "threshold": 0.9}}, "image_ids": ["a"]}))
    rules, calibration = box_rules(BoxConfig(threshold=0.4, calibration=str(path)))
    assert rules(3).threshold == 0.9 and rules(5).threshold == 0.4 and calibration.image_ids == ["a"]
    ((boxes, classes, _),) = maps_to_boxes(cam, [3, 5], [[3, 5]], None, rules)
    assert dict(zip(classes.tolist(), boxes.tolist())) == {3: [6, 6, 10, 10], 5: [4, 4, 12, 12]}
    box_rules(BoxConfig(calibration=str(path)), VINBIG)  # Cardiomegaly is VinBigData's class 3
    # another dataset's calibration (NIH's class 3 is Infiltration; or a file that says "nih") is refused
    for other in ({"classes": {"Infiltration": {"class_id": 3, "threshold": 0.9}}},
                  {"schema": "nih", "classes": {"Cardiomegaly": {"class_id": 3, "threshold": 0.9}}}):
        path.write_text(json.dumps(other))
        with pytest.raises(CxrcamError, match="calibrates .* classes .*the classifier predicts vinbig classes"):
            box_rules(BoxConfig(calibration=str(path)), VINBIG)
    path.write_text("{}")
    with pytest.raises(CxrcamError, match="not a calibration.json"):
        box_rules(BoxConfig(calibration=str(path)))


def subset_of(data: Path, n: int, out: Path) -> Path:
    """The first ``n`` images of a VinBigData-layout folder (train.csv + train/), as released."""
    table = pd.read_csv(data / "train.csv")
    keep = sorted(set(table["image_id"]))[:n]
    (out / "train").mkdir(parents=True)
    table[table["image_id"].isin(keep)].to_csv(out / "train.csv", index=False)
    for image_id in keep:
        (out / "train" / f"{image_id}.dicom").symlink_to(data / "train" / f"{image_id}.dicom")
    return out


def test_calibrate_then_localize_reproduces_its_ap(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    data = subset_of(cache.parent / "data", 48, tmp_path / "data")  # a released folder, no cache
    cal = tmp_path / "calibration.json"
    weak_model = ["cam.workers=0", "boxes.min_prob=0.1", "eval.iou_thr=0.1"]  # 2 x 2 maps: box more, count looser hits
    default_fold = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(cal), *weak_model)
    assert default_fold.returncode == 1 and "is a dataset, not a `cxrcam prepare` cache" in default_fold.stderr
    assert "--fold all" in default_fold.stderr and not cal.exists()  # not every image read as fold 0
    result = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(cal), "--fold", "all",
                    "--min-boxes", "3", "--maps", "none", "--modes", "peak", *weak_model)  # the map search: its own test
    assert result.returncode == 0, result.stderr
    assert "MaxBoxAccV2" in result.stdout
    saved = json.loads(cal.read_text())
    assert saved["images"] == 48 and len(saved["image_ids"]) == 48
    assert cal.with_suffix(".png").stat().st_size > 0 and (tmp_path / "calibration_box_accuracy.png").is_file()
    classes = saved["classes"]
    for e in classes.values():
        assert e["threshold"] in SWEEP
        assert e["ap_default"] == pytest.approx(e["curve"][SWEEP.index(0.65)])
        if e["source"] == "class":  # its own best threshold; the default unless another beats it
            assert e["ap"] == pytest.approx(max(e["curve"])) and e["ap"] >= e["ap_default"]
            assert e["ap"] > e["ap_default"] or e["threshold"] == 0.65
    # localize with the file: the same boxes, so evaluate's AP per class is the calibration's
    loc = tmp_path / "loc"
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(loc), "--threshold",
                    str(cal), "--no-images", "boxes.filter_low=0", "boxes.filter_high=1", *weak_model)
    assert result.returncode == 0, result.stderr
    assert "calibrated on 48 of these 48 images" in result.stderr  # scoring the calibration set is flagged
    result = cxrcam("evaluate", "--pred", str(loc), "--gt", str(data), "--out", str(loc / "eval"),
                    "eval.iou_thr=0.1")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((loc / "eval" / "metrics.json").read_text())
    for name, e in classes.items():
        assert metrics["ap"][name] == pytest.approx(e["ap"], abs=0.02), name
    # the 2-class filter was scored on these boxes: without it, evaluate's mAP ("No finding" counted)
    two_class = saved["filter"]
    assert two_class["off"] == pytest.approx(metrics["map"], abs=0.02)
    assert [0.0, 1.0, pytest.approx(two_class["off"])] in two_class["grid"]
    kept = (two_class["low"], two_class["high"]) != (0.0, 1.0)
    assert kept == all(h > o for h, o in zip(two_class["heldout_halves"], two_class["off_halves"]))
    assert any(e["ap"] > 0 for e in classes.values())
    assert metrics["control_calibration"] == str(cal) and "control_map" in metrics
    wsol = {(r["source"], r["class"]): r for r in metrics["maxboxacc"]}
    assert wsol[("model", "all")]["n_pairs"] == wsol[("random map", "all")]["n_pairs"] > 0
    for row in metrics["maxboxacc"]:
        assert row["maxboxacc_v2"] == pytest.approx(np.mean([row[f"boxacc@{d}"] for d in IOU_DELTAS]))


def test_calibrate_at_batch_size_one_with_a_strict_operating_point(vinbig_model, tmp_path):
    """The validation fold at batch size 1 under boxes.min_prob=0.99: its normal images need no
    class map (a batch of none); the calibration is the one batch 16 gives."""
    cache, ckpt = vinbig_model
    assert load_checkpoint(ckpt)["precision"] == "bf16"  # calibrate from a bf16-trained classifier
    saved = {}
    for batch in ("1", "16"):
        out = tmp_path / f"b{batch}.json"
        result = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(out),
                        "--batch-size", batch, "--maps", "none", "boxes.min_prob=0.99", "cam.workers=0")
        assert result.returncode == 0, result.stderr
        saved[batch] = json.loads(out.read_text())
    assert saved["1"]["images"] == saved["16"]["images"] > 0
    rounded = {b: json.loads(json.dumps({k: s[k] for k in ("classes", "maxboxacc", "mean_ap")}),
                             parse_float=lambda v: round(float(v), 5)) for b, s in saved.items()}
    assert rounded["1"] == rounded["16"]
    assert any(r["maxboxacc_v2"] > 0 for r in rounded["1"]["maxboxacc"])  # the truth classes' maps were made


def test_threshold_option_errors(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    for value, message in (("1.5", "not in [0, 1]"), ("nofile.json", "neither a number")):
        result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path),
                        "--threshold", value)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / "o"),
                    "--threshold", str(bad), "--no-images")
    assert result.returncode == 1 and "not a calibration.json" in result.stderr and "Traceback" not in result.stderr
    result = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "c.json"))
    assert result.returncode == 1 and "Error:" in result.stderr and "Traceback" not in result.stderr


def test_output_stride_dilates_and_travels_with_the_checkpoint(vinbig_model, tmp_path):
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_classifier("resnet10t", 4, output_stride=16).eval()
    x = torch.rand(2, 1, 128, 128)
    assert model.backbone.forward_features(model.normalize(x)).shape[-1] == 8  # 128 / 16
    ours = create_cam(model, "gradcam++")(x, [0, 2]).cams.numpy()
    engine = GradCAMPlusPlus(model=model, target_layers=[model.backbone.layer4])
    theirs = np.stack([engine(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 2) for c in (0, 2)], 1)
    assert np.abs(ours - theirs).max() < 1e-4
    with pytest.raises(CxrcamError, match="densenet121 cannot dilate.*output_stride=32"):
        create_classifier("densenet121", 4, output_stride=8)
    # the checkpoint records the stride; localize's and the detector's loaders honour it
    ckpt = load_checkpoint(vinbig_model[1])
    ckpt["output_stride"] = 8
    path = tmp_path / "os8.pt"
    torch.save(ckpt, path)
    loaded, _ = load_classifier(path)
    assert loaded.backbone.forward_features(loaded.normalize(torch.rand(1, 1, 64, 64))).shape[-1] == 8
    from cxrcam.detection import create_detector

    assert create_detector("resnet10t", 14, 64, init=path).output_stride == 8


def test_few_boxes_keep_the_configured_threshold():
    """A class too poorly boxed for its own threshold takes the one best for the well-boxed
    classes, but only where it beats the configured threshold: a flat mean curve (the demo's
    120 validation images: one class found at every threshold, the rest never) keeps 0.65,
    not the low edge of the plateau."""
    from cxrcam.calibrate.run import _choose
    from cxrcam.config import Config

    flat = [1.0 if t <= 0.8 else 0.0 for t in SWEEP]
    peak = [1.0 if 0.3 <= t <= 0.4 else 0.2 for t in SWEEP]
    for curve, expected in ((flat, 0.65), (peak, 0.35)):  # a real peak: the middle of its plateau
        classes = {"boxed": {"n_truth": 9, "curve": curve, "threshold": 0.65, "ap": 1.0},
                   "few": {"n_truth": 2, "curve": [0.0] * len(SWEEP), "threshold": 0.65, "ap": 0.0}}
        _choose(classes, 5, "threshold", Config(), "fixed")
        assert classes["few"]["threshold"] == pytest.approx(expected) and classes["few"]["source"] == "all classes"


def test_a_threshold_or_map_stands_only_where_its_gain_holds_on_both_halves():
    """Chosen on one half and scored on the other, both ways: a class whose better threshold shows on
    one half only keeps the configured one; a candidate map that beats the configured map on one
    half only is not taken."""
    from cxrcam.calibrate.run import _choose, _gains_on_both_halves, _held_out
    from cxrcam.config import Config

    def curve(peak_at: float | None, low: float = 0.2) -> list[float]:
        return [1.0 if peak_at is not None and abs(t - peak_at) < 0.05 else low for t in SWEEP]

    def entries(halves_b):
        classes = {"steady": {"n_truth": 9, "curve": curve(0.3), "halves": [curve(0.3), curve(0.3)]},
                   "one half": {"n_truth": 9, "curve": curve(0.3), "halves": [curve(0.3), halves_b]}}
        for e in classes.values():  # as sweep_class leaves them: the best threshold on all images
            e.update(threshold=0.3, ap=1.0, ap_default=0.2)
        _held_out(classes, 5, 0.65)
        return classes

    classes = entries(curve(None))  # the second half sees nothing better than 0.65
    _choose(classes, 5, "threshold", Config(), "fixed", confirm=True)
    assert classes["steady"]["threshold"] == pytest.approx(0.3)
    assert classes["one half"]["threshold"] == 0.65 and classes["one half"]["source"].startswith("configured")
    configured = {"classes": {"c": {"default_halves": [0.5, 0.5]}}}
    both = {"classes": {"c": {"heldout_halves": [0.6, 0.55]}}}
    one = {"classes": {"c": {"heldout_halves": [0.9, 0.45]}}}  # a higher mean, from one half alone
    assert _gains_on_both_halves(both, configured) and not _gains_on_both_halves(one, configured)


def test_a_class_takes_a_finer_map_only_where_its_own_gain_holds_on_both_halves():
    """calibrate's per-class map: a candidate of the same method and mode replaces the chosen map for
    a well-boxed class whose held-out AP beats the chosen map's (calibrated and configured
    thresholds) on each half; not for a gain on one half, a few boxes, or another method."""
    from cxrcam.calibrate.run import _class_maps

    model = create_classifier("resnet10t", 14)

    def candidate(method: str, layer: str, classes: dict) -> dict:
        return {"method": method, "target_layer": layer, "threshold_mode": "fixed", "classes": {
            name: {"n_truth": n, "heldout_halves": h, "default_halves": [0.1, 0.1], "heldout_ap": float(np.mean(h))}
            for name, (n, h) in classes.items()}}

    best = candidate("layercam", "layer3", {"small": (9, [0.2, 0.3]), "large": (9, [0.2, 0.3]),
                                            "rare": (2, [0.2, 0.3])})
    finer = candidate("layercam", "layer2,layer3", {"small": (9, [0.25, 0.35]), "large": (9, [0.5, 0.25]),
                                                    "rare": (2, [0.9, 0.9])})
    other = candidate("gradcam++", "layer2,layer3", {"large": (9, [0.9, 0.9])})
    same = candidate("layercam", "backbone.layer3", {"large": (9, [0.9, 0.9])})  # best's own map, spelt otherwise
    assert {k: m["target_layer"] for k, m in _class_maps([best, finer, other, same], best, 5, model).items()} == {
        "small": "layer2,layer3"}


def test_calibrate_tries_maps_records_the_evidence_and_localize_uses_the_choice(vinbig_model, tmp_path):
    """Each candidate map's held-out AP and MaxBoxAccV2 (beside its control) are recorded with the
    choice and why; localize, refine and the pseudo-boxes cut the maps the calibration chose, and a
    config asking for others is named in a warning."""

    cache, ckpt = vinbig_model
    cal = tmp_path / "cal.json"
    result = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(cal),
                    "--maps", "layercam@layer3", "--modes", "otsu", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    saved = json.loads(cal.read_text())
    assert [(m["method"], m["target_layer"], m["threshold_mode"]) for m in saved["maps"]] == [
        (method, layer, mode) for method, layer in (("gradcam++", ""), ("layercam", "layer3")) for mode in ("fixed", "otsu")]
    assert saved["cam"]["threshold_mode"] in THRESHOLD_MODES and "otsu" in result.stdout
    for e in saved["classes"].values():  # the chosen mode, or the configured setting where a class gained nothing
        assert e["threshold_mode"] in {saved["cam"]["threshold_mode"], "fixed"} and e["scale"] in SCALES
    for m in saved["maps"]:
        assert m["maxboxacc"] >= 0 and m["control"] >= 0 and "heldout_ap" in m and "heldout_ap_default" in m
    assert (saved["cam"]["method"], saved["cam"]["target_layer"]) in {("gradcam++", ""), ("layercam", "layer3")}
    assert saved["cam"]["why"] and saved["schema"] == "vinbig" and "layercam@layer3" in result.stdout
    saved["cam"] = {"method": "layercam", "target_layer": "layer3", "why": "set by the test"}  # whichever won
    cal.write_text(json.dumps(saved))
    maps = CheckpointMaps(ckpt, load_config(None, [f"boxes.calibration={cal}"]))
    assert (maps.cam.method, maps.cam.target_name) == ("layercam", "backbone.layer3")  # what pseudo-boxes and refine build
    # a class on a finer map: one pass at layer2,layer3; class 0 fuses both, the others layer3 alone
    saved = {**saved, "cam": {"method": "layercam", "target_layer": "backbone.layer2,backbone.layer3",
                              "class_layers": {str(c): "layer2,layer3" if c == 0 else "layer3" for c in range(14)}}}
    (tmp_path / "mixed.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="chose layercam"):
        mixed = CheckpointMaps(ckpt, load_config(None, [f"boxes.calibration={tmp_path / 'mixed.json'}"]))
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    fine, coarse = (create_cam(mixed.model, "layercam", layer)(x, [0, 1]).cams for layer in ("layer2,layer3", "layer3"))
    assert torch.allclose(mixed.cam(x, [0, 1]).cams, torch.stack([fine[:, 0], coarse[:, 1]], 1), atol=1e-5)
    loc = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / "loc"),
                 "--threshold", str(cal), "--no-images", "cam.workers=0", "cam.method=gradcam")
    assert loc.returncode == 0, loc.stderr
    assert json.loads((tmp_path / "loc" / "localize.json").read_text())["cam"] == {
        "method": "layercam", "target_layer": "backbone.layer3"}
    assert "chose layercam@layer3 maps" in loc.stderr and "cam.method=gradcam" in loc.stderr


def test_a_box_scale_is_chosen_where_it_holds_on_both_halves():
    """Truth boxes 0.6 x the map's components on every image: AP@0.4 is 1 from scale 0.6 to 0.9 and
    0 at 1, so calibrate keeps 0.9 (of the best, the nearest the configured 1); where the truth is
    the components' own size, the configured 1 stays."""
    from cxrcam.calibrate.run import _choose_scales
    from cxrcam.calibrate.sweep import Pair
    from cxrcam.config import Config

    rows = components(np.pad(np.ones((40, 40), np.float32), 30), SWEEP)  # one 40 px box at every threshold
    pairs = [Pair(f"img{n}", 0, 0.9, True, rows.copy(), (100, 100)) for n in range(24)]
    for factor, expected in ((0.6, 0.9), (1.0, 1.0)):
        half = 20 * factor
        truth = pd.DataFrame({"image_id": [p.image_id for p in pairs], "class_id": 0, "x_min": 50 - half,
                              "y_min": 50 - half, "x_max": 50 + half, "y_max": 50 + half})
        classes = {"c": {"class_id": 0, "n_truth": 24, "threshold": 0.5, "score": "mean", "min_area": 0.001,
                         "threshold_mode": "fixed", "ap": 0.0}}
        _choose_scales(classes, pairs, truth, Config(), 5)
        assert classes["c"]["scale"] == pytest.approx(expected)
        assert classes["c"]["ap"] == pytest.approx(1.0 if factor == 0.6 else 0.0)
