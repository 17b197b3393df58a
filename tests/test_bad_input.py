"""Bad input, round 3 (issue 38): tracebacks from overrides, layers and edited files become one line
and a non-zero exit; numbers that need a word get one warning line and the run goes on."""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cxrcam as run_cxrcam
from cxrcam.calibration import write_calibration
from cxrcam.cam import create_cam
from cxrcam.data.cache import open_cache
from cxrcam.data.submission import submission_table
from cxrcam.data.synth import synthesize
from cxrcam.errors import CxrcamError, ImageReadError
from cxrcam.files import load_checkpoint, save_checkpoint
from cxrcam.models import create_classifier
from cxrcam.schemas import NIH, VINBIG

cxrcam = partial(run_cxrcam, timeout=600)


def one_line_error(result, *phrases: str) -> None:
    """A user mistake: a non-zero exit and one readable line naming it, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.fixture(scope="module")
def located(vinbig_model, tmp_path_factory) -> tuple[Path, Path]:
    """(cache, a localize folder of it without pictures)."""
    cache, ckpt = vinbig_model
    out = tmp_path_factory.mktemp("located") / "loc"
    result = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(out), "--no-images",
                    "cam.workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return cache, out


def truth_submission(cache: Path, path: Path, scale: float = 1.0) -> Path:
    """The cache's own truth boxes as a submission (coordinates times ``scale``)."""
    c = open_cache(cache)
    boxes = c.boxes[["image_id", "class_id", "x_min", "y_min", "x_max", "y_max"]].assign(score=1.0)
    boxes[["x_min", "y_min", "x_max", "y_max"]] *= scale
    submission_table(list(c.images["image_id"]), boxes).to_csv(path, index=False)
    return path


# 1. overrides that are not valid YAML
@pytest.mark.parametrize("override", ["cam.target_layer=,", "boxes.threshold=[1", "cam.target_layer=*",
                                      "boxes.min_prob=@x"])
def test_an_override_that_is_not_yaml_is_one_line(tmp_path, override):
    result = cxrcam("prepare", "--dataset", "vinbig", "--root", str(tmp_path), "--out", str(tmp_path / "c"), override)
    one_line_error(result, repr(override), "not valid YAML")


# 2. layers that give a vector, not a map
def test_a_layer_without_positions_is_refused_naming_the_stages(vinbig_model, tmp_path):
    model = create_classifier("resnet10t", 14).eval()
    for method, layer in (("layercam", "fc"), ("gradcam++", "global_pool"), ("scorecam", "fc")):
        with pytest.raises(CxrcamError, match=f"{layer} gives one vector per image") as caught:
            create_cam(model, method, layer)
        stages = str(caught.value).split("its stages are ")[1]
        assert "layer4" in stages and "fc" not in stages and "global_pool" not in stages
    cache, ckpt = vinbig_model
    one_line_error(cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(tmp_path / "l"),
                          "--no-images", "cam.workers=0", "cam.target_layer=fc"), "fc gives one vector")
    one_line_error(cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(cache), "--out",
                          str(tmp_path / "c.json"), "--maps", "layercam@fc", "cam.workers=0"), "fc gives one vector")


# 3 and 7. probabilities.csv: not numbers, outside [0, 1], of other images
def test_probabilities_that_are_not_numbers_name_the_row(located, tmp_path):
    cache, loc = located
    probs = pd.read_csv(loc / "probabilities.csv", dtype={"image_id": str})
    for bad in ("abc", "nan", ""):
        edited = probs.astype({"Cardiomegaly": object}).copy()
        edited.loc[3, "Cardiomegaly"] = bad
        edited.to_csv(tmp_path / "p.csv", index=False)
        one_line_error(cxrcam("evaluate", "--pred", str(loc / "submission.csv"), "--gt", str(cache), "--probs",
                              str(tmp_path / "p.csv")), "p.csv row 5", "Cardiomegaly", "not a probability")
    scaled = probs.copy()
    scaled.loc[0, "Cardiomegaly"] = 2.5
    scaled.to_csv(tmp_path / "p.csv", index=False)
    result = cxrcam("evaluate", "--pred", str(loc / "submission.csv"), "--gt", str(cache), "--probs",
                    str(tmp_path / "p.csv"))
    assert result.returncode == 0 and "outside [0, 1]" in result.stderr and "2.5" in result.stderr
    others = probs.assign(image_id="other_" + probs["image_id"])
    others.to_csv(tmp_path / "p.csv", index=False)
    result = cxrcam("evaluate", "--pred", str(loc / "submission.csv"), "--gt", str(cache), "--probs",
                    str(tmp_path / "p.csv"))
    assert result.returncode == 0 and f"{len(probs)} of {len(probs)} ground-truth images have no probabilities" \
        in result.stderr and "no AUROC" in result.stderr


