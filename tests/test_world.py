"""A benchmark world drawn from the real tables (issue 35): the shipped profiles are what the released
tables give, a synthetic set matches the tables' figures, and findings go into real normal anatomy."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import shared
from cxrcam.data.images import read_image
from cxrcam.data.profiles import PROFILES, compare_nih, compare_vinbig, load_profile, nih_figures, vinbig_figures
from cxrcam.data.synth import Backgrounds, synthesize
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH

BUILD = Path(__file__).resolve().parents[1] / "scripts" / "build_profiles.py"


def test_the_shipped_profiles_are_what_the_released_tables_give(tmp_path):
    """scripts/build_profiles.py on ../shared/data/tables writes the shipped files, byte for byte;
    and they hold statistics only: no image id of the tables."""
    tables = shared("tables")
    spec = importlib.util.spec_from_file_location("build_profiles", BUILD)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path in script.build(tables, tmp_path):
        shipped = PROFILES / path.name
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} is stale: run {BUILD.name}"
    vinbig = (PROFILES / "vinbig.json").read_text()
    real = pd.read_csv(tables / "vinbigdata-train.csv.gz", usecols=["image_id"])["image_id"]
    assert not any(image_id in vinbig for image_id in real.iloc[:200])
    rsna = (PROFILES / "rsna.json").read_text()
    patients = pd.read_csv(tables / "stage_2_train_labels.csv.zip", usecols=["patientId"])["patientId"]
    assert not any(patient in rsna for patient in patients.iloc[:200])
    figures = load_profile("vinbig")["figures"]  # the release's own figures, as REFERENCE.md has them
    assert figures["readers"] == pytest.approx([0.43, 0.23, 0.34], abs=0.01)
    assert figures["findings_per_abnormal"] == pytest.approx(3.5, abs=0.05)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    """3,000 images of each profile (a fixed seed; 96 px: the tables are what is compared)."""
    root = tmp_path_factory.mktemp("world")
    return {fmt: synthesize(fmt, root / fmt, 3000, seed=35, size=96, progress=False) for fmt in ("vinbig", "nih")}


def test_a_vinbig_set_matches_the_released_table(worlds):
    table = pd.read_csv(worlds["vinbig"] / "train.csv")
    rows = compare_vinbig(vinbig_figures(table), load_profile("vinbig")["figures"])
    assert len(rows) == 20 and all(r.ok for r in rows), [r for r in rows if not r.ok]
    # three readers per image, as the release; readers who mark nothing on an abnormal image write "No finding"
    assert table.groupby("image_id")["rad_id"].nunique().eq(3).all()


def test_an_nih_set_matches_the_released_tables(worlds):
    entries = pd.read_csv(worlds["nih"] / "Data_Entry_2017.csv")
    boxes = pd.read_csv(worlds["nih"] / "BBox_List_2017.csv")
    rows = compare_nih(nih_figures(entries, boxes, side=96), load_profile("nih")["figures"])
    assert len(rows) == 22 and all(r.ok for r in rows), [r for r in rows if not r.ok]
    # every finding of the 8 boxed classes has its box; the other 6 stay label-only, as released
    boxed = set(load_profile("nih")["classes"])
    labels = entries.set_index("Image Index")["Finding Labels"].str.split("|")
    want = sorted((image, name) for image, names in labels.items() for name in names if name in boxed)
    got = sorted(zip(boxes["Image Index"], boxes["Finding Label"].replace({"Infiltrate": "Infiltration"})))
    assert sorted(set(got)) == sorted(set(want)) and set(boxes["Finding Label"]) <= boxed | {"Infiltrate"}
    assert len(boxed) == 8 and not boxed & {"Edema", "Emphysema", "Hernia"} and set(NIH.findings) > boxed


def test_the_test_split_has_one_consensus_reading(tmp_path):
    synthesize("vinbig", tmp_path / "test", 60, seed=3, size=64, progress=False, split="test")
    table = pd.read_csv(tmp_path / "test" / "test.csv")
    assert set(table["rad_id"]) == {"consensus"}
    findings = table[table["class_id"] != 14]
    assert len(findings) and not table[table["class_id"] == 14]["image_id"].isin(findings["image_id"]).any()


def test_uniform_profile_is_the_earlier_world(tmp_path):
    """--profile uniform: the flat class mix of before (1-3 findings, 3 readers who mostly agree)."""
    synthesize("vinbig", tmp_path / "u", 400, seed=5, size=64, progress=False, profile="uniform")
    figures = vinbig_figures(pd.read_csv(tmp_path / "u" / "train.csv"))
    assert figures["findings_per_abnormal"] < 2.2 and figures["readers"][2] > 0.6
    assert max(figures["box_share"].values()) < 0.12  # flat, no long tail
    with pytest.raises(CxrcamError, match="--format nih takes --profile nih or uniform"):
        synthesize("nih", tmp_path / "n", 4, profile="vinbig", progress=False)


def normals(tmp_path: Path) -> Path:
    """The real normal radiographs in ../shared/data: the 8 NIH "No Finding" images and the SIIM DICOM
    (linked, never copied)."""
    entries = pd.read_csv(shared("nih", "Data_Entry_2017.csv"))
    folder = tmp_path / "normals"
    folder.mkdir()
    for name in entries.loc[entries["Finding Labels"] == "No Finding", "Image Index"]:
        (folder / name).symlink_to(shared("nih", "images", name))
    siim = shared("dicom", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    (folder / "siim.dcm").symlink_to(siim)
    return folder


def test_findings_go_into_real_anatomy_unseen_by_the_test_split(tmp_path):
    folder = normals(tmp_path)
    train, test = Backgrounds(folder, "train"), Backgrounds(folder, "test")
    assert len(train.files) + len(test.files) == 9 and not set(train.files) & set(test.files) and test.files
    rng = np.random.default_rng(0)
    drawn, _ = train.draw(200, 160, rng)
    sources = [cv2.resize(im, (160, 200)) for im in train.images]
    best = max(np.corrcoef(drawn.ravel(), s.ravel())[0, 1] for s in sources + [s[:, ::-1] for s in sources])
    assert best > 0.6  # an augmented copy of one of the training backgrounds
    out = synthesize("vinbig", tmp_path / "real", 12, seed=2, size=160, progress=False, backgrounds=folder)
    table = pd.read_csv(out / "train.csv")
    boxed = table[table["class_id"] != 14]
    assert len(boxed)
    image = read_image(out / "train" / f"{boxed['image_id'].iloc[0]}.dicom").image
    assert image.std() > 20  # real anatomy, not a flat phantom background
