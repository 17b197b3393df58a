"""`cxrcam localize`: boxes in original pixels, pictures where the boxes are, bb_results,
submission.csv, real NIH images and DICOMs without `prepare`, unreadable files, torchrun."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cxrcam, shared
from cxrcam.boxes import BoxRules, pairwise_iou, scale_boxes
from cxrcam.config import load_config
from cxrcam.data.cache import open_cache
from cxrcam.data.tables import BOX_COLUMNS
from cxrcam.errors import CxrcamError
from cxrcam.localize import localize
from cxrcam.outputs.pictures import KINDS, _label_best, _Labels, picture_paths
from cxrcam.schemas import VINBIG
from cxrcam.data.submission import read_submission
from cxrcam.train.classifier import predict

GT = ["gt_x_min", "gt_y_min", "gt_x_max", "gt_y_max"]
PRED = ["pred_x_min", "pred_y_min", "pred_x_max", "pred_y_max"]


def config(*overrides: str):
    return load_config(overrides=["cam.workers=0", "cam.batch_size=8", *overrides])


def yellow(bgr: np.ndarray) -> np.ndarray:
    return (bgr[..., 0] < 60) & (bgr[..., 1] > 230) & (bgr[..., 2] > 230)


def edge_share(bgr: np.ndarray, box) -> float:
    """Share of a drawn rectangle's outline pixels that are yellow (truth colour)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1, y1 = min(x1, bgr.shape[1]) - 1, min(y1, bgr.shape[0]) - 1
    mask = yellow(bgr)
    edge = np.concatenate([mask[y0, x0:x1 + 1], mask[y1, x0:x1 + 1], mask[y0:y1 + 1, x0], mask[y0:y1 + 1, x1]])
    return float(edge.mean())


@pytest.fixture(scope="module")
def cache_run(vinbig_model, tmp_path_factory):
    cache, ckpt = vinbig_model
    out = tmp_path_factory.mktemp("loc")
    summary = localize(ckpt, cache, out, config("boxes.min_prob=0.05"), progress=False)
    return cache, ckpt, out, summary