# 4 and 15. report on hand-edited files
def test_report_leaves_out_a_hand_edited_metrics_file_with_a_word(located, tmp_path):
    cache, loc = located
    run = tmp_path / "run"
    shutil.copytree(loc, run / "loc")
    assert cxrcam("evaluate", "--pred", str(run / "loc"), "--gt", str(cache), "--no-control", "--no-plots",
                  "--out", str(run / "loc" / "eval")).returncode == 0
    good = json.loads((run / "loc" / "eval" / "metrics.json").read_text())
    shutil.copytree(run / "loc" / "eval", run / "loc" / "eval_kept")
    for edited, said in (([], "holds a list"), ({**good, "map": "abc"}, "\"map\" is 'abc', not a number"),
                         (None, "not readable as JSON")):
        text = "{not json" if edited is None else json.dumps(edited)
        (run / "loc" / "eval" / "metrics.json").write_text(text)
        result = cxrcam("report", "--run", str(run), "--out", str(run / "r.html"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert said in result.stderr and "left out of the report" in result.stderr
        page = (run / "r.html").read_text()
        assert 'id="summary"' in page  # the other evaluation still makes a summary
    # a picture that is not there is not linked
    loc_dir = tmp_path / "pics"
    shutil.copytree(loc, loc_dir / "loc")
    ids = pd.read_csv(loc / "probabilities.csv", dtype={"image_id": str})["image_id"][:2]
    for image_id in ids:  # pictures of two images, the pred_ of the second one missing
        for kind in ("gtimage", "pred"):
            (loc_dir / "loc" / f"{kind}_{image_id}.png").write_bytes(b"")
    (loc_dir / "loc" / f"pred_{ids.iloc[1]}.png").unlink()
    assert cxrcam("report", "--run", str(loc_dir), "--out", str(loc_dir / "r.html")).returncode == 0
    page = (loc_dir / "r.html").read_text()
    assert f"gtimage_{ids.iloc[1]}.png" in page and f"pred_{ids.iloc[1]}.png" not in page
    assert f"pred_{ids.iloc[0]}.png" in page


# 5. another dataset's class ids
def test_class_ids_of_another_dataset_are_named(synth_nih, tmp_path):
    truth = pd.read_csv(synth_nih / "BBox_List_2017.csv")
    boxes = truth.iloc[:, 2:6].to_numpy(float)
    names = truth["Finding Label"].replace({"Infiltrate": "Infiltration", "Effusion": "Pleural effusion",
                                            "Nodule": "Nodule/Mass", "Mass": "Nodule/Mass"})
    frame = pd.DataFrame({"image_id": truth["Image Index"], "score": 1.0,
                          "x_min": boxes[:, 0], "y_min": boxes[:, 1], "x_max": boxes[:, 0] + boxes[:, 2],
                          "y_max": boxes[:, 1] + boxes[:, 3]})
    ids = sorted(set(frame["image_id"]))
    for schema, named, warned in ((VINBIG, names, True), (NIH, truth["Finding Label"].replace(
            {"Infiltrate": "Infiltration"}), False)):
        known = named.isin(schema.findings)  # VinBigData has no pneumonia class
        table = frame[known].assign(class_id=[schema.class_id(n) for n in named[known]])
        submission_table(ids, table).to_csv(tmp_path / "s.csv", index=False)
        result = cxrcam("evaluate", "--pred", str(tmp_path / "s.csv"), "--gt", str(synth_nih / "BBox_List_2017.csv"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("fit vinbig's class list better than nih's" in result.stderr) is warned, result.stderr


# 6. coordinates far outside the image
def test_boxes_far_outside_their_image_get_a_word(located, tmp_path):
    cache, _ = located
    perfect = cxrcam("evaluate", "--pred", str(truth_submission(cache, tmp_path / "ok.csv")), "--gt", str(cache),
                     "--no-control")
    assert perfect.returncode == 0 and "beyond twice" not in perfect.stderr
    far = cxrcam("evaluate", "--pred", str(truth_submission(cache, tmp_path / "far.csv", 1000)), "--gt", str(cache),
                 "--no-control")
    assert far.returncode == 0 and "reach beyond twice their image's size" in far.stderr


# 8 and 12. intervals on few images; paired comparisons
def test_few_images_and_paired_comparison_words(located, tmp_path):
    cache, loc = located
    few = tmp_path / "few.csv"
    ids = list(open_cache(cache).images["image_id"][:3])
    pd.DataFrame({"image_id": ids, "PredictionString": ""}).to_csv(few, index=False)
    subset = pd.read_csv(cache / "manifest.csv", dtype={"image_id": str})
    result = cxrcam("evaluate", "--pred", str(few), "--gt", str(cache), "--ci", "--no-control", "--lenient")
    assert result.returncode == 0 and f"from {len(subset)} image" not in result.stderr  # 160 images: no word
    perfect, empty = truth_submission(cache, tmp_path / "perfect.csv"), tmp_path / "empty.csv"
    pd.DataFrame({"image_id": subset["image_id"], "PredictionString": ""}).to_csv(empty, index=False)
    out = tmp_path / "cmp"
    result = cxrcam("evaluate", "--pred", str(empty), "--pred", str(perfect), "--pred", str(perfect), "--gt", str(cache),
                    "--out", str(out), "--no-plots", "--probs", str(loc / "probabilities.csv"), "--bootstrap", "200")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is given twice" in result.stderr and "--probs" in result.stderr and "is not used" in result.stderr
    assert not (out / "comparison.png").exists()
    table = (out / "comparison.md").read_text()
    assert "| < 0.001 |" in table and "| 0.000 |" not in table.split("Paired differences")[1]
    # a truth of three images: a word on the intervals
    three = tmp_path / "three"
    shutil.copytree(cache, three)
    manifest = pd.read_csv(three / "manifest.csv", dtype={"image_id": str})
    manifest.head(3).to_csv(three / "manifest.csv", index=False)
    result = cxrcam("evaluate", "--pred", str(few), "--gt", str(three), "--ci", "--no-control")
    assert result.returncode == 0 and "bootstrap intervals from 3 image(s)" in result.stderr


# 9. truth with normal images only
def test_truth_of_normal_images_only_gets_a_note(tmp_path):
    normal = pd.DataFrame({"image_id": [f"n{k}" for k in range(8)], "class_name": "No finding", "class_id": 14,
                           "rad_id": "R1", "x_min": np.nan, "y_min": np.nan, "x_max": np.nan, "y_max": np.nan})
    normal.to_csv(tmp_path / "train.csv", index=False)
    found = pd.DataFrame({"image_id": np.repeat(normal["image_id"], 3), "class_id": 3, "score": 0.9,
                          "x_min": 10.0, "y_min": 10.0, "x_max": 50.0, "y_max": 50.0})
    normal_rows = pd.Series(0.5, index=normal["image_id"])
    submission_table(list(normal["image_id"]), found, normal_rows).to_csv(tmp_path / "s.csv", index=False)
    result = cxrcam("evaluate", "--pred", str(tmp_path / "s.csv"), "--gt", str(tmp_path / "train.csv"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every truth image is normal" in result.stderr and "24 finding boxes" in result.stderr


# 10. operating points missing
def test_auto_operating_points_missing_from_the_checkpoint_are_named(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    saved = load_checkpoint(ckpt)
    saved.pop("op_threshs", None)
    save_checkpoint(tmp_path / "old.pt", saved)
    result = cxrcam("localize", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(cache), "--out",
                    str(tmp_path / "loc"), "--no-images", "cam.workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "has no operating points, so every class is predicted above 0.5" in result.stderr


# 11. calibrate's undefined figures
def test_calibration_writes_strict_json_and_prints_no_nan(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    write_calibration(tmp_path / "c.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": float("nan")}})
    strict = json.loads((tmp_path / "c.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == {"a": None, "b": [1.0, None], "c": {"d": None}}
    few = tmp_path / "few"
    shutil.copytree(cache, few)
    manifest = pd.read_csv(few / "manifest.csv", dtype={"image_id": str})
    boxed = manifest[manifest["image_id"].isin(set(open_cache(cache).boxes["image_id"]))]
    boxed.head(2).to_csv(few / "manifest.csv", index=False)  # two boxed images: a half without boxes
    result = cxrcam("calibrate", "--checkpoint", str(ckpt), "--data", str(few), "--fold", "all", "--out",
                    str(tmp_path / "cal.json"), "--maps", "none", "cam.workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nan" not in result.stdout.lower()
    json.loads((tmp_path / "cal.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))


# 13. resume messages
def test_resume_messages_say_what_happens(tmp_path):
    from cxrcam.data.cache import prepare
    from cxrcam.config import load_config

    synthesize("vinbig", tmp_path / "data", 24, seed=3, size=64, progress=False)
    prepare("vinbig", tmp_path / "data", tmp_path / "cache", load_config(overrides=["prepare.size=32"]),
            progress=False)
    run = ["train-classifier", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
           "model.name=test_resnet", "train.batch_size=8", "train.workers=0", "split.n_folds=2"]
    assert cxrcam(*run, "train.epochs=2").returncode == 0
    said = {}
    for name, epochs in (("finished", 2), ("lowered", 1)):
        result = cxrcam(*run, "--resume", f"train.epochs={epochs}")
        assert result.returncode == 0, result.stderr[-2000:]
        said[name] = result.stdout + result.stderr
    assert "has finished 2 epochs, nothing to train" in said["finished"] and "resuming" not in said["finished"]
    assert "nothing to train" in said["lowered"] and "stretched" not in said["lowered"]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    last["config"]["train"]["epochs"] = 5  # a 5-epoch run stopped after 2, resumed to 3: shortened
    save_checkpoint(tmp_path / "run" / "last.pt", last)
    shortened = cxrcam(*run, "--resume", "train.epochs=3")
    said = shortened.stdout + shortened.stderr
    assert shortened.returncode == 0 and "is shortened" in said and "stretched" not in said
    assert "resuming at epoch 3 of 3" in said
    if not torch.cuda.is_available():
        one_line_error(cxrcam(*run, "--overwrite", "runtime.device=cuda"), "runtime.device")


# 14. synth --overwrite replaces the dataset, for every format
@pytest.mark.parametrize("fmt, images, pattern", [("vinbig", "train", "*.dicom"), ("nih", "images", "*.png")])
def test_synth_overwrite_leaves_only_the_new_dataset(tmp_path, fmt, images, pattern):
    synthesize(fmt, tmp_path, 5, seed=0, size=64, progress=False)
    synthesize(fmt, tmp_path, 3, seed=1, size=64, progress=False, overwrite=True)
    assert len(list((tmp_path / images).glob(pattern))) == 3


# 16. a decoder's own warning does not reach the user
def test_a_truncated_png_is_reported_once(tmp_path, capfd):
    import cv2

    from cxrcam.data.images import read_image

    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(png.tobytes()[: len(png) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    assert "WARN" not in capfd.readouterr().err


# 17. detector.init checked before the CAM pass
def test_a_wrong_detector_init_stops_before_the_cam_pass(vinbig_model, tmp_path):
    cache, ckpt = vinbig_model
    result = cxrcam("train-detector", "--data", str(cache), "--out", str(tmp_path / "det"), f"detector.init={ckpt}",
                    "detector.backbone=resnet18", f"detector.pseudo_from={ckpt}", "detector.box_images=5",
                    "cam.workers=0", "detector.workers=0")
    one_line_error(result, "is a resnet10t classifier", "detector.backbone is resnet18")
    assert "CAM boxes for the detector" not in result.stderr and not (tmp_path / "det" / "pseudo_boxes.csv").exists()


# 19. a slow library method: its cost up front, one progress bar
def test_a_per_channel_method_says_its_cost_and_shows_one_bar(capfd):
    model = create_classifier("test_resnet", 14).eval()
    with pytest.warns(UserWarning, match=r"forward passes per image and class"):
        cam = create_cam(model, "scorecam")
    capfd.readouterr()
    out = cam(torch.rand(2, 1, 32, 32), [1, 2])
    assert out.cams.shape == (2, 2, 32, 32)
    bars = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if "%|" in line]
    assert bars and all(line.startswith("scorecam") for line in bars)  # none of the library's own bars
