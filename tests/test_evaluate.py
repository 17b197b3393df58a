"""`cxrcam evaluate`: VOC 2010 mAP by hand-worked cases and against pycocotools, COCO numbers,
the RSNA definition, ChestX-ray8 accuracies, ground-truth formats, CLI outputs and bad input."""
from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import cxrcam, shared
from cxrcam.config import load_config
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.coco import coco_ap
from cxrcam.evaluation.detection import voc_ap, voc_map, with_no_finding
from cxrcam.evaluation.evaluate import evaluate
from cxrcam.evaluation.rsna import image_score, rsna_score
from cxrcam.evaluation.weak import accuracy_table, random_control
from cxrcam.data.submission import submission_table
from cxrcam.schemas import VINBIG


def boxes(rows, score=False):
    cols = DETECTION_COLUMNS if score else ["image_id", "class_id", *BOX_COLUMNS]
    return pd.DataFrame(rows, columns=cols)


def shifted(dx):
    """A 10 x 10 prediction shifted right by dx against the truth [0, 0, 10, 10]."""
    return boxes([("a", 0, 1.0, dx, 0, 10 + dx, 10)], score=True)


TRUTH = boxes([("a", 0, 0, 0, 10, 10)])


def test_perfect_predictions_score_one():
    truth = boxes([("a", 0, 0, 0, 10, 10), ("a", 3, 5, 5, 50, 60), ("b", 3, 1, 1, 2, 2)])
    dets = truth.assign(score=[0.3, 0.9, 0.5])[DETECTION_COLUMNS]
    score, per_class = voc_map(truth, dets)
    assert score == 1.0 and [r.ap for r in per_class] == [1.0, 1.0]


def test_iou_must_be_strictly_above_the_threshold():
    # IoU of a shift dx: (10 - dx) / (10 + dx). dx = 30/7 gives IoU 0.4 exactly.
    assert voc_map(TRUTH, shifted(4.2))[0] == 1.0  # IoU 0.4085
    assert voc_map(TRUTH, shifted(4.35))[0] == 0.0  # IoU 0.3937
    assert voc_map(TRUTH, shifted(30 / 7))[0] == 0.0  # exactly 0.4: not a match
    assert voc_map(TRUTH, shifted(30 / 7), iou_thr=0.39)[0] == 1.0


def test_duplicates_are_false_positives():
    truth = boxes([("a", 0, 0, 0, 10, 10), ("b", 0, 0, 0, 10, 10)])
    dets = boxes([("a", 0, 0.9, 0, 0, 10, 10), ("a", 0, 0.8, 0, 0, 10, 10), ("b", 0, 0.7, 0, 0, 10, 10)], score=True)
    # TP, FP (duplicate), TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3
    assert voc_map(truth, dets)[0] == pytest.approx(0.5 + 1 / 3)
    # a duplicate ranked below every true positive costs nothing under the envelope
    dets.loc[1, "score"] = 0.1
    assert voc_map(truth, dets)[0] == pytest.approx(1.0)


def test_empty_predictions_and_images_without_truth():
    assert voc_map(TRUTH, boxes([], score=True))[0] == 0.0
    # a confident prediction on an image without truth is a false positive ranked first
    dets = boxes([("z", 0, 0.9, 0, 0, 10, 10), ("a", 0, 0.5, 0, 0, 10, 10)], score=True)
    assert voc_map(TRUTH, dets)[0] == pytest.approx(0.5)
    # a class predicted but absent from the truth is not part of the mean
    extra = pd.concat([shifted(0), boxes([("a", 5, 0.9, 0, 0, 1, 1)], score=True)])
    score, per_class = voc_map(TRUTH, extra)
    assert score == 1.0 and np.isnan([r.ap for r in per_class if r.class_id == 5][0])