def test_submission_boxes_are_original_pixels(cache_run):
    cache_dir, ckpt, out, summary = cache_run
    cache = open_cache(cache_dir)
    sub = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert sorted(sub["image_id"]) == sorted(cache.images["image_id"])  # every image once
    dets = read_submission(out / "submission.csv", image_ids=set(cache.images["image_id"]))
    findings = dets[dets["class_id"] != 14].merge(cache.images[["image_id", "width", "height", "scale_x", "scale_y"]])
    assert len(findings) == summary.boxes > 0
    assert (findings["x_max"] <= findings["width"] + 1e-6).all() and (findings["y_max"] <= findings["height"] + 1e-6).all()
    # components are whole pixels of the 64-px input: mapped back by 1/scale, forward again gives integers
    frame = scale_boxes(findings[BOX_COLUMNS].to_numpy(), findings["scale_x"].to_numpy(), findings["scale_y"].to_numpy())
    assert np.abs(frame - np.round(frame)).max() < 1e-3
    # 14 p_normal 0 0 1 1 with p_normal = 1 - max p, from probabilities.csv
    probs = pd.read_csv(out / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    normal = dets[dets["class_id"] == 14].set_index("image_id")
    assert (normal[BOX_COLUMNS].to_numpy() == [0, 0, 1, 1]).all()
    assert np.allclose(normal["score"], 1 - probs.loc[normal.index].max(axis=1), atol=1e-5)
    # box scores never exceed the class probability (score = p x mean map value <= p)
    p = probs.to_numpy()[probs.index.get_indexer(findings["image_id"]), findings["class_id"].to_numpy()]
    assert (findings["score"].to_numpy() <= p + 1e-5).all()


def test_probabilities_are_the_classifiers(cache_run):
    cache_dir, ckpt, out, _ = cache_run
    ours = pd.read_csv(out / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    reference = predict(ckpt, cache_dir, workers=0, progress=False).set_index("image_id")
    assert np.allclose(ours.loc[reference.index].to_numpy(), reference.to_numpy(), atol=1e-5)


def test_bb_results_has_every_truth_box(cache_run):
    cache_dir, _, out, summary = cache_run
    cache = open_cache(cache_dir)
    results = pd.read_csv(out / "bb_results.csv", dtype={"image_id": str})
    truth = results[results["gt_x_min"].notna()]
    assert len(truth) == len(cache.boxes) == summary.truth_boxes
    key = ["image_id", "class_id", *BOX_COLUMNS]
    assert sorted(map(tuple, truth.rename(columns=dict(zip(GT, BOX_COLUMNS)))[key].round(6).to_numpy().tolist())) == \
        sorted(map(tuple, cache.boxes[key].round(6).to_numpy().tolist()))
    matched = truth[truth["pred_x_min"].notna()]
    assert len(matched) > 0
    for row in matched.itertuples():  # iou and hit are recomputable from the row
        iou = pairwise_iou(np.array([[row.gt_x_min, row.gt_y_min, row.gt_x_max, row.gt_y_max]]),
                           np.array([[row.pred_x_min, row.pred_y_min, row.pred_x_max, row.pred_y_max]]))[0, 0]
        assert row.iou == pytest.approx(iou) and row.hit == (iou > 0.4)
    # the pointing game has a peak for each truth box, inside the image
    assert truth["peak_x"].notna().all() and truth["peak_in_box"].notna().all()
    # predictions without truth are rows too
    assert results["gt_x_min"].isna().any()
    assert summary.mean_iou == pytest.approx(truth["iou"].mean())


def test_pictures_are_drawn_where_the_boxes_are(cache_run):
    cache_dir, _, out, _ = cache_run
    cache = open_cache(cache_dir)
    pngs = [p for p in out.glob("*.png") if p.name.startswith(tuple(f"{k}_" for k in KINDS))]
    assert len(pngs) == 4 * len(cache.images)  # four pictures per image
    checked = 0
    for image_id, boxes in cache.boxes.groupby("image_id"):
        paths = picture_paths(out, image_id)
        original = cv2.imread(str(paths["original"]), cv2.IMREAD_GRAYSCALE)
        small = cache.load(image_id)  # the model's input, drawn at the 512 px picture size
        assert max(original.shape) == 512 and original.shape[0] * small.shape[1] == original.shape[1] * small.shape[0]
        assert np.array_equal(original, cv2.resize(small, original.shape[::-1], interpolation=cv2.INTER_CUBIC))
        factor = original.shape[1] / small.shape[1]
        gt = cv2.imread(str(paths["gtimage"]))
        for box in boxes[["cx_min", "cy_min", "cx_max", "cy_max"]].to_numpy() * factor:
            assert edge_share(gt, box) > 0.9
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            if len(boxes) == 1:  # outline only (several truth boxes may cross each other)
                assert not yellow(gt[y0 + 4:y1 - 4, x0 + 4:x1 - 4]).any()
            checked += 1
        assert not yellow(cv2.imread(str(paths["original"]))).any()
        mask = cv2.imread(str(paths["mask"]), cv2.IMREAD_GRAYSCALE)
        assert np.all((mask == 0) | (mask == original)) and (mask == 0).any()
        assert np.abs(cv2.imread(str(paths["pred"])).astype(int) - gt.astype(int)).sum() > 0
    assert checked == len(cache.boxes)


def test_real_nih_images_and_their_boxes(nih_model, tmp_path):
    root = shared("nih")
    _, ckpt = nih_model
    summary = localize(ckpt, root, tmp_path, config(), progress=False)  # recognised by Data_Entry_2017.csv
    assert summary.images == 47 and summary.failed == 0  # both RGBA files included
    official = pd.read_csv(root / "BBox_List_2017.csv")
    results = pd.read_csv(tmp_path / "bb_results.csv")
    truth = results[results["gt_x_min"].notna()]
    assert len(truth) == 12 == len(official)
    xywh = official.iloc[:, 2:6].to_numpy(float)
    expected = {(i, round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3))
                for i, (x, y, w, h) in zip(official.iloc[:, 0], xywh)}
    assert {(r.image_id, round(r.gt_x_min, 3), round(r.gt_y_min, 3), round(r.gt_x_max, 3), round(r.gt_y_max, 3))
            for r in truth.itertuples()} == expected  # the 1024-pixel frame, Infiltrate read as Infiltration
    assert "Infiltration" in set(truth["class_name"])
    for r in truth.itertuples():
        gt = cv2.imread(str(picture_paths(tmp_path, r.image_id)["gtimage"]))
        assert gt.shape[:2] == (512, 512)  # the 64 px input, drawn at the picture size
        frame = np.array([r.gt_x_min, r.gt_y_min, r.gt_x_max, r.gt_y_max]) * 512 / 1024
        assert edge_share(gt, frame) > 0.9
    sub = pd.read_csv(tmp_path / "submission.csv", keep_default_na=False)
    assert len(sub) == 47 and sub["PredictionString"].str.contains(" 0 0 1 1").all()


def test_real_dicom_folder_without_prepare(vinbig_model, tmp_path):
    _, ckpt = vinbig_model
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(shared("dicom")), "--out", str(tmp_path),
                    "--method", "layercam", "--classes", "Cardiomegaly,10", "boxes.min_prob=0", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    assert "localized 2 images (0 failed)" in result.stdout
    dets = read_submission(tmp_path / "submission.csv")
    assert set(dets["image_id"]) == {"Fake_MONOHR1", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"}
    findings = dets[dets["class_id"] != 14]
    assert set(findings["class_id"]) <= {3, 10} and len(findings) > 0  # --classes restricts what is localised
    assert json.loads((tmp_path / "localize.json").read_text())["classes"] == ["Cardiomegaly", "10"]
    assert (findings[BOX_COLUMNS].to_numpy() <= 1024).all()  # the DICOM's own 1024-pixel frame
    assert len(list(tmp_path.glob("pred_*.png"))) == 2


def test_unreadable_images_are_listed_not_dropped(vinbig_model, tmp_path):
    _, ckpt = vinbig_model
    folder = tmp_path / "in"
    folder.mkdir()
    for name in sorted(p.name for p in shared("nih", "images").iterdir())[:3]:
        shutil.copy(shared("nih", "images", name), folder / name)
    (folder / "corrupt.dcm").write_bytes(b"DICM but not really" * 10)
    (folder / "truncated.png").write_bytes((folder / name).read_bytes()[:200])
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "out"),
                    "--no-images", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    assert "localized 5 images (2 failed)" in result.stdout and "failures.csv" in result.stderr
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert set(failures["image_id"]) == {"corrupt", "truncated"} and failures["reason"].str.len().gt(0).all()
    sub = pd.read_csv(tmp_path / "out" / "submission.csv", keep_default_na=False).set_index("image_id")
    assert len(sub) == 5 and sub.at["corrupt", "PredictionString"] == "" and sub.at["truncated", "PredictionString"] == ""
    assert not list((tmp_path / "out").glob("*.png"))  # --no-images


def test_user_mistakes_are_one_line(vinbig_model, nih_model, tmp_path):
    cache, ckpt = vinbig_model
    missing = cxrcam("localize", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(cache), "--out", str(tmp_path))
    lines = [line for line in missing.stderr.splitlines() if line.strip()]  # click's usage hint, then the error
    assert missing.returncode == 2 and len(lines) == 3 and "Traceback" not in missing.stderr
    assert lines[-1] == f"Error: Invalid value for '--checkpoint': Path '{tmp_path / 'nope.pt'}' does not exist."
    with pytest.raises(CxrcamError, match="predicts nih classes"):
        localize(nih_model[1], cache, tmp_path, config(), progress=False)
    with pytest.raises(CxrcamError, match="unknown vinbig class 'Hernia'"):
        localize(ckpt, cache, tmp_path, config(), classes=["Hernia"], progress=False)
    with pytest.raises(CxrcamError, match="unknown CAM method"):
        localize(ckpt, cache, tmp_path, config("cam.method=nope"), progress=False)
    # two files with one stem would be one image id: refused, both named, before any work
    folder = tmp_path / "twins"
    folder.mkdir()
    for name in ("scan.png", "scan.jpg"):
        cv2.imwrite(str(folder / name), np.full((64, 64), 128, np.uint8))
    twins = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "t"))
    assert twins.returncode == 1 and "Traceback" not in twins.stderr
    assert "scan.jpg" in twins.stderr and "scan.png" in twins.stderr and "'scan'" in twins.stderr
    assert not (tmp_path / "t" / "submission.csv").exists()


