"""The real tables' statistics that ``cxrcam synth --profile`` draws from, and the figures that compare a
synthetic set with the release.

``derive_vinbig`` reads VinBigData's ``train.csv`` (3 readers per image), ``derive_nih`` NIH's
``Data_Entry_2017`` and ``BBox_List_2017``; both return what ships as ``profiles/<name>.json``
(``scripts/build_profiles.py`` rebuilds the files from the tables; no table row ships):

- the normal share, and the *set* of findings of every abnormal image with its count (so
  prevalence, co-occurrence and findings per image are the release's);
- per class, how many readers mark a finding (1, 2 or 3; VinBigData) and how many boxes one reader
  draws for it, and how far readers' boxes of one finding lie apart (each edge's offset from
  their mean box, as a share of its size);
- per class, a sample of boxes as (centre x, centre y, width, height) shares of the image frame.

**The frame of a VinBigData box.** The table has no image sizes. Each image is given the smallest
of the release's three common sizes (height x width: 2430 x 1994, 2880 x 2304, 3072 x 3072; REFERENCE)
that holds every box of the image (a larger box's own extent otherwise). An image whose film is
larger than the boxes reveal gets its boxes up to 1.54x too wide and 1.26x too tall (3072 / 1994,
3072 / 2430) relative to the frame; one smaller than 2430 x 1994 (sizes go down to 823 px) gets them
too small. ``frames`` records how many images took each size. NIH's boxes are in the 1024 px frame
every NIH image has.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH, VINBIG

PROFILES = Path(__file__).resolve().parent / "profiles"  # the shipped statistics, one JSON per dataset
FRAMES = ((2430, 1994), (2880, 2304), (3072, 3072))  # VinBigData's common sizes, (height, width)
NIH_SIDE = 1024
GEOMETRY = 300  # boxes kept per class (all where the release has fewer)
MAX_BOXES = 6  # boxes one reader draws for one finding, at most (the release's tail is longer: 99.7% <= 6)


def _sets(groups: pd.Series) -> list[list]:
    """[[class ids...], count] of each distinct finding set, commonest first."""
    counts = groups.apply(lambda ids: tuple(sorted(set(int(c) for c in ids)))).value_counts()
    return [[list(k), int(v)] for k, v in counts.items()]


def _geometry(frame: pd.DataFrame, rng: np.random.Generator) -> list[list[float]]:
    """A sample of boxes as [cx, cy, w, h] shares of their frame (columns x_min.. and frame_h/frame_w)."""
    w, h = frame["frame_w"].to_numpy(float), frame["frame_h"].to_numpy(float)
    x0, y0, x1, y1 = (frame[c].to_numpy(float) for c in ("x_min", "y_min", "x_max", "y_max"))
    rows = np.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], 1)
    rows = rows[np.isfinite(rows).all(1) & (rows[:, 2] > 0) & (rows[:, 3] > 0)]
    if len(rows) > GEOMETRY:
        rows = rows[np.sort(rng.choice(len(rows), GEOMETRY, replace=False))]
    return np.round(rows, 4).tolist()


def _frames(findings: pd.DataFrame) -> pd.DataFrame:
    """image_id -> the frame (frame_h, frame_w) assumed for it (see the module docstring)."""
    extent = findings.groupby("image_id").agg(x=("x_max", "max"), y=("y_max", "max"))
    h = np.full(len(extent), np.nan)
    w = np.full(len(extent), np.nan)
    for fh, fw in reversed(FRAMES):  # the smallest that holds the boxes wins
        fits = (extent["y"].to_numpy() <= fh) & (extent["x"].to_numpy() <= fw)
        h[fits], w[fits] = fh, fw
    outside = np.isnan(h)
    h[outside], w[outside] = np.ceil(extent["y"].to_numpy()[outside]), np.ceil(extent["x"].to_numpy()[outside])
    return pd.DataFrame({"frame_h": h, "frame_w": w}, index=extent.index)


def derive_vinbig(table: pd.DataFrame, seed: int = 0) -> dict:
    """The VinBigData profile from the release's ``train.csv`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    is_normal = table.groupby("image_id")["class_id"].agg(lambda c: bool((c == 14).all()))
    findings = table[table["class_id"] != 14].copy()
    frames = _frames(findings)
    findings = findings.join(frames, on="image_id")
    pairs = findings.groupby(["image_id", "class_id"])
    readers = pairs["rad_id"].nunique()
    per_reader = findings.groupby(["image_id", "class_id", "rad_id"]).size().clip(upper=MAX_BOXES)
    classes = {}
    for c, name in enumerate(VINBIG.findings):
        mine = findings[findings["class_id"] == c]
        marked = readers[readers.index.get_level_values("class_id") == c]
        drawn = per_reader[per_reader.index.get_level_values("class_id") == c]
        classes[name] = {
            "readers": [round(float((marked == k).mean()), 4) for k in (1, 2, 3)],
            "boxes_per_reader": [round(float((drawn == k).mean()), 4) for k in range(1, MAX_BOXES + 1)],
            "jitter": _reader_jitter(mine),
            "geometry": _geometry(mine, rng)}
    taken = frames.value_counts(["frame_h", "frame_w"])
    sizes = {f"{h} x {w}": int(taken.get((h, w), 0)) for h, w in FRAMES}
    sizes["larger (their own extent)"] = int(len(frames) - sum(sizes.values()))
    return {"dataset": "vinbig", "images": int(len(is_normal)), "normal_share": round(float(is_normal.mean()), 4),
            "sets": _sets(findings.groupby("image_id")["class_id"].agg(list)), "classes": classes, "frames": sizes,
            "figures": vinbig_figures(table)}


