"""Readers against the complete official tables and the real images in ../shared/data."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrcam.config import FusionConfig
from cxrcam.data.images import read_image
from cxrcam.data.readers import nih_from_tables, read_dataset, rsna_from_table, vinbig_from_table
from cxrcam.data.synth import dicom_dataset
from cxrcam.data.tables import soft_columns, target_columns
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH, VINBIG

from conftest import shared


@pytest.fixture(scope="module")
def vinbig_readers(vinbig_table):
    return vinbig_from_table(vinbig_table, fusion=FusionConfig(method="reader"))


def test_vinbig_full_table_facts(vinbig_table, vinbig_readers):
    assert len(vinbig_table) == 67_914
    tables = vinbig_readers
    assert len(tables.images) == 15_000
    assert vinbig_table["rad_id"].nunique() == 17
    normal = (tables.images[target_columns(VINBIG)].sum(axis=1) == 0).sum()
    assert normal == 10_606
    # per reader: every finding row with a box, nothing more, nothing less
    assert len(tables.boxes) == int((vinbig_table["class_id"] != 14).sum())
    assert set(tables.boxes["class_id"]) == set(range(14))


def test_vinbig_soft_targets_are_reader_shares(vinbig_table, vinbig_readers):
    images = vinbig_readers.images.set_index("image_id")
    soft = images[soft_columns(VINBIG)].to_numpy()
    assert set(np.round(np.unique(soft) * 3, 6)) <= {0.0, 1.0, 2.0, 3.0}  # 3 readers per image
    assert np.array_equal(images[target_columns(VINBIG)].to_numpy() > 0, soft > 0)
    # one image by hand: share of its 3 readers who marked each class
    image_id = vinbig_table.loc[vinbig_table["class_id"] == 3, "image_id"].iloc[0]
    rows = vinbig_table[vinbig_table["image_id"] == image_id]
    for cid in range(14):
        expected = rows.loc[rows["class_id"] == cid, "rad_id"].nunique() / 3
        assert images.loc[image_id, f"soft_{cid}"] == pytest.approx(expected)


def test_vinbig_wbf_fuses_readers(vinbig_table, vinbig_readers):
    sample_ids = vinbig_readers.boxes["image_id"].drop_duplicates().iloc[:300]
    sample = vinbig_table[vinbig_table["image_id"].isin(sample_ids)]
    fused = vinbig_from_table(sample).boxes
    raw = vinbig_readers.boxes[vinbig_readers.boxes["image_id"].isin(sample_ids)]
    assert set(fused["rad_id"]) == {"wbf"}
    assert len(fused) < len(raw)  # overlapping readers' boxes merged
    # every fused box lies within the hull of its image/class's reader boxes
    for (image_id, cid), group in fused.groupby(["image_id", "class_id"]):
        r = raw[(raw["image_id"] == image_id) & (raw["class_id"] == cid)]
        assert (group["x_min"] >= r["x_min"].min() - 1e-3).all()
        assert (group["x_max"] <= r["x_max"].max() + 1e-3).all()


def test_nih_full_tables_facts():
    entry = pd.read_csv(shared("tables", "Data_Entry_2017_v2020.csv.gz"))
    bbox = pd.read_csv(shared("tables", "BBox_List_2017.csv.gz"))
    tables = nih_from_tables(entry, bbox)
    assert len(tables.images) == 112_120
    assert tables.images["patient_id"].nunique() == 30_805
    assert len(tables.boxes) == 984
    assert tables.boxes["image_id"].nunique() == 880
    counts = tables.boxes["class_id"].map(NIH.class_name).value_counts().to_dict()
    assert counts == {"Atelectasis": 180, "Cardiomegaly": 146, "Effusion": 153, "Infiltration": 123,
                      "Mass": 85, "Nodule": 79, "Pneumonia": 120, "Pneumothorax": 98}
    no_finding = (entry["Finding Labels"] == "No Finding").sum()
    assert (tables.images[target_columns(NIH)].sum(axis=1) == 0).sum() == no_finding


def test_nih_real_images_and_boxes():
    tables = read_dataset("nih", shared("nih"))
    assert len(tables.images) == 47
    assert tables.images["path"].notna().all()
    assert (tables.images[["width", "height"]] == 1024).all().all()
    assert len(tables.boxes) == 12
    raw = pd.read_csv(shared("nih", "BBox_List_2017.csv"))
    first = raw.iloc[0]
    box = tables.boxes.iloc[0]
    assert box["image_id"] == first["Image Index"]
    assert box["x_max"] == pytest.approx(first.iloc[2] + first.iloc[4])  # x + w
    assert box["y_max"] == pytest.approx(first.iloc[3] + first.iloc[5])  # y + h
    assert (tables.boxes["class_id"] == NIH.class_id("Infiltration")).sum() == \
        (raw["Finding Label"] == "Infiltrate").sum()


def test_nih_rgba_images_read_as_grey():
    for name in ("00001369_000.png", "00002578_000.png"):
        path = shared("nih", "images", name)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert raw.ndim == 3 and raw.shape[2] == 4
        grey = read_image(path).image
        assert grey.shape == (1024, 1024) and grey.dtype == np.uint8
        assert np.array_equal(grey, cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2GRAY))


def test_rsna_full_table_facts():
    table = pd.read_csv(shared("tables", "stage_2_train_labels.csv.zip"))
    tables = rsna_from_table(table)
    assert len(tables.images) == 26_684
    assert len(tables.boxes) == int(table["Target"].sum())
    assert tables.images["y_0"].sum() == tables.boxes["image_id"].nunique()


def test_rsna_layout_with_real_pixels(tmp_path):
    """The RSNA release is NIH pixels in <patientId>.dcm: wrap the real ones and read them."""
    mapping = pd.read_csv(shared("rsna", "rsna_to_nih.csv"))
    labels = pd.read_csv(shared("rsna", "stage_2_train_labels.csv"))
    labels.to_csv(tmp_path / "stage_2_train_labels.csv", index=False)
    (tmp_path / "stage_2_train_images").mkdir()
    for row in mapping.itertuples():
        pixels = read_image(shared("nih", "images", row.nih_image)).image
        dicom_dataset(pixels, 8).save_as(tmp_path / "stage_2_train_images" / f"{row.patientId}.dcm",
                                         enforce_file_format=True)
    tables = read_dataset("rsna", tmp_path)
    assert len(tables.images) == labels["patientId"].nunique()
    assert len(tables.boxes) == 37 == int(labels["Target"].sum())
    assert tables.images["path"].notna().all()
    row = mapping.iloc[0]
    path = tables.images.set_index("image_id").loc[row.patientId, "path"]
    assert np.array_equal(read_image(path).image, read_image(shared("nih", "images", row.nih_image)).image)


def test_missing_column_is_named(vinbig_table):
    with pytest.raises(CxrcamError, match="missing column.*rad_id"):
        vinbig_from_table(vinbig_table.drop(columns=["rad_id"]).head(10))


def test_unknown_nih_label_names_row():
    entry = pd.DataFrame({"Image Index": ["a.png", "b.png"], "Finding Labels": ["No Finding", "Pneumonitis"],
                          "Patient ID": [1, 2]})
    with pytest.raises(CxrcamError, match="row 3.*Pneumonitis"):
        nih_from_tables(entry)


@pytest.mark.parametrize("column, value, message", [
    ("class_id", "abc", "row 2: class_id 'abc' is not a number"),
    ("class_id", None, "row 2: class_id is empty"),
    ("class_id", 15, "row 2: class_id 15 is not one of 0..14"),
    ("class_id", 2.5, "row 2: class_id 2.5 is not one of 0..14"),
    ("x_min", "left", "row 2: x_min 'left' is not a number"),
])
def test_vinbig_bad_cells_name_their_row(vinbig_table, column, value, message):
    table = vinbig_table[vinbig_table["class_id"] < 14].head(5).astype({column: object}).reset_index(drop=True)
    table.loc[0, column] = value
    with pytest.raises(CxrcamError, match=f"train.csv {message}"):
        vinbig_from_table(table)


def test_nih_bbox_bad_cells_name_their_row():
    entry = pd.DataFrame({"Image Index": ["a.png"], "Finding Labels": ["Mass"], "Patient ID": [1]})
    bbox = pd.DataFrame({"Image Index": ["a.png", "a.png"], "Finding Label": ["Mass", "Tumour"],
                         "Bbox [x": [1.0, 2], "y": [1.0, 2], "w": [5.0, 5], "h]": [5.0, 5]})
    with pytest.raises(CxrcamError, match="BBox_List_2017.csv row 3: unknown NIH finding 'Tumour'"):
        nih_from_tables(entry, bbox)
    bbox = bbox.astype({"w": object})
    bbox.loc[1, "Finding Label"], bbox.loc[1, "w"] = "Mass", "wide"
    with pytest.raises(CxrcamError, match="BBox_List_2017.csv row 3: w 'wide' is not a number"):
        nih_from_tables(entry, bbox)


def test_invalid_truth_rows_dropped_fixed_and_listed(vinbig_table):
    table = vinbig_table[vinbig_table["class_id"] < 14].head(7).reset_index(drop=True)
    x_min, x_max = table.loc[1, "x_min"], table.loc[1, "x_max"]
    table.loc[0, "y_max"] = np.nan  # missing coordinate
    table.loc[1, ["x_min", "x_max"]] = x_max, x_min  # inverted
    table.loc[2, "y_max"] = table.loc[2, "y_min"]  # zero area
    table.loc[3, "x_min"] = -40.0  # past the edge: clipped to 0
    table.loc[4, "x_max"] = -5.0  # wholly outside (left of 0) once x_min is clipped too
    table.loc[4, "x_min"] = -20.0
    table.loc[5, "class_name"] = "Cardiomegaly" if table.loc[5, "class_id"] != 3 else "ILD"
    tables = vinbig_from_table(table, fusion=FusionConfig(method="reader"))
    problems = tables.invalid.set_index("row")["problem"].to_dict()
    assert problems == {2: "missing coordinate", 3: "inverted (max < min)", 4: "zero area",
                        5: "past the image edge", 6: "outside the image", 7: "class_name disagrees with class_id"}
    assert tables.invalid.set_index("row").at[5, "action"] == "clipped to the image"
    assert len(tables.boxes) == 2  # row 5 (clipped) and the intact row 8
    clipped = tables.boxes[tables.boxes["y_min"] == table.loc[3, "y_min"]]
    assert clipped["x_min"].tolist() == [0.0] and clipped["x_max"].tolist() == [table.loc[3, "x_max"]]
    # the class_name row is trusted for nothing, not even the image's label (here its only row: no image)
    wrong = table.loc[5]
    assert not ((table["image_id"] == wrong["image_id"]).drop(5)).any()
    assert wrong["image_id"] not in set(tables.images["image_id"])
    # the released table has none of these
    assert vinbig_from_table(vinbig_table, fusion=FusionConfig(method="reader")).invalid.empty


def test_duplicated_nih_entry_row_is_one_image():
    entry = pd.DataFrame({"Image Index": ["a.png", "b.png", "a.png"], "Finding Labels": ["Mass", "No Finding", "Mass"],
                          "Patient ID": [1, 2, 1]})
    bbox = pd.DataFrame({"Image Index": ["a.png", "a.png"], "Finding Label": ["Mass", "Mass"],
                         "Bbox [x": [1.0, 10], "y": [1.0, 10], "w": [5.0, 0], "h]": [5.0, 5]})
    tables = nih_from_tables(entry, bbox)
    assert tables.images["image_id"].tolist() == ["a.png", "b.png"]
    assert len(tables.boxes) == 1  # the zero-width box dropped
    assert tables.invalid[["file", "row", "problem"]].values.tolist() == [
        ["Data_Entry_2017.csv", 4, "image listed again"], ["BBox_List_2017.csv", 3, "zero area"]]