def test_torchrun_uneven_shards_merge_one_submission(vinbig_model, uneven_folder, tmp_path):
    """3 images on 2 ranks at batch 2 (fewer than ranks x batch); rank 1's whole shard is a normal
    image that needs no class map. The merged outputs are the single process's at batch 1."""
    folder, min_prob = uneven_folder
    ckpt = vinbig_model[1]
    common = ["--checkpoint", str(ckpt), "--data", str(folder), "--no-images", f"boxes.min_prob={min_prob}",
              "cam.workers=0"]
    single = cxrcam("localize", "--out", str(tmp_path / "one"), "--batch-size", "1", *common)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cxrcam",
                          "localize", "--out", str(tmp_path / "two"), "--batch-size", "2", *common],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    one, two = (read_submission(tmp_path / d / "submission.csv") for d in ("one", "two"))
    key = ["image_id", "class_id", "x_min", "y_min", "x_max", "y_max"]
    one, two = (t.sort_values(key).reset_index(drop=True) for t in (one, two))
    assert sorted(one["image_id"].unique()) == ["a", "b", "c"]
    assert set(one.loc[one["class_id"] < 14, "image_id"]) == {"a", "c"}  # b: its "No finding" row alone
    assert (one.groupby("image_id")["class_id"].apply(lambda c: (c == 14).sum()) == 1).all()
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-5)
    a, b = (pd.read_csv(tmp_path / d / "probabilities.csv").sort_values("image_id").reset_index(drop=True)
            for d in ("one", "two"))
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
    assert not (tmp_path / "two" / ".parts").exists()