def _reader_jitter(boxes: pd.DataFrame) -> float:
    """How far readers' boxes of one finding lie apart: the median absolute offset of each edge from
    the readers' mean box, as a share of that box's side, over the findings that 2-3 readers marked
    with one box each."""
    one = boxes.groupby(["image_id", "rad_id"]).filter(lambda g: len(g) == 1) if len(boxes) else boxes
    groups = one.groupby("image_id").filter(lambda g: g["rad_id"].nunique() >= 2) if len(one) else one
    if not len(groups):
        return 0.1
    cols = ["x_min", "y_min", "x_max", "y_max"]
    mean = groups.groupby("image_id")[cols].transform("mean")
    side = np.stack([mean["x_max"] - mean["x_min"], mean["y_max"] - mean["y_min"]] * 2, 1)[:, [0, 1, 0, 1]]
    offsets = np.abs(groups[cols].to_numpy(float) - mean.to_numpy(float)) / np.maximum(side, 1)
    return round(float(np.median(offsets)), 4)


def derive_nih(entries: pd.DataFrame, boxes: pd.DataFrame, seed: int = 0) -> dict:
    """The NIH profile from ``Data_Entry_2017`` and ``BBox_List_2017`` (boxes in the 1024 px frame)."""
    rng = np.random.default_rng(seed)
    labels = entries["Finding Labels"].astype(str)
    normal = labels == "No Finding"
    ids = labels[~normal].str.split("|").apply(lambda names: [NIH.class_id(n) for n in names])
    boxes = boxes.iloc[:, :6].copy()
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    frame = pd.DataFrame({"x_min": boxes["x"], "y_min": boxes["y"], "x_max": boxes["x"] + boxes["w"],
                          "y_max": boxes["y"] + boxes["h"], "frame_w": NIH_SIDE, "frame_h": NIH_SIDE})
    class_ids = boxes["label"].map(NIH.class_id)
    classes = {name: {"geometry": _geometry(frame[class_ids == c], rng)}
               for c, name in enumerate(NIH.findings) if (class_ids == c).any()}
    return {"dataset": "nih", "images": int(len(entries)), "normal_share": round(float(normal.mean()), 4),
            "sets": _sets(ids), "classes": classes, "figures": nih_figures(entries, boxes)}