def test_no_finding_through_its_unit_box():
    truth = with_no_finding(boxes([("a", 3, 0, 0, 10, 10)]), ["a", "b", "c"], 14)
    assert sorted(truth.loc[truth["class_id"] == 14, "image_id"]) == ["b", "c"]
    table = submission_table(["a", "b", "c"], boxes([("a", 3, 0.9, 0, 0, 10, 10)], score=True),
                             pd.Series({"a": 0.2, "b": 0.9, "c": 0.6}))
    dets = []
    for r in table.itertuples():
        t = r.PredictionString.split()
        dets += [(r.image_id, int(t[k]), float(t[k + 1]), *map(float, t[k + 2:k + 6])) for k in range(0, len(t), 6)]
    score, per_class = voc_map(truth, boxes(dets, score=True))
    assert score == 1.0 and {r.class_id for r in per_class} == {3, 14}


def test_voc_ap_by_the_definition():
    # one truth box found at rank 2 of 2: precision 1/2 at recall 1
    assert voc_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5])) == 0.5
    # the envelope: precision at recall r is the best precision at any recall >= r
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 1 / 3)


def random_scene(seed, n_images=40, n_classes=3):
    rng = np.random.default_rng(seed)
    truth, dets = [], []
    for i in range(n_images):
        for c in range(n_classes):
            for _ in range(rng.integers(0, 3)):
                x, y = rng.uniform(0, 400, 2)
                w, h = rng.uniform(20, 120, 2)
                truth.append((f"i{i}", c, x, y, x + w, y + h))
                for _ in range(rng.integers(0, 3)):  # noisy copies: some hit, some miss, duplicates
                    j = rng.normal(0, 0.25, 4) * [w, h, w, h]
                    dets.append((f"i{i}", c, rng.uniform(), x + j[0], y + j[1], x + w + abs(j[2]), y + h + abs(j[3])))
            for _ in range(rng.integers(0, 2)):  # false positives anywhere
                x, y = rng.uniform(0, 400, 2)
                dets.append((f"i{i}", c, rng.uniform(), x, y, x + 50, y + 50))
    return boxes(truth), boxes(dets, score=True), [f"i{i}" for i in range(n_images)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_map_agrees_with_pycocotools(seed):
    """pycocotools interpolates precision at 101 recall points and matches at IoU >= t: on a
    scene with hundreds of boxes and no IoU exactly at 0.4 the two APs agree closely."""
    truth, dets, ids = random_scene(seed)
    ours, per_class = voc_map(truth, dets, 0.4)
    for r in per_class:
        theirs = coco_ap(truth, dets, ids, [r.class_id], iou_thrs=[0.4], max_dets=1000)
        assert r.ap == pytest.approx(theirs, abs=0.015)
    assert 0.2 < ours < 0.95  # a scene that tests something


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_matching_is_the_definitions_loop(seed):
    """match_detections and box_overlaps join with numpy; the loops they replace, written from the
    definition, give the same flags and overlaps (ties included: boxes repeated exactly)."""
    from cxrcam.boxes import pairwise_iobb, pairwise_iou
    from cxrcam.evaluation.detection import match_detections, truth_by_image
    from cxrcam.evaluation.weak import box_overlaps

    truth, dets, _ = random_scene(seed)
    dets = pd.concat([dets, dets.iloc[::7]], ignore_index=True)  # exact duplicates: equal IoUs
    truth = pd.concat([truth, truth.iloc[::9]], ignore_index=True)  # a box twice: a tie between truth boxes
    for c in range(3):
        t, d = truth[truth["class_id"] == c], dets[dets["class_id"] == c]
        d = d.iloc[np.argsort(-d["score"].to_numpy(), kind="stable")]
        by_image = truth_by_image(t)
        used = {k: np.zeros(len(v), bool) for k, v in by_image.items()}
        expected = np.zeros(len(d), bool)
        for n, (image_id, box) in enumerate(zip(d["image_id"], d[BOX_COLUMNS].to_numpy())):
            if image_id in by_image:
                iou = pairwise_iou(box, by_image[image_id])[0]
                j = int(np.argmax(iou))
                if iou[j] > 0.4 and not used[image_id][j]:
                    expected[n] = used[image_id][j] = True
        got = match_detections(by_image, d["image_id"].to_numpy(), d[BOX_COLUMNS].to_numpy(), 0.4)
        assert np.array_equal(got, expected) and 0 < expected.sum() < len(d)
    scored = box_overlaps(truth, dets)
    for row in scored.itertuples():
        same = dets[(dets["image_id"] == row.image_id) & (dets["class_id"] == row.class_id)][BOX_COLUMNS].to_numpy()
        box = [row.x_min, row.y_min, row.x_max, row.y_max]
        assert row.best_iou == (pairwise_iou(box, same).max() if len(same) else 0.0)
        assert row.best_iobb == (pairwise_iobb(box, same).max() if len(same) else 0.0)


def test_coco_numbers_are_pycocotools_on_xywh(tmp_path):
    """Our COCO path against a hand-written pycocotools call with boxes in [x, y, w, h]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth, dets, ids = random_scene(3, n_images=20)
    ours = coco_ap(truth, dets, ids, [0, 1, 2])
    image_index = {i: k for k, i in enumerate(ids)}
    gt_json = {"images": [{"id": k} for k in range(len(ids))], "categories": [{"id": c} for c in range(3)],
               "annotations": [{"id": n + 1, "image_id": image_index[r.image_id], "category_id": r.class_id,
                                "bbox": [r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min],
                                "area": (r.x_max - r.x_min) * (r.y_max - r.y_min), "iscrowd": 0}
                               for n, r in enumerate(truth.itertuples())]}
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    gt = COCO(str(tmp_path / "gt.json"))
    dt = gt.loadRes([{"image_id": image_index[r.image_id], "category_id": r.class_id, "score": r.score,
                      "bbox": [r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min]} for r in dets.itertuples()])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours == pytest.approx(ev.stats[0], abs=1e-9)


def test_a_true_iou_of_039_is_a_miss():
    """The community notebook's corners-as-xywh mistake scores this pair as IoU 0.61."""
    truth = boxes([("a", 0, 100, 100, 200, 200)])
    dx = 100 * (1 - 0.39) / (1 + 0.39)  # true IoU 0.39
    det = boxes([("a", 0, 1.0, 100 + dx, 100, 200 + dx, 200)], score=True)
    assert voc_map(truth, det)[0] == 0.0
    assert coco_ap(truth, det, ["a"], [0], iou_thrs=[0.4]) == 0.0


def test_rsna_score_by_its_definition():
    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)
    # one prediction at IoU 0.62 with the first box, one matching nothing
    dx = 10 * (1 - 0.62) / 1.62
    pred = np.array([[dx, 0, 10 + dx, 10], [100, 100, 110, 110]])
    # thresholds 0.40 .. 0.60 (5 of 8): TP 1, FP 1, FN 1 -> 1/3; 0.65 .. 0.75: TP 0 -> 0
    assert image_score(truth, pred, np.array([0.9, 0.8])) == pytest.approx(5 / 3 / 8)
    assert image_score(np.zeros((0, 4)), pred, np.ones(2)) == 0.0
    assert image_score(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0)) is None
    assert image_score(truth, truth, np.ones(2)) == 1.0
    truth_df = boxes([("p1", 0, *truth[0]), ("p1", 0, *truth[1])])
    dets = boxes([("p1", 0, 0.9, *truth[0]), ("p1", 0, 0.8, *truth[1]), ("p2", 0, 0.5, 0, 0, 5, 5)], score=True)
    assert rsna_score(truth_df, dets, ["p1", "p2", "p3"]) == (0.5, 2)  # p3: no truth, no prediction: skipped