def test_batch_size_one_short_last_batch_and_a_strict_operating_point(vinbig_model, tmp_path):
    """The field's shape: most images normal, so at batch size 1 most batches need no class map;
    160 images at batch 53 end with a batch of one; boxes.min_prob=0.99 predicts almost nothing.
    Every image keeps its row, and the batch size changes nothing."""
    cache, ckpt = vinbig_model
    n = len(open_cache(cache).images)
    assert torch.load(ckpt, weights_only=True)["precision"] == "bf16"  # localize from a bf16-trained classifier

    def run(name: str, batch: int, min_prob: float) -> pd.DataFrame:
        result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / name),
                        "--no-images", "--batch-size", str(batch), f"boxes.min_prob={min_prob}", "cam.workers=0")
        assert result.returncode == 0, result.stderr
        sub = read_submission(tmp_path / name / "submission.csv")
        assert sub["image_id"].nunique() == n and (sub["class_id"] == 14).sum() == n  # each its "No finding"
        return sub.sort_values(["image_id", "class_id", "x_min", "y_min"]).reset_index(drop=True)

    strict = run("strict", 1, 0.99)
    probs = pd.read_csv(tmp_path / "strict" / "probabilities.csv").set_index("image_id")
    assert (strict["class_id"] < 14).sum() <= 5 * (probs.to_numpy() > 0.99).sum()  # boxes only where p > 0.99
    median = float(probs.max(axis=1).median())  # about half the images predict nothing
    by_batch = [run(f"b{batch}", batch, median) for batch in (1, 53)]
    assert 0 < (by_batch[0]["class_id"] < 14).sum()
    for other in by_batch[1:]:  # the same boxes; a batch's kernels may move a map by 1e-5, a box by a pixel
        assert other[["image_id", "class_id"]].equals(by_batch[0][["image_id", "class_id"]])
        # ... and a score (p x the map's mean inside) by one pixel's share of its component: under 0.5% for a
        # component of 30 px, the small findings of the tables' world (aortic knob, nodules) at 64 px
        assert np.abs(other["score"] - by_batch[0]["score"]).max() < 5e-3
        assert np.abs(other[BOX_COLUMNS].to_numpy() - by_batch[0][BOX_COLUMNS].to_numpy()).max() <= 4  # 1 input px


def test_picture_labels_one_per_class_inside_and_apart():
    """Crowded boxes at the picture's edge: one label per class (its best box), every label wholly
    inside the picture, no two labels on top of each other."""
    canvas = np.zeros((512, 512, 3), np.uint8)
    boxes = np.array([[420, 0, 512, 40]] * 6 + [[400, 5, 512, 50], [0, 480, 60, 512]], float)
    classes = np.array([3] * 6 + [12, 10])
    labels = [f"{VINBIG.class_name(c)} 0.{k}" for k, c in enumerate(classes)]
    placer = _Labels(canvas)
    _label_best(placer, boxes, classes, labels, [(0, 0, 255)] * len(boxes), np.arange(len(boxes)) / 10)
    assert len(placer.placed) == 3
    for k, (x0, y0, x1, y1) in enumerate(placer.placed):
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
        for a0, b0, a1, b1 in placer.placed[k + 1:]:
            assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0