RSNA_SIDE = 1024  # RSNA's images (NIH's, re-released as DICOM)
RSNA_MAX_BOXES = 4  # the release's most boxes on one image


def derive_rsna(labels: pd.DataFrame, seed: int = 0) -> dict:
    """The RSNA Pneumonia profile from ``stage_2_train_labels.csv`` (boxes in the 1024 px frame): the
    share of patients without a box, how many boxes a positive image has (1 ... 4), and a sample of
    the boxes' geometry. Two boxes usually sit in the two lungs: ``sides`` keeps the share of
    two-box images whose boxes' centres lie on opposite halves."""
    rng = np.random.default_rng(seed)
    target = labels.groupby("patientId")["Target"].max()
    pos = labels[labels["Target"] == 1]
    counts = pos.groupby("patientId").size().clip(upper=RSNA_MAX_BOXES)
    frame = pd.DataFrame({"x_min": pos["x"], "y_min": pos["y"], "x_max": pos["x"] + pos["width"],
                          "y_max": pos["y"] + pos["height"], "frame_w": RSNA_SIDE, "frame_h": RSNA_SIDE})
    two = pos[pos["patientId"].isin(counts.index[counts == 2])]
    centre = (two["x"] + two["width"] / 2) > RSNA_SIDE / 2
    opposite = centre.groupby(two["patientId"]).nunique() == 2
    return {"dataset": "rsna", "images": int(len(target)), "normal_share": round(float(1 - target.mean()), 4),
            "boxes_per_positive": [round(float((counts == k).mean()), 4) for k in range(1, RSNA_MAX_BOXES + 1)],
            "sides": round(float(opposite.mean()), 4),
            "classes": {"Lung Opacity": {"geometry": _geometry(frame, rng)}}, "figures": rsna_figures(labels)}


def load_profile(name: str) -> dict:
    """The shipped profile of ``name`` (vinbig, nih)."""
    path = PROFILES / f"{name}.json"
    if not path.is_file():
        raise CxrcamError(f"no synthetic profile {name!r} (shipped: "
                          f"{', '.join(sorted(p.stem for p in PROFILES.glob('*.json')))})")
    return json.loads(path.read_text())


def write_profile(profile: dict, path: Path) -> None:
    path.write_text(json.dumps(profile, separators=(",", ":")) + "\n")


# --- what a set of images is, by the figures the release is compared on

def vinbig_figures(table: pd.DataFrame) -> dict:
    """A VinBigData train.csv (real or synthetic) in figures: each class's share of the finding boxes,
    boxes and distinct findings per abnormal image, the normal share, and the shares of (image,
    finding) pairs that 1, 2 and 3 readers marked."""
    findings = table[table["class_id"] != 14]
    images = table["image_id"].nunique()
    abnormal = findings["image_id"].nunique()
    share = findings["class_id"].value_counts(normalize=True)
    readers = findings.groupby(["image_id", "class_id"])["rad_id"].nunique()
    return {"box_share": {name: round(float(share.get(c, 0.0)), 4) for c, name in enumerate(VINBIG.findings)},
            "boxes_per_abnormal": round(len(findings) / max(abnormal, 1), 3),
            "findings_per_abnormal": round(len(readers) / max(abnormal, 1), 3),
            "normal_share": round(1 - abnormal / max(images, 1), 4),
            "readers": [round(float((readers == k).mean()), 4) for k in (1, 2, 3)]}


def nih_figures(entries: pd.DataFrame, boxes: pd.DataFrame, side: int = NIH_SIDE) -> dict:
    """NIH tables (real or synthetic) in figures: each class's prevalence (share of images), and the
    median box area / image area of each boxed class (boxes: image, label, x, y, w, h in the ``side``
    px square frame: the release's 1024, or a synthetic set's size)."""
    labels = entries["Finding Labels"].astype(str).str.split("|")
    prevalence = {name: round(float(labels.apply(lambda l, n=name: n in l).mean()), 4) for name in NIH.findings}
    boxes = boxes.iloc[:, :6]
    names = boxes.iloc[:, 1].map(lambda n: NIH.class_name(NIH.class_id(n)))
    area = boxes.iloc[:, 4].astype(float) * boxes.iloc[:, 5].astype(float) / side ** 2
    return {"prevalence": prevalence,
            "median_area": {n: round(float(area[names == n].median()), 4) for n in sorted(set(names))}}