def test_chestxray8_accuracies():
    truth = boxes([("a", 0, 0, 0, 10, 10), ("b", 0, 0, 0, 10, 10)])
    dets = boxes([("a", 0, 0.9, 0, 0, 5, 5)], score=True)  # inside the truth: IoBB 1, IoU 0.25
    table = accuracy_table(truth, dets, VINBIG, pd.Series([1.0, 0.0])).set_index("class")
    row = table.loc["Aortic enlargement"]
    assert row["iobb@0.9"] == 0.5 and row["iou@0.2"] == 0.5 and row["iou@0.3"] == 0.0 and row["pointing"] == 0.5
    assert table.loc["all", "n_boxes"] == 2
    sizes = {"a": (100.0, 100.0), "b": (100.0, 100.0)}
    first = random_control(truth, sizes, VINBIG, repeats=3, seed=1)
    assert first.equals(random_control(truth, sizes, VINBIG, repeats=3, seed=1))  # seeded
    values = first.drop(columns=["class", "n_boxes"]).to_numpy()
    assert ((values >= 0) & (values <= 1)).all()


def test_evaluate_a_localize_folder(vinbig_model, tmp_path):
    from cxrcam.evaluation.classification import auroc_per_class
    from cxrcam.localize import localize

    cache, ckpt = vinbig_model
    localize(ckpt, cache, tmp_path / "loc", load_config(overrides=["cam.workers=0", "boxes.min_prob=0.05",
                                                                    "boxes.threshold=0.5"]),
             pictures=False, progress=False)
    result = cxrcam("evaluate", "--pred", str(tmp_path / "loc"), "--gt", str(cache), "--json", str(tmp_path / "ev" / "m.json"),
                    "--out", str(tmp_path / "ev"), "--format", "coco")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "ev" / "m.json").read_text())
    assert metrics["images"] == 160 and metrics["predictions"] > 0 and "No finding" in metrics["ap"]
    assert 0 <= metrics["map"] <= 1 and 0 <= metrics["coco_ap"] <= metrics["coco_ap40"] + 1e-9
    # AUROC from probabilities.csv equals scikit-learn on the cache labels
    manifest = pd.read_csv(cache / "manifest.csv", dtype={"image_id": str})
    probs = pd.read_csv(tmp_path / "loc" / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    expected = auroc_per_class(manifest[[f"y_{i}" for i in range(14)]].to_numpy(),
                               probs.loc[manifest["image_id"]].to_numpy())
    assert [metrics["auroc"][c] for c in VINBIG.findings] == pytest.approx(list(expected), nan_ok=True)
    # the pointing game from localize's peaks.csv agrees with bb_results.csv's peak_in_box, and the
    # random-map control cuts its maps at localize's threshold (0.5), not evaluate's default (0.65)
    sources = {r["source"] for r in metrics["localization"]}
    assert sources == {"model", "random map"}
    bb = pd.read_csv(tmp_path / "loc" / "bb_results.csv", dtype={"image_id": str}).dropna(subset=["gt_x_min"])
    pointing = next(r for r in metrics["localization"] if r["source"] == "model" and r["class"] == "all")["pointing"]
    assert pointing == pytest.approx(bb["peak_in_box"].astype(bool).mean())
    assert metrics["control_threshold"] == 0.5
    assert "| No finding |" in result.stdout and (tmp_path / "ev" / "metrics.md").read_text() in result.stdout
    for name in ["ap_per_class.png", "pr_curves.png"]:
        image = cv2.imread(str(tmp_path / "ev" / name))
        assert image is not None and image.shape[0] > 100 and image.std() > 5
    # VinBigData predictions against NIH truth: the dataset mismatch is named, not a missing column
    nih = shared("nih")
    for args in (["--pred", str(tmp_path / "loc")],
                 ["--pred", str(tmp_path / "loc" / "submission.csv"), "--probs", str(tmp_path / "loc" / "probabilities.csv")]):
        wrong = cxrcam("evaluate", *args, "--gt", str(nih))
        assert wrong.returncode == 1 and re.search(r"holds vinbig .*(is nih truth|ground truth is nih)", wrong.stderr)


def test_ground_truth_formats_on_real_tables(vinbig_table, tmp_path):
    # VinBigData train.csv (three readers per image): WBF-fused truth predicted exactly -> mAP 1
    ids = vinbig_table["image_id"].drop_duplicates().iloc[:300]
    table = vinbig_table[vinbig_table["image_id"].isin(ids)]
    table.to_csv(tmp_path / "train.csv", index=False)
    from cxrcam.data.readers import vinbig_from_table

    fused = vinbig_from_table(table).boxes
    normal = pd.Series(1.0, index=sorted(set(ids) - set(fused["image_id"])))
    submission_table(list(ids), fused.assign(score=1.0), normal).to_csv(tmp_path / "sub.csv", index=False)
    assert evaluate(tmp_path / "sub.csv", tmp_path / "train.csv", control=False)["map"] == pytest.approx(1.0)
    # the same predictions against every reader's own boxes are no longer perfect
    readers = evaluate(tmp_path / "sub.csv", tmp_path / "train.csv", config=load_config(overrides=["fusion.method=reader"]),
                       control=False)
    assert readers["map"] < 0.95 and readers["truth_boxes"] > len(fused)

    # NIH BBox_List_2017.csv: its 12 boxes predicted exactly; images without boxes are ignored
    nih = shared("nih", "BBox_List_2017.csv")
    raw = pd.read_csv(nih)
    xywh = raw.iloc[:, 2:6].to_numpy(float)
    from cxrcam.schemas import NIH

    dets = pd.DataFrame({"image_id": raw.iloc[:, 0], "class_id": [NIH.class_id(n) for n in raw.iloc[:, 1]],
                         "score": 1.0, "x_min": xywh[:, 0], "y_min": xywh[:, 1],
                         "x_max": xywh[:, 0] + xywh[:, 2], "y_max": xywh[:, 1] + xywh[:, 3]})
    submission_table([*raw.iloc[:, 0].unique(), "00000001_000.png"], dets,
                     pd.Series({"00000001_000.png": 0.5})).to_csv(tmp_path / "nih.csv", index=False)
    m = evaluate(tmp_path / "nih.csv", nih, out=tmp_path / "nih_out")
    assert m["map"] == 1.0 and m["truth_boxes"] == 12 and m["predictions_ignored"] == 1
    row = next(r for r in m["localization"] if r["class"] == "all" and r["source"] == "model")
    assert row["iou@0.9"] == 1.0 and row["n_boxes"] == 12
    control = next(r for r in m["localization"] if r["class"] == "all" and r["source"] == "random map")
    assert control["iou@0.5"] < 0.5  # random maps do not find the boxes

    # RSNA labels with an RSNA-format submission (confidence x y w h)
    labels = pd.read_csv(shared("rsna", "stage_2_train_labels.csv"))
    pos = labels[labels["Target"] == 1]
    strings = pos.groupby("patientId").apply(
        lambda g: " ".join(f"0.9 {r.x} {r.y} {r.width} {r.height}" for r in g.itertuples()), include_groups=False)
    pd.DataFrame({"patientId": labels["patientId"].unique(),
                  "PredictionString": [strings.get(p, "") for p in labels["patientId"].unique()]}
                 ).to_csv(tmp_path / "rsna.csv", index=False)
    m = evaluate(tmp_path / "rsna.csv", shared("rsna", "stage_2_train_labels.csv"), fmt="rsna", control=False)
    assert m["rsna_score"] == 1.0 and m["map"] == 1.0


def test_bad_submissions(vinbig_model, tmp_path):
    cache, _ = vinbig_model
    ids = pd.read_csv(cache / "manifest.csv", dtype={"image_id": str})["image_id"]
    rows = ["14 0.5 0 0 1 1"] * len(ids)
    rows[3] = "3 0.5 10 10 5 20"  # x_max < x_min
    pd.DataFrame({"image_id": ids, "PredictionString": rows}).to_csv(tmp_path / "bad.csv", index=False)
    strict = cxrcam("evaluate", "--pred", str(tmp_path / "bad.csv"), "--gt", str(cache), "--no-control")
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1
    assert f"row 5 ({ids[3]}): x_max < x_min" in strict.stderr
    lenient = cxrcam("evaluate", "--pred", str(tmp_path / "bad.csv"), "--gt", str(cache), "--lenient", "--no-control",
                     "--json", str(tmp_path / "lenient.json"))
    assert lenient.returncode == 0 and "warning:" in lenient.stderr and "row skipped" in lenient.stderr
    assert json.loads((tmp_path / "lenient.json").read_text())["rows_skipped"] == 1  # counted, not 0
    # a header-only or partial submission scores, with a warning counting the images it leaves out
    pd.DataFrame({"image_id": ids[:5], "PredictionString": rows[:3] + rows[4:6]}).to_csv(tmp_path / "part.csv",
                                                                                       index=False)
    (tmp_path / "header.csv").write_text("image_id,PredictionString\n")
    for name, unlisted, said in (("part.csv", len(ids) - 5, f"{len(ids) - 5} of {len(ids)} ground-truth images have "
                                  "no row"), ("header.csv", len(ids), "has no rows")):
        result = cxrcam("evaluate", "--pred", str(tmp_path / name), "--gt", str(cache), "--no-control",
                        "--json", str(tmp_path / "m.json"))
        assert result.returncode == 0 and said in result.stderr
        assert json.loads((tmp_path / "m.json").read_text())["images_not_listed"] == unlisted
    # empty files, as submission or truth: one line, no traceback
    (tmp_path / "empty.csv").write_bytes(b"")
    for pred, gt in ((tmp_path / "empty.csv", cache), (tmp_path / "header.csv", tmp_path / "empty.csv")):
        result = cxrcam("evaluate", "--pred", str(pred), "--gt", str(gt))
        assert result.returncode == 1 and "empty.csv: empty file" in result.stderr and "Traceback" not in result.stderr
    pd.DataFrame({"image_id": ["nope"], "PredictionString": [""]}).to_csv(tmp_path / "unknown.csv", index=False)
    unknown = cxrcam("evaluate", "--pred", str(tmp_path / "unknown.csv"), "--gt", str(cache))
    assert unknown.returncode == 1 and "image id not in the ground truth" in unknown.stderr
    missing = cxrcam("evaluate", "--pred", str(tmp_path / "none.csv"), "--gt", str(cache))
    assert missing.returncode == 2 and "none.csv' does not exist" in missing.stderr  # before anything is imported


def test_pr_curves_only_for_classes_with_a_hit(tmp_path):
    """No empty plots: a class whose boxes all missed (AP 0) is named in the title, not drawn."""
    from cxrcam.evaluation.detection import ClassAP
    from cxrcam.evaluation.evaluate import _plots

    hit = ClassAP(3, 0.5, 2, 2, np.array([1.0, 0.5]), np.array([0.5, 0.5]))
    missed = [ClassAP(c, 0.0, 3, 4, np.zeros(4), np.zeros(4)) for c in (0, 1, 2)]
    _plots([hit, *missed], VINBIG, tmp_path)
    one = cv2.imread(str(tmp_path / "pr_curves.png"))
    _plots([hit, ClassAP(5, 0.25, 2, 2, np.array([0.5]), np.array([0.5])), *missed], VINBIG, tmp_path)
    two = cv2.imread(str(tmp_path / "pr_curves.png"))
    assert one.shape[1] < 0.7 * two.shape[1]  # one panel, then two: no panel for the three missed classes
    _plots(missed, VINBIG, tmp_path)
    assert not (tmp_path / "pr_curves.png").exists()  # nothing to draw: no file (an old one removed)


def test_invalid_truth_rows_do_not_score(vinbig_table, tmp_path):
    """A zero-area truth box no prediction can hit would cap AP below 1: it is dropped, counted
    in one warning and listed; the other boxes predicted exactly score 1."""
    ids = vinbig_table["image_id"].drop_duplicates().iloc[:40]
    table = vinbig_table[vinbig_table["image_id"].isin(ids)].reset_index(drop=True)
    finding = table.index[table["class_id"] < 14]
    table.loc[finding[0], "x_max"] = table.loc[finding[0], "x_min"]  # zero area
    table.loc[finding[1], "class_name"] = "Not a class"
    table.to_csv(tmp_path / "train.csv", index=False)
    from cxrcam.data.readers import vinbig_from_table

    fused = vinbig_from_table(table.drop(index=finding[:2])).boxes  # the truth as it should be read
    normal = pd.Series(1.0, index=sorted(set(ids) - set(fused["image_id"])))
    submission_table(list(ids), fused.assign(score=1.0), normal).to_csv(tmp_path / "sub.csv", index=False)
    with pytest.warns(UserWarning, match=r"train.csv: 2 invalid truth row\(s\): 1 class_name disagrees with class_id "
                                         r"\(dropped\), 1 zero area \(dropped\); listed in"):
        m = evaluate(tmp_path / "sub.csv", tmp_path / "train.csv", control=False, out=tmp_path / "eval")
    assert m["map"] == pytest.approx(1.0) and m["truth_rows_invalid"] == 2
    listed = pd.read_csv(tmp_path / "eval" / "invalid_rows.csv")
    assert listed["row"].tolist() == sorted(int(i) + 2 for i in finding[:2])


def test_operating_points_and_sensitivity_specificity_against_their_definitions():
    """F1's threshold is the best of every cut a brute-force search tries; a class with too few
    positives has none; sensitivity and specificity count the calls at p > threshold."""
    from cxrcam.evaluation.classification import operating_points, sensitivity_specificity

    rng = np.random.default_rng(0)
    labels = (rng.random((300, 3)) < [0.1, 0.3, 0.005]).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((300, 3)) * 0.7, 0, 1)
    ops = operating_points(labels, probs)
    assert np.isnan(ops[2]) and np.isfinite(ops[:2]).all()  # 1-2 positives: no operating point of its own

    def f1(y, p, t):
        tp, fp, fn = ((p > t) & y).sum(), ((p > t) & ~y).sum(), (~(p > t) & y).sum()
        return 2 * tp / max(2 * tp + fp + fn, 1)

    for c in range(2):
        y, p = labels[:, c] > 0, probs[:, c]
        best = max(f1(y, p, t) for t in np.r_[p - 1e-9, p])
        assert f1(y, p, ops[c]) == pytest.approx(best)
    sens, spec = sensitivity_specificity(labels, probs, np.nan_to_num(ops, nan=0.5))
    for c in range(3):
        y, called = labels[:, c] > 0, probs[:, c] > np.nan_to_num(ops, nan=0.5)[c]
        assert sens[c] == pytest.approx((called & y).sum() / y.sum())
        assert spec[c] == pytest.approx((~called & ~y).sum() / (~y).sum())