def test_cam_proposals_drawn_faint_only_when_asked(tmp_path):
    """Refine pictures show the detections; the CAM boxes appear, faint, only when passed."""
    from cxrcam.outputs.pictures import write_pictures

    image = np.full((128, 128), 100, np.uint8)
    preds = (np.array([[10.0, 10, 50, 50]]), np.array([3]), np.array([0.9]))
    truth = (np.zeros((0, 4)), np.zeros(0, int))
    plain = write_pictures(tmp_path / "a", "x", image, VINBIG, truth, preds, None, 0.5)
    faint = write_pictures(tmp_path / "b", "x", image, VINBIG, truth, preds, None, 0.5,
                           cam_boxes=(np.array([[70.0, 70, 120, 120]]), np.array([3])))
    a, b = (cv2.imread(str(p["pred"])).astype(int) for p in (plain, faint))
    changed = np.abs(a - b).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and ys.min() >= 70 * 4 - 4 and xs.min() >= 70 * 4 - 4  # only around the CAM box (x4)
    assert np.abs(a - b).max() <= 0.4 * 255 + 1  # blended at 40%: faint, not opaque


def test_a_used_folder_keeps_only_the_new_pictures_and_wide_images_warn(vinbig_model, tmp_path):
    """A second run into one folder leaves no picture of the first; an image 3x wider than tall,
    squashed to the square input, is named in one warning."""
    _, ckpt = vinbig_model
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    cv2.imwrite(str(first / "old.png"), np.full((64, 64), 100, np.uint8))
    cv2.imwrite(str(second / "wide.png"), np.full((60, 180), 100, np.uint8))
    out = tmp_path / "out"
    localize(ckpt, first, out, config("boxes.min_prob=0"), progress=False)
    assert (out / "pred_old.png").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match=r"1 image\(s\) more than 2x wider than tall .*wide: 180 x 60"):
        localize(ckpt, second, out, config("boxes.min_prob=0"), progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{kind}_wide.png" for kind in KINDS) + (
        ["box_accuracy.png"] if (out / "box_accuracy.png").is_file() else [])
    assert (out / "notes.txt").read_text() == "mine"  # only pictures of the run are replaced


def test_a_run_without_truth_leaves_no_earlier_figures_behind(vinbig_model, tmp_path):
    """Re-localizing into a used folder from input without truth: the earlier run's MaxBoxAccV2
    files go, so evaluate cannot report another model's figure as this one's."""
    cache, ckpt = vinbig_model
    out = tmp_path / "out"
    localize(ckpt, cache, out, config("boxes.min_prob=0.3"), pictures=False, progress=False)
    assert (out / "maxboxacc.csv").is_file() and (out / "box_curves.csv").is_file()
    plain = tmp_path / "plain"
    plain.mkdir()
    cv2.imwrite(str(plain / "x.png"), np.full((64, 64), 90, np.uint8))
    localize(ckpt, plain, out, config(), pictures=False, progress=False)
    assert not [n for n in ("maxboxacc.csv", "box_accuracy.csv", "box_accuracy.png", "box_curves.csv")
                if (out / n).exists()]
    from cxrcam.evaluation.evaluate import evaluate

    with pytest.warns(UserWarning, match="row skipped"):  # x is not a truth image: skipped, leniently
        metrics = evaluate(out, cache, control=False, plots=False, lenient=True)
    assert "maxboxacc" not in metrics  # before the fix: the first run's MaxBoxAccV2, read as this run's


def test_pictures_draw_only_boxes_above_the_floor(tmp_path):
    """--draw-min-score: a box scored under the floor is not drawn (the tables keep it); one above is."""
    from cxrcam.cam import Plan
    from cxrcam.localize.step import ImageResult
    from cxrcam.localize.write import Painter

    final = (np.array([[10.0, 10, 40, 40], [70, 70, 110, 110]]), np.array([3, 3]), np.array([0.05, 0.6]))
    plan = Plan(predicted=[3], shown=[3], extra=[], need=[3])
    result = ImageResult("x", np.zeros(14), (1.0, 1.0), final, final, [], [], np.zeros((1, 128, 128), np.float32), plan)
    pictures = {}
    for floor in (0.0, 0.1):
        painter = Painter(tmp_path / str(floor), VINBIG, BoxRules(), {}, size=128, min_score=floor)
        painter(result, torch.full((1, 128, 128), 0.4))
        painter.close()
        pictures[floor] = cv2.imread(str(tmp_path / str(floor) / "gtimage_x.png")).astype(int)
    changed = np.abs(pictures[0.0] - pictures[0.1]).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.max() < 70 and ys.max() < 70  # only the 0.05 box (and its label) went


