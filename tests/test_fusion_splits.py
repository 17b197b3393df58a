"""Box fusion (WBF / reader / union) and patient-level, seeded folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ensemble_boxes import weighted_boxes_fusion

from cxrcam.boxes import scale_boxes, xywh_to_xyxy, xyxy_to_xywh
from cxrcam.config import FusionConfig
from cxrcam.data.fusion import fuse_boxes
from cxrcam.data.readers import nih_from_tables
from cxrcam.data.splits import assign_folds
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH

from conftest import shared


def _boxes(rows):
    return pd.DataFrame(rows, columns=["image_id", "class_id", "x_min", "y_min", "x_max", "y_max", "rad_id"])


THREE_READERS = _boxes([
    ("a", 3, 100, 200, 300, 400, "R1"), ("a", 3, 110, 190, 310, 420, "R2"), ("a", 3, 90, 210, 290, 390, "R3"),
    ("a", 8, 500, 500, 540, 540, "R1"),  # one reader, separate finding
    ("a", 8, 700, 100, 730, 130, "R2"),  # same class, no overlap: stays separate
])


def test_wbf_matches_library_on_true_image_frame():
    fused = fuse_boxes(THREE_READERS, FusionConfig(iou_thr=0.4))
    assert len(fused) == 3 and set(fused["rad_id"]) == {"wbf"}
    # the library called directly on boxes normalised by a 1000 x 800 image gives the same boxes
    w, h = 1000, 800
    lists = [], [], []
    for _, r in THREE_READERS.groupby("rad_id"):
        lists[0].append(r[["x_min", "y_min", "x_max", "y_max"]].to_numpy() / [w, h, w, h])
        lists[1].append(np.ones(len(r)))
        lists[2].append(r["class_id"].to_numpy())
    ref, _, labels = weighted_boxes_fusion(*lists, iou_thr=0.4, skip_box_thr=0.0, allows_overflow=True)
    ref = ref * [w, h, w, h]
    ours = fused.sort_values(["class_id", "x_min"])[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
    order = np.lexsort((ref[:, 0], labels))
    assert np.allclose(ours, ref[order], atol=0.05)
    cardio = fused[fused["class_id"] == 3].iloc[0]
    assert cardio["x_min"] == pytest.approx(100, abs=0.01) and cardio["y_max"] == pytest.approx(403.33, abs=0.01)


def test_reader_and_union_modes():
    assert len(fuse_boxes(THREE_READERS, FusionConfig(method="reader"))) == 5
    union = fuse_boxes(THREE_READERS, FusionConfig(method="union"))
    assert len(union) == 3
    cardio = union[union["class_id"] == 3].iloc[0]
    assert (cardio["x_min"], cardio["y_min"], cardio["x_max"], cardio["y_max"]) == (90, 190, 310, 420)


def test_majority_keeps_what_two_readers_marked(tmp_path):
    """fusion.method=majority: WBF's boxes where 2 of the 3 readers drew the finding; the finding's
    label likewise. A consensus (one reader per image, a test split) keeps everything."""
    from cxrcam.data.readers import read_vinbig

    majority = fuse_boxes(THREE_READERS, FusionConfig(method="majority"), {"a": 3})
    wbf = fuse_boxes(THREE_READERS, FusionConfig())
    assert list(majority["class_id"]) == [3] and set(majority["rad_id"]) == {"majority"}
    assert np.allclose(majority[["x_min", "y_min", "x_max", "y_max"]].to_numpy(),
                       wbf[wbf["class_id"] == 3][["x_min", "y_min", "x_max", "y_max"]].to_numpy())
    assert len(fuse_boxes(THREE_READERS, FusionConfig(method="majority"), {"a": 1})) == 3
    one_reader = THREE_READERS.iloc[:4]  # the nodule: R1 alone
    table = one_reader.assign(class_name=lambda t: t["class_id"].map({3: "Cardiomegaly", 8: "Nodule/Mass"}))
    table.to_csv(tmp_path / "train.csv", index=False)
    for method, labels in (("wbf", {3, 8}), ("majority", {3})):
        tables = read_vinbig(tmp_path, FusionConfig(method=method), table=tmp_path / "train.csv")
        row = tables.images.iloc[0]
        assert {c for c in (3, 8) if row[f"y_{c}"] >= 0.5} == labels
        assert row["soft_8"] == pytest.approx(1 / 3)  # the soft target stays the share of readers


def test_box_conversions_round_trip():
    xywh = np.array([[731.43, 753.1, 119.2, 93.19], [0, 0, 1, 1]])
    xyxy = xywh_to_xyxy(xywh)
    assert np.allclose(xyxy[0], [731.43, 753.1, 850.63, 846.29])
    assert np.allclose(xyxy_to_xywh(xyxy), xywh)
    back = scale_boxes(scale_boxes(xyxy, 512 / 2430, 512 / 1994), 2430 / 512, 1994 / 512)
    assert np.allclose(back, xyxy, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def nih_images():
    entry = pd.read_csv(shared("tables", "Data_Entry_2017_v2020.csv.gz"))
    return nih_from_tables(entry).images


def test_nih_folds_are_by_patient_and_seeded(nih_images):
    a = assign_folds(nih_images, NIH, n_folds=5, seed=0)
    assert a.groupby("patient_id")["fold"].nunique().max() == 1  # no patient in two folds
    assert set(a["fold"]) == {0, 1, 2, 3, 4}
    sizes = a["fold"].value_counts()
    assert sizes.max() / sizes.min() < 1.05
    # stratified: each fold holds its share of a common and a rare class
    for cls in ("Infiltration", "Hernia"):
        col = f"y_{NIH.class_id(cls)}"
        share = a.groupby("fold")[col].sum() / a[col].sum()
        assert (share - 0.2).abs().max() < 0.05
    part = nih_images.iloc[:15000]  # seeding, on a part of the table (each full split takes 8 s)
    once = assign_folds(part, NIH, 5, seed=0)["fold"]
    assert once.equals(assign_folds(part, NIH, 5, seed=0)["fold"])
    assert not once.equals(assign_folds(part, NIH, 5, seed=1)["fold"])


def test_official_test_list_is_kept_out(nih_images):
    images = nih_images.iloc[:15000].copy()
    test_patients = images["patient_id"].drop_duplicates().iloc[:500]
    images.loc[images["patient_id"].isin(test_patients), "fold"] = -1
    a = assign_folds(images, NIH, 5, seed=0)
    assert (a.loc[images["fold"] == -1, "fold"] == -1).all()
    assert (a.loc[images["fold"] != -1, "fold"] >= 0).all()


def test_too_few_images_for_folds():
    images = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["1", "2"], "fold": 0,
                           **{f"y_{i}": 0 for i in range(14)}})
    with pytest.raises(CxrcamError, match="2 images into 5 folds"):
        assign_folds(images, NIH, 5)


@pytest.mark.parametrize("n_folds", [5, 2])
def test_small_dataset_falls_back_to_a_seeded_split(n_folds):
    """Six images, each with its own finding: no class can fill every fold, so stratifying is
    impossible (sklearn raises); the folds are drawn at random by patient, with a warning."""
    images = pd.DataFrame({"image_id": list("abcdef"), "patient_id": ["1", "1", "2", "3", "4", "5"], "fold": 0,
                           **{f"y_{i}": [int(k == i) for k in range(6)] for i in range(14)}})
    with pytest.warns(UserWarning, match=f"no finding .* {n_folds} folds .* at random by patient"):
        a = assign_folds(images, NIH, n_folds, seed=3)
    assert set(a["fold"]) == set(range(n_folds))
    assert a.groupby("patient_id")["fold"].nunique().max() == 1  # patient 1's two images stay together
    with pytest.warns(UserWarning):
        assert a["fold"].equals(assign_folds(images, NIH, n_folds, seed=3)["fold"])