def test_random_control_maps_in_chunks_are_the_same_maps():
    """The control draws its maps a chunk at a time (flat memory on a 3,000-image test set): the
    very maps one draw of all of them gives."""
    import torch

    from cxrcam.evaluation.weak import _chunked_maps, random_maps

    whole = random_maps(600, torch.Generator().manual_seed(3), grid=4, side=16)
    chunked = np.stack(list(_chunked_maps(600, torch.Generator().manual_seed(3), 4, 16, chunk=256)))
    assert chunked.shape == whole.shape and np.array_equal(chunked, whole)


def test_a_row_that_reads_as_both_layouts_is_refused(tmp_path):
    """--format rsna on a file whose header does not say RSNA (image_id): a row of 30 numbers reads
    as 5 VinBigData groups and as 6 RSNA groups; refused, naming the row. With RSNA's own header
    (patientId) the same row is read as RSNA without question."""
    from cxrcam.data.submission import parse_submission

    row = " ".join(["0 0.9 10 10 50 50"] * 5)  # 30 tokens: class 0 (RSNA's one class), or confidence 0 ...
    pd.DataFrame({"image_id": ["p1"], "PredictionString": [row]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(CxrcamError, match=r"row 2 \(p1\): reads both as VinBigData groups .* and as RSNA"):
        parse_submission(tmp_path / "a.csv", num_classes=1, fmt="rsna")
    assert len(parse_submission(tmp_path / "a.csv", num_classes=15)[0]) == 5  # its header: VinBigData
    pd.DataFrame({"patientId": ["p1"], "PredictionString": [row]}).to_csv(tmp_path / "b.csv", index=False)
    found = parse_submission(tmp_path / "b.csv", num_classes=1)[0]
    assert len(found) == 6 and found["score"].iloc[0] == 0.0  # RSNA groups: confidence x y width height


def test_a_truth_table_beside_its_images_is_clipped_as_prepare_clips(synth_vinbig, tmp_path):
    """A finding boxed far past its image's right edge: `evaluate --gt train.csv` next to the images
    clips it to the width the DICOM header gives, as prepare does, so the clipped box scores 1."""
    import pydicom

    from cxrcam.data.readers import read_dataset

    table = pd.read_csv(synth_vinbig / "train.csv")
    k = table.index[table["class_id"] < 14][0]
    image, cls = table.at[k, "image_id"], table.at[k, "class_id"]
    width = pydicom.dcmread(synth_vinbig / "train" / f"{image}.dicom", stop_before_pixels=True).Columns
    rows = (table["image_id"] == image) & (table["class_id"] == cls)
    table.loc[rows, "x_max"] = width + 4 * (table.loc[rows, "x_max"] - table.loc[rows, "x_min"])
    (tmp_path / "data").mkdir()
    table.to_csv(tmp_path / "data" / "train.csv", index=False)
    (tmp_path / "data" / "train").symlink_to(synth_vinbig / "train")
    truth = read_dataset("vinbig", tmp_path / "data")  # what prepare reads: clipped to the header's width
    assert truth.boxes.loc[truth.boxes["image_id"] == image, "x_max"].max() <= width
    ids = list(truth.images["image_id"])
    normal = pd.Series(1.0, index=sorted(set(ids) - set(truth.boxes["image_id"])))
    submission_table(ids, truth.boxes.assign(score=1.0), normal).to_csv(tmp_path / "sub.csv", index=False)
    with pytest.warns(UserWarning, match="past the image"):
        m = evaluate(tmp_path / "sub.csv", tmp_path / "data" / "train.csv", control=False)
    assert m["map"] == pytest.approx(1.0) and m["truth_rows_invalid"] >= 1


def test_the_literature_table_and_the_class_confusion_pointing_game():
    """literature_table: per class, the share of truth boxes whose best same-class prediction beats
    T(IoU) / T(IoBB), and their mean over classes; the class-confusion pointing game counts, on
    images with two or more truth classes, peaks in their own class's box and peaks that fell in
    another finding's box instead."""
    from cxrcam.evaluation.weak import confusion_pointing, literature_table

    box = lambda *v: dict(zip(BOX_COLUMNS, v))  # noqa: E731
    truth = pd.DataFrame([{"image_id": "a", "class_id": 0, **box(0, 0, 10, 10)},
                          {"image_id": "a", "class_id": 3, **box(50, 50, 70, 70)},
                          {"image_id": "b", "class_id": 0, **box(0, 0, 10, 10)},
                          {"image_id": "c", "class_id": 3, **box(0, 0, 20, 20)}])
    dets = pd.DataFrame([{"image_id": "a", "class_id": 0, "score": 0.9, **box(0, 0, 10, 5)},  # IoU .5, IoBB 1
                         {"image_id": "b", "class_id": 0, "score": 0.9, **box(0, 0, 40, 40)},  # IoU 1/16, IoBB 1/16
                         {"image_id": "c", "class_id": 3, "score": 0.9, **box(0, 0, 20, 20)}])  # exact
    table = literature_table(truth, dets, VINBIG).set_index("class")
    aortic, cardio = table.loc["Aortic enlargement"], table.loc["Cardiomegaly"]
    assert (aortic["T(IoU)=0.1"], aortic["T(IoU)=0.4"], aortic["T(IoU)=0.5"]) == (0.5, 0.5, 0.0)  # > T, as ChestX-ray8
    assert (aortic["T(IoBB)=0.1"], aortic["T(IoBB)=0.9"]) == (0.5, 0.5)
    assert (cardio["T(IoU)=0.7"], cardio["T(IoBB)=0.9"], cardio["n_boxes"]) == (0.5, 0.5, 2)  # a's missed, c's exact
    assert table.loc["mean", "T(IoU)=0.4"] == pytest.approx(0.5) and table.loc["mean", "n_boxes"] == 4
    peaks = pd.DataFrame({"image_id": ["a", "a", "b", "c"], "class_id": [0, 3, 0, 3],
                          "peak_x": [5, 5, 5, 5], "peak_y": [5, 5, 5, 5]})  # class 3's map peaks in class 0's box
    assert confusion_pointing(truth, peaks) == {"pairs": 2, "own": 0.5, "confused": 0.5}  # image a only
    assert np.isnan(confusion_pointing(truth[truth["image_id"] != "a"], peaks)["own"])