def test_rsna_data_gets_the_rsna_submission_format(tmp_path):
    """On RSNA data localize writes RSNA's own submission (patientId, confidence x y width height),
    which `evaluate --format rsna` scores as it is."""
    from cxrcam.data.images import read_image
    from cxrcam.data.synth import dicom_dataset
    from cxrcam.files import save_checkpoint
    from cxrcam.models import create_classifier

    mapping = pd.read_csv(shared("rsna", "rsna_to_nih.csv")).head(8)
    labels = pd.read_csv(shared("rsna", "stage_2_train_labels.csv"))
    data = tmp_path / "rsna"
    (data / "stage_2_train_images").mkdir(parents=True)
    labels[labels["patientId"].isin(mapping["patientId"])].to_csv(data / "stage_2_train_labels.csv", index=False)
    for row in mapping.itertuples():
        pixels = read_image(shared("nih", "images", row.nih_image), 128).image
        dicom_dataset(pixels, 8).save_as(data / "stage_2_train_images" / f"{row.patientId}.dcm", enforce_file_format=True)
    torch.manual_seed(0)
    model = create_classifier("test_resnet", 1)
    save_checkpoint(tmp_path / "rsna.pt", {
        "kind": "classifier", "model_name": "test_resnet", "in_chans": 3, "classes": ["Lung Opacity"], "schema": "rsna",
        "input_size": 64, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "config": {},
        "model": model.state_dict()})
    result = cxrcam("localize", "--checkpoint", str(tmp_path / "rsna.pt"), "--data", str(data), "--out",
                    str(tmp_path / "loc"), "--no-images", "boxes.min_prob=0", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "loc" / "submission.csv", keep_default_na=False)
    assert list(table.columns) == ["patientId", "PredictionString"] and len(table) == 8
    tokens = [len(s.split()) for s in table["PredictionString"]]
    assert sum(tokens) > 0 and all(n % 5 == 0 for n in tokens)
    scored = cxrcam("evaluate", "--pred", str(tmp_path / "loc"), "--gt", str(data), "--format", "rsna",
                    "--json", str(tmp_path / "m.json"))
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["rsna_score"] <= 1 and metrics["predictions"] == sum(tokens) // 5


def test_operating_points_decide_boxes_and_pictures(vinbig_model, tmp_path):
    """At the default boxes.min_prob=auto a class is predicted above the checkpoint's own operating
    point, not above 0.5: only those classes get boxes, and only they are drawn in the pictures."""
    from cxrcam.localize.step import Step
    from cxrcam.models import decision_thresholds

    cache, ckpt = vinbig_model
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    thresholds = decision_thresholds(saved)
    assert not np.allclose(thresholds, 0.5)  # the fixture's classifier has operating points of its own
    out = tmp_path / "loc"
    localize(ckpt, cache, out, config(), pictures=False, progress=False)
    assert np.allclose(json.loads((out / "localize.json").read_text())["decision_thresholds"], thresholds)
    probs = pd.read_csv(out / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    above = probs[list(VINBIG.findings)].to_numpy() > thresholds
    predicted = {i: set(np.flatnonzero(row)) for i, row in zip(probs.index, above)}
    sub = read_submission(out / "submission.csv")
    boxed = sub[sub["class_id"] != VINBIG.no_finding_id].groupby("image_id")["class_id"].agg(set)
    assert len(boxed) and all(set(classes) <= predicted[i] for i, classes in boxed.items())
    # the two rules disagree somewhere, so the check above could fail under the 0.5 rule
    assert (above != (probs[list(VINBIG.findings)].to_numpy() > 0.5)).any()

    step = Step(BoxRules(config().boxes), {}, thresholds)
    p = np.where(thresholds > 0.5, (thresholds + 0.5) / 2, thresholds + 0.01)  # between 0.5 and each point
    plan = step.plan(p, "x")
    assert plan.shown == plan.predicted == [c for c in range(len(p)) if thresholds[c] <= 0.5]
    assert step.plan(np.zeros(len(p)), "x").shown == []  # a normal image: no class drawn