def rsna_figures(labels: pd.DataFrame, side: int = RSNA_SIDE) -> dict:
    """An RSNA label table (real or synthetic) in figures: the share of images with a box, boxes per
    positive image, and the median box area / image area (``side``: the images' side in pixels)."""
    target = labels.groupby("patientId")["Target"].max()
    pos = labels[labels["Target"] == 1]
    area = pos["width"].astype(float) * pos["height"].astype(float) / side ** 2
    return {"positive_share": round(float(target.mean()), 4),
            "boxes_per_positive": round(len(pos) / max(int(target.sum()), 1), 3),
            "median_area": round(float(area.median()), 4) if len(pos) else 0.0}


@dataclass
class Compared:
    """One figure of a synthetic set beside the release's, with its tolerance."""

    figure: str
    synthetic: float
    real: float
    tolerance: str
    ok: bool


def _ratio_row(figure: str, synthetic: float, real: float, limit: float) -> Compared:
    ratio = synthetic / real if real else float("inf")
    return Compared(figure, synthetic, real, f"within {limit}x", 1 / limit <= ratio <= limit)


def compare_vinbig(synthetic: dict, real: dict) -> list[Compared]:
    """Issue 35's goals for a VinBigData set: each class's box share within 1.5x (2x under 2% of the
    boxes), boxes and findings per abnormal image within 1.25x, the normal share within 0.03, the
    1/2/3-reader shares within 0.1."""
    rows = [_ratio_row(f"box share: {name}", synthetic["box_share"][name], share,
                       2.0 if share < 0.02 else 1.5) for name, share in real["box_share"].items()]
    rows += [_ratio_row(k.replace("_", " "), synthetic[k], real[k], 1.25)
             for k in ("boxes_per_abnormal", "findings_per_abnormal")]
    rows.append(Compared("normal share", synthetic["normal_share"], real["normal_share"], "within 0.03",
                         abs(synthetic["normal_share"] - real["normal_share"]) <= 0.03))
    for k in range(3):
        rows.append(Compared(f"pairs marked by {k + 1} reader(s)", synthetic["readers"][k], real["readers"][k],
                             "within 0.1", abs(synthetic["readers"][k] - real["readers"][k]) <= 0.1))
    return rows


def compare_nih(synthetic: dict, real: dict) -> list[Compared]:
    """Issue 35's goals for an NIH set: each class's prevalence within 1.5x (2x under 1%), and each
    boxed class's median relative box area within 1.5x."""
    rows = [_ratio_row(f"prevalence: {name}", synthetic["prevalence"][name], p, 2.0 if p < 0.01 else 1.5)
            for name, p in real["prevalence"].items()]
    rows += [_ratio_row(f"median box area: {name}", synthetic["median_area"].get(name, 0.0), a, 1.5)
             for name, a in real["median_area"].items()]
    return rows


def compare_rsna(synthetic: dict, real: dict) -> list[Compared]:
    """An RSNA set against the release: the positive share within 0.03, boxes per positive image and
    the median relative box area within 1.25x."""
    return [Compared("positive share", synthetic["positive_share"], real["positive_share"], "within 0.03",
                     abs(synthetic["positive_share"] - real["positive_share"]) <= 0.03),
            _ratio_row("boxes per positive image", synthetic["boxes_per_positive"], real["boxes_per_positive"], 1.25),
            _ratio_row("median box area", synthetic["median_area"], real["median_area"], 1.25)]


__all__ = ["derive_rsna", "rsna_figures", "compare_rsna", "derive_vinbig", "derive_nih", "load_profile", "write_profile",
           "vinbig_figures", "nih_figures",
           "compare_vinbig", "compare_nih", "Compared", "PROFILES", "FRAMES"]
