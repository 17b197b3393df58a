"""Synthetic data: real layouts, the variety of real files, and boxes where the findings are."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxrcam.data.readers import read_dataset
from cxrcam.data.synth import LOOKS, render_normal, synthesize
from cxrcam.errors import CxrcamError


def test_vinbig_layout_and_variety(synth_vinbig):
    table = pd.read_csv(synth_vinbig / "train.csv")
    assert list(table.columns) == ["image_id", "class_name", "class_id", "rad_id",
                                   "x_min", "y_min", "x_max", "y_max"]
    per_image = table.groupby("image_id")
    assert (per_image["rad_id"].nunique() == 3).all()
    normal = per_image["class_id"].apply(lambda s: (s == 14).all())
    assert 0.45 < normal.mean() < 0.85
    assert table.loc[table["class_id"] == 14, "x_min"].isna().all()
    files = sorted((synth_vinbig / "train").glob("*.dicom"))
    assert len(files) == 60
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.BitsAllocated for h in headers} == {16}
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert any("WindowCenter" in h for h in headers) and any("WindowCenter" not in h for h in headers)
    sizes = {(h.Rows, h.Columns) for h in headers}
    assert len(sizes) > 30 and sum(r != c for r, c in sizes) > 0.9 * len(sizes)  # varying, non-square
    tables = read_dataset("vinbig", synth_vinbig)
    assert tables.images["path"].notna().all()
    inside = tables.boxes.merge(tables.images[["image_id", "width", "height"]], on="image_id")
    assert (inside["x_max"] <= inside["width"]).all() and (inside["y_max"] <= inside["height"]).all()


def test_held_out_split_and_no_silent_overwrite(tmp_path):
    """A labelled held-out set is test.csv + test/ (no folder named train), read as VinBigData;
    writing into a folder that holds a dataset is refused unless asked."""
    synthesize("vinbig", tmp_path / "held", 4, seed=5, size=64, progress=False, split="test")
    assert sorted(p.name for p in tmp_path.joinpath("held").iterdir()) == ["test", "test.csv"]
    tables = read_dataset("vinbig", tmp_path / "held")
    assert len(tables.images) == 4 and tables.images["path"].str.contains("/test/").all()
    before = (tmp_path / "held" / "test.csv").read_bytes()
    with pytest.raises(CxrcamError, match="already holds a dataset.*--overwrite"):
        synthesize("vinbig", tmp_path / "held", 6, seed=6, size=64, progress=False, split="test")
    assert (tmp_path / "held" / "test.csv").read_bytes() == before
    synthesize("vinbig", tmp_path / "held", 6, seed=6, size=64, progress=False, split="test", overwrite=True)
    assert pd.read_csv(tmp_path / "held" / "test.csv")["image_id"].nunique() == 6


def test_nih_layout(synth_nih):
    header = (synth_nih / "BBox_List_2017.csv").read_text().splitlines()[0]
    assert header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    tables = read_dataset("nih", synth_nih)
    assert len(tables.images) == 40 and tables.images["path"].notna().all()
    assert (tables.images["fold"] == -1).any()  # test_list.txt honoured
    test_patients = set(tables.images.loc[tables.images["fold"] == -1, "patient_id"])
    assert not test_patients & set(tables.images.loc[tables.images["fold"] != -1, "patient_id"])


def test_same_seed_same_data(tmp_path):
    a = synthesize("vinbig", tmp_path / "a", 5, seed=11, size=96, progress=False)
    b = synthesize("vinbig", tmp_path / "b", 5, seed=11, size=96, progress=False)
    c = synthesize("vinbig", tmp_path / "c", 5, seed=12, size=96, progress=False)
    assert (a / "train.csv").read_text() == (b / "train.csv").read_text()
    assert (a / "train.csv").read_text() != (c / "train.csv").read_text()


@pytest.mark.parametrize("fmt", ["vinbig", "nih"])
def test_each_finding_changes_the_image_inside_its_box(fmt):
    """For every class: the change a finding makes to the phantom lies in its box."""
    for name, look in LOOKS[fmt].items():
        for seed in range(3):
            base, anatomy = render_normal(300, 260, np.random.default_rng(seed))
            changed = base.copy()
            x0, y0, x1, y1 = look(changed, anatomy, np.random.default_rng(100 + seed))
            diff = np.abs(changed - base)
            assert diff.sum() > 0, name
            assert 0 <= x0 < x1 <= 260 and 0 <= y0 < y1 <= 300, name
            pad = 4  # the soft edge of blurred findings
            inside = diff[max(int(y0) - pad, 0):int(y1) + pad, max(int(x0) - pad, 0):int(x1) + pad].sum()
            assert inside / diff.sum() > 0.9, (name, inside / diff.sum())
            assert (x1 - x0) * (y1 - y0) < 0.5 * 300 * 260 or name == "Emphysema", name


def test_normal_fraction_sets_the_share_of_normal_images(tmp_path):
    """`synth --normal-fraction 0.7`: VinBigData's share of "No finding" images; 0 and 1 are the
    extremes; out of range is one line. The same seed keeps each image's other draws."""
    from conftest import cxrcam

    shares = {}
    for fraction in ("0.7", "1", "0"):
        out = tmp_path / fraction
        result = cxrcam("synth", "--out", str(out), "--n-images", "100", "--size", "64", "--seed", "3",
                        "--normal-fraction", fraction)
        assert result.returncode == 0, result.stderr
        table = pd.read_csv(out / "train.csv")
        shares[fraction] = table.groupby("image_id")["class_id"].apply(lambda s: (s == 14).all()).mean()
    assert 0.55 <= shares["0.7"] <= 0.85  # binomial(100, 0.7): +- 3 sd
    assert shares["1"] == 1.0 and shares["0"] == 0.0
    wrong = cxrcam("synth", "--out", str(tmp_path / "x"), "--normal-fraction", "1.5")
    assert wrong.returncode != 0 and "--normal-fraction" in wrong.stderr and "Traceback" not in wrong.stderr
