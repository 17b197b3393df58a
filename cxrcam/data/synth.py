"""Synthetic chest radiographs in the real dataset layouts: the built-in data for demo and tests.

Each image is a chest phantom (body, lungs with vessel markings, mediastinum, heart, aortic
knob, ribs, diaphragm, noise) rendered as a density map (bright = dense), or a real normal
radiograph (``backgrounds``: :class:`Backgrounds`). Which findings an image has, how many readers
mark each, and where its boxes lie are drawn from the released table's statistics (the
``vinbig`` / ``nih`` profiles, :mod:`cxrcam.data.profiles`); each lesion's look is ours, fitted
to its box (:data:`FITTED`). The ``uniform`` profile is the generator of before: findings drawn
uniformly, 1-3 per abnormal image, each placed by its look where it plausibly lies (:data:`LOOKS`),
two thirds of images normal.
VinBigData output is 16-bit DICOM of varying non-square size (some MONOCHROME1, some with
window or rescale tags) with three readers' boxes per finding; NIH output is PNG
with ``Data_Entry_2017.csv``, ``BBox_List_2017.csv`` and official-style split lists.
"""
from __future__ import annotations

import csv
import hashlib
import shutil
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from cxrcam.data.profiles import load_profile
from cxrcam.errors import CxrcamError
from cxrcam.runtime.progress import progress_bar
from cxrcam.schemas import NIH, VINBIG

Box = tuple[float, float, float, float]
NORMAL_FRACTION = 2 / 3  # share of images without findings, unless asked otherwise


@dataclass
class Anatomy:
    """Normalised geometry of one phantom; findings are placed relative to it."""

    h: int
    w: int
    lungs: list[tuple[float, float, float, float]]  # (cx, cy, rx, ry) per lung, image left first
    heart: tuple[float, float, float, float]
    knob: tuple[float, float, float]  # (cx, cy, r)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.linspace(0, 1, w, dtype=np.float32), np.linspace(0, 1, h, dtype=np.float32))


def _ellipse(u, v, cx, cy, rx, ry) -> np.ndarray:
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _soft(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    m = mask.astype(np.float32)
    return cv2.GaussianBlur(m, (0, 0), max(sigma_px, 0.5)) if sigma_px > 0 else m


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def render_normal(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, Anatomy]:
    u, v = _grid(h, w)
    j = lambda s: float(rng.normal(0, s))  # noqa: E731 - small anatomical jitter
    d = np.full((h, w), 0.03, np.float32)
    body = _ellipse(u, v, 0.5 + j(0.01), 0.56, 0.47, 0.56)
    d[body] = 0.42
    lungs = [(0.31 + j(0.01), 0.44 + j(0.01), 0.14 + j(0.005), 0.29 + j(0.01)),
             (0.69 + j(0.01), 0.44 + j(0.01), 0.13 + j(0.005), 0.29 + j(0.01))]
    lung_mask = np.zeros((h, w), bool)
    for cx, cy, rx, ry in lungs:
        lung_mask |= _ellipse(u, v, cx, cy, rx, ry) & (v < cy + ry * 0.85)
    d[lung_mask] = 0.14
    # vessel markings: low-contrast branching texture, densest near the hila
    tex = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), max(w / 180, 1))
    hilum = np.exp(-(((np.abs(u - 0.5) - 0.12) / 0.12) ** 2 + ((v - 0.45) / 0.25) ** 2))
    d += lung_mask * (0.035 * tex / (tex.std() + 1e-6) * (0.4 + hilum))
    mediastinum = (np.abs(u - 0.5) < 0.065) & (v > 0.08) & (v < 0.8)
    d[mediastinum] = 0.62
    heart = (0.55 + j(0.008), 0.63 + j(0.008), 0.12 + j(0.005), 0.1 + j(0.004))
    d[_ellipse(u, v, *heart)] = 0.66
    knob = (0.565 + j(0.004), 0.27 + j(0.005), 0.03)
    d[_ellipse(u, v, knob[0], knob[1], knob[2], knob[2] * w / h)] = 0.64
    d[body & (v > 0.8)] = 0.58  # abdomen below the diaphragm
    for i in range(9):  # ribs: curved bands over both lungs
        y0 = 0.13 + i * 0.072 + j(0.004)
        curve = y0 + 0.22 * (u - 0.5) ** 2 * (1 + 0.3 * i / 9)
        rib = (np.abs(v - curve) < 0.011) & (np.abs(u - 0.5) > 0.07) & body
        d[rib] += 0.09
    return d, Anatomy(h, w, lungs, heart, knob)


def _in_lung(a: Anatomy, rng: np.random.Generator, side: int | None = None,
             zone: tuple[float, float] = (-0.6, 0.6)) -> tuple[float, float, int]:
    """A random point inside a lung, ``zone`` a vertical range in lung radii (-1 top .. 1 bottom)."""
    side = int(rng.integers(2)) if side is None else side
    cx, cy, rx, ry = a.lungs[side]
    t = rng.uniform(*zone)
    half = np.sqrt(max(1 - t * t, 0.05)) * 0.6
    return cx + rng.uniform(-half, half) * rx, cy + t * ry, side


def _blob(d, a, rng, radius, gain, blur, zone=(-0.6, 0.6)) -> Box:
    u, v = _grid(a.h, a.w)
    cx, cy, _ = _in_lung(a, rng, zone=zone)
    rx = radius * rng.uniform(0.8, 1.2)
    mask = _ellipse(u, v, cx, cy, rx, rx * a.w / a.h * rng.uniform(0.8, 1.25))
    d += gain * _soft(mask, blur * a.w)
    return _bbox(mask)


def nodule(d, a, rng):
    return _blob(d, a, rng, rng.uniform(0.018, 0.03), 0.38, 0.002)


def mass(d, a, rng):
    return _blob(d, a, rng, rng.uniform(0.045, 0.07), 0.4, 0.004)


def opacity(d, a, rng):  # lung opacity / pneumonia: medium patch, soft edge
    return _blob(d, a, rng, rng.uniform(0.06, 0.09), 0.26, 0.012)


def infiltration(d, a, rng):  # faint, hazy, larger
    return _blob(d, a, rng, rng.uniform(0.08, 0.11), 0.17, 0.02)


def consolidation(d, a, rng):  # dense patch crossed by dark air bronchograms
    u, v = _grid(a.h, a.w)
    box = _blob(d, a, rng, rng.uniform(0.07, 0.1), 0.42, 0.006, zone=(0.0, 0.6))
    x0, y0, x1, y1 = box
    inside = (u * a.w >= x0) & (u * a.w < x1) & (v * a.h >= y0) & (v * a.h < y1)
    angle = rng.uniform(0.5, 1.2)
    stripes = np.abs(np.sin((u * np.cos(angle) + v * np.sin(angle)) * 90)) < 0.12
    d[inside & stripes] -= 0.2
    return box


def atelectasis(d, a, rng):  # thin oblique band (plate-like) in a lower zone
    u, v = _grid(a.h, a.w)
    cx, cy, _ = _in_lung(a, rng, zone=(0.2, 0.6))
    angle = rng.uniform(-0.5, 0.5)
    along = (u - cx) * np.cos(angle) + (v - cy) * np.sin(angle)
    across = -(u - cx) * np.sin(angle) + (v - cy) * np.cos(angle)
    mask = (np.abs(along) < rng.uniform(0.07, 0.1)) & (np.abs(across) < 0.012)
    d += 0.4 * _soft(mask, 0.002 * a.w)
    return _bbox(mask)


def calcification(d, a, rng):  # cluster of tiny, very dense dots
    u, v = _grid(a.h, a.w)
    cx, cy, _ = _in_lung(a, rng)
    mask = np.zeros((a.h, a.w), bool)
    for _ in range(int(rng.integers(3, 7))):
        r = max(rng.uniform(0.005, 0.009), 1 / a.w)  # at least a pixel: small images still show every dot
        mask |= _ellipse(u, v, cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02), r, r * a.w / a.h)
    d[mask] += 0.65
    return _bbox(mask)


def other_lesion(d, a, rng):  # ring-shaped (cavitary) lesion
    u, v = _grid(a.h, a.w)
    cx, cy, _ = _in_lung(a, rng)
    r = rng.uniform(0.03, 0.05)
    dist = np.sqrt(((u - cx) / r) ** 2 + ((v - cy) / (r * a.w / a.h)) ** 2)
    ring = (dist <= 1) & (dist >= 0.6)
    d[ring] += 0.4
    return _bbox(dist <= 1)


def cardiomegaly(d, a, rng):  # widened heart
    u, v = _grid(a.h, a.w)
    cx, cy, rx, ry = a.heart
    big = _ellipse(u, v, cx, cy + 0.01, rx * rng.uniform(1.45, 1.7), ry * 1.15)
    d[big] = np.maximum(d[big], 0.66)
    return _bbox(big)


def aortic_enlargement(d, a, rng):  # widened aortic knob
    u, v = _grid(a.h, a.w)
    cx, cy, r = a.knob
    r2 = r * rng.uniform(1.7, 2.1)
    knob = _ellipse(u, v, cx + 0.02, cy, r2, r2 * a.w / a.h)
    d[knob] = np.maximum(d[knob], 0.64)
    return _bbox(knob)


def _lung_mask(a: Anatomy, side: int) -> np.ndarray:
    u, v = _grid(a.h, a.w)
    cx, cy, rx, ry = a.lungs[side]
    return _ellipse(u, v, cx, cy, rx, ry) & (v < cy + ry * 0.85)


def effusion(d, a, rng):  # basal meniscus: fluid rising towards the chest wall
    u, v = _grid(a.h, a.w)
    side = int(rng.integers(2))
    cx, cy, rx, ry = a.lungs[side]
    level = cy + ry * rng.uniform(0.35, 0.55)
    lateral = cx - rx if side == 0 else cx + rx
    meniscus = v > level - 0.9 * ((u - cx) / rx) ** 2 * 0.08 - 0.12 * np.clip(1 - np.abs(u - lateral) / rx, 0, 1) ** 3
    mask = _lung_mask(a, side) & meniscus
    d[mask] = 0.55
    return _bbox(mask)


def pneumothorax(d, a, rng):  # apical region without lung markings, thin pleural line
    u, v = _grid(a.h, a.w)
    side = int(rng.integers(2))
    cx, cy, rx, ry = a.lungs[side]
    lung = _lung_mask(a, side)
    edge = cy - ry * rng.uniform(0.1, 0.35)
    free = lung & (v < edge + 0.15 * ((u - cx) / rx) ** 2)
    d[free] = 0.05
    line = cv2.dilate(free.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    d[line & ~free & lung] = 0.32
    return _bbox(free)


def pleural_thickening(d, a, rng):  # dense band along the lateral chest wall
    side = int(rng.integers(2))
    cx, cy, rx, ry = a.lungs[side]
    lung = _lung_mask(a, side)
    inner = cv2.erode(lung.astype(np.uint8), np.ones((1, max(3, int(0.04 * a.w))), np.uint8)) > 0
    u, v = _grid(a.h, a.w)
    lateral = (u < cx - rx * 0.3) if side == 0 else (u > cx + rx * 0.3)
    band = lung & ~inner & lateral & (v < cy + rng.uniform(0.0, 0.4) * ry)
    d[band] = 0.5
    return _bbox(band)


def _reticular(d, a, rng, zone: tuple[float, float], period: float, gain: float) -> Box:
    side = int(rng.integers(2))
    cx, cy, rx, ry = a.lungs[side]
    u, v = _grid(a.h, a.w)
    region = _lung_mask(a, side) & (v > cy + zone[0] * ry) & (v < cy + zone[1] * ry)
    net = (np.abs(np.sin(u * np.pi / period + rng.uniform(0, 6))) < 0.25) | \
          (np.abs(np.sin(v * np.pi / period + rng.uniform(0, 6))) < 0.25)
    d[region & net] += gain
    return _bbox(region)


def ild(d, a, rng):  # fine reticular net, lower zone
    return _reticular(d, a, rng, (0.1, 0.85), 0.012, 0.16)


def fibrosis(d, a, rng):  # coarse streaks, upper zone
    return _reticular(d, a, rng, (-0.9, -0.1), 0.03, 0.22)


def edema(d, a, rng):  # bilateral perihilar ("bat-wing") haze
    u, v = _grid(a.h, a.w)
    mask = (_lung_mask(a, 0) | _lung_mask(a, 1)) & _ellipse(u, v, 0.5, 0.47, 0.3, 0.17)
    d += 0.2 * _soft(mask, 0.01 * a.w)
    return _bbox(mask)


def emphysema(d, a, rng):  # hyperlucent lungs with sparse markings
    mask = _lung_mask(a, 0) | _lung_mask(a, 1)
    d[mask] = 0.05 + 0.3 * (d[mask] - 0.14)
    return _bbox(mask)


def hernia(d, a, rng):  # retrocardiac gas bubble with a dense rim
    u, v = _grid(a.h, a.w)
    r = rng.uniform(0.05, 0.07)
    dist = np.sqrt(((u - 0.5) / r) ** 2 + ((v - 0.7) / (r * a.w / a.h)) ** 2)
    d[dist <= 1] = 0.25
    d[(dist <= 1) & (dist > 0.8)] = 0.75
    return _bbox(dist <= 1)


Look = Callable[[np.ndarray, Anatomy, np.random.Generator], Box]

LOOKS: dict[str, dict[str, Look]] = {
    "vinbig": dict(zip(VINBIG.findings, (
        aortic_enlargement, atelectasis, calcification, cardiomegaly, consolidation, ild,
        infiltration, opacity, nodule, other_lesion, effusion, pleural_thickening,
        pneumothorax, fibrosis))),
    "nih": dict(zip(NIH.findings, (
        atelectasis, cardiomegaly, effusion, infiltration, mass, nodule, opacity, pneumothorax,
        consolidation, edema, emphysema, fibrosis, pleural_thickening, hernia))),
}


@dataclass
class SynthImage:
    density: np.ndarray  # float32 H x W, bright = dense
    findings: list[tuple[int, Box]]  # (class id, true box in pixels)


def synth_image(fmt: str, h: int, w: int, rng: np.random.Generator,
                normal_fraction: float = NORMAL_FRACTION,
                base: tuple[np.ndarray, Anatomy] | None = None) -> SynthImage:
    """One phantom (or ``base``: a real background and the anatomy assumed for it) with findings
    drawn uniformly, 1-3 of them on abnormal images: the ``uniform`` profile."""
    d, anatomy = render_normal(h, w, rng) if base is None else base
    looks = list(LOOKS[fmt].values())
    findings = []
    if rng.random() >= normal_fraction:
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        for cid in rng.choice(len(looks), size=n, replace=False):
            findings.append((int(cid), looks[cid](d, anatomy, rng)))
    return SynthImage(_finish(d, rng), findings)


def _finish(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Detector noise and blur over the whole image, in [0, 1]."""
    d = d + rng.normal(0, 0.012, d.shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(d, (0, 0), 0.7), 0, 1)


# --- profiles drawn from the real tables (cxrcam.data.profiles): the finding sets, readers and box
# geometry are the release's; each lesion's look is ours, fitted to the box drawn for it.

def _local(box: Box, shape: tuple[int, int]) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The box's pixels (rows, columns) and coordinates across it in [-1, 1] (u: x, v: y)."""
    h, w = shape
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    u, v = np.meshgrid(np.linspace(-1, 1, x1 - x0, dtype=np.float32), np.linspace(-1, 1, y1 - y0, dtype=np.float32))
    return slice(y0, y1), slice(x0, x1), u, v


def _fit_blob(gain: float, blur: float, stripes: bool = False):
    """A soft ellipse filling the box (``stripes``: crossed by dark air bronchograms)."""
    def draw(d, box, rng):
        rows, cols, u, v = _local(box, d.shape)
        mask = u ** 2 + v ** 2 <= 1
        add = gain * _soft(mask, blur * max(mask.shape))
        if stripes:
            angle = rng.uniform(0.5, 1.2)
            add[(np.abs(np.sin((u * np.cos(angle) + v * np.sin(angle)) * 6)) < 0.15) & mask] -= 0.2
        d[rows, cols] += add
    return draw


def _fit_dense(level: float):
    """An organ outline grown to the box (heart, aortic knob): its ellipse at least this dense."""
    def draw(d, box, rng):
        rows, cols, u, v = _local(box, d.shape)
        region = d[rows, cols]
        inside = u ** 2 + v ** 2 <= 1
        region[inside] = np.maximum(region[inside], level)
    return draw


def _fit_band(d, box, rng):  # atelectasis: a plate-like band along the box's long axis
    rows, cols, u, v = _local(box, d.shape)
    across = v if (cols.stop - cols.start) >= (rows.stop - rows.start) else u
    d[rows, cols] += 0.4 * _soft(np.abs(across + rng.uniform(-0.3, 0.3)) < 0.3, 1)


def _fit_dots(d, box, rng):  # calcification: a few tiny, very dense dots
    rows, cols, u, v = _local(box, d.shape)
    for _ in range(int(rng.integers(2, 6))):
        cu, cv_, r = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.2, 0.4)
        d[rows, cols][((u - cu) / r) ** 2 + ((v - cv_) / r) ** 2 <= 1] += 0.65


def _fit_ring(d, box, rng):  # other lesion: a cavity's dense ring
    rows, cols, u, v = _local(box, d.shape)
    r = np.sqrt(u ** 2 + v ** 2)
    d[rows, cols][(r <= 1) & (r >= 0.6)] += 0.4


def _fit_meniscus(d, box, rng):  # effusion: fluid filling the box from below, its top curved
    rows, cols, u, v = _local(box, d.shape)
    d[rows, cols][v > -1 + 0.6 * (1 - u ** 2)] = 0.55


def _fit_air(d, box, rng):  # pneumothorax: no lung markings, a thin pleural line at its inner edge
    rows, cols, u, v = _local(box, d.shape)
    inside = u ** 2 + v ** 2 <= 1
    line = inside & (u ** 2 + v ** 2 >= 0.8)
    region = d[rows, cols]
    region[inside] = 0.05
    region[line] = 0.32


def _fit_wall(d, box, rng):  # pleural thickening: a dense band along the box's outer (chest-wall) side
    rows, cols, u, v = _local(box, d.shape)
    outer = -u if (cols.start + cols.stop) / 2 < d.shape[1] / 2 else u
    d[rows, cols][outer > 0.3] = 0.5


def _fit_net(period: float, gain: float):  # ILD, fibrosis: a reticular net inside the box's ellipse
    def draw(d, box, rng):
        rows, cols, u, v = _local(box, d.shape)
        net = (np.abs(np.sin(u * np.pi / period + rng.uniform(0, 6))) < 0.25) | \
              (np.abs(np.sin(v * np.pi / period + rng.uniform(0, 6))) < 0.25)
        d[rows, cols][net & (u ** 2 + v ** 2 <= 1)] += gain
    return draw


def _fit_lucent(d, box, rng):  # emphysema: hyperlucent, sparse markings
    rows, cols, u, v = _local(box, d.shape)
    region = d[rows, cols]
    inside = u ** 2 + v ** 2 <= 1
    region[inside] = 0.05 + 0.3 * (region[inside] - 0.14)


def _fit_bubble(d, box, rng):  # hernia: a gas bubble with a dense rim
    rows, cols, u, v = _local(box, d.shape)
    r = np.sqrt(u ** 2 + v ** 2)
    region = d[rows, cols]
    region[r <= 1] = 0.25
    region[(r <= 1) & (r > 0.8)] = 0.75


FITTED: dict[str, Callable] = {  # by class name, both datasets
    "Aortic enlargement": _fit_dense(0.64), "Cardiomegaly": _fit_dense(0.66), "Atelectasis": _fit_band,
    "Calcification": _fit_dots, "Consolidation": _fit_blob(0.42, 0.006, stripes=True), "ILD": _fit_net(0.12, 0.16),
    "Infiltration": _fit_blob(0.17, 0.02), "Lung Opacity": _fit_blob(0.26, 0.012), "Pneumonia": _fit_blob(0.26, 0.012),
    "Nodule/Mass": _fit_blob(0.38, 0.003), "Nodule": _fit_blob(0.38, 0.002), "Mass": _fit_blob(0.4, 0.004),
    "Other lesion": _fit_ring, "Pleural effusion": _fit_meniscus, "Effusion": _fit_meniscus,
    "Pleural thickening": _fit_wall, "Pleural_Thickening": _fit_wall, "Pneumothorax": _fit_air,
    "Pulmonary fibrosis": _fit_net(0.3, 0.22), "Fibrosis": _fit_net(0.3, 0.22), "Edema": _fit_blob(0.2, 0.05),
    "Emphysema": _fit_lucent, "Hernia": _fit_bubble,
}


LUNG = 0.14  # the phantom's lung density
REAL_CONTRAST = 0.6  # a lesion's share of its phantom contrast in real anatomy (the full one saturates the heart)


def _added(look: Callable, d: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """``look`` as an added attenuation, for real anatomy: drawn on a lung-density field and added
    to ``d`` as its difference from that field (times :data:`REAL_CONTRAST`). In the display (log)
    domain attenuations add, so the same lesion shows on a rib or the heart as on the lung, where a
    look that sets a density (an enlarged heart at 0.66) would vanish in anatomy already brighter."""
    ref = np.full(d.shape, LUNG, np.float32)
    look(ref, box, rng)
    d += REAL_CONTRAST * (ref - LUNG)


def _pixels(row, w: int, h: int) -> Box:
    """A geometry row (cx, cy, width, height shares) as a box in a w x h image, at least 2 px a side."""
    cx, cy, bw, bh = row
    bw, bh = max(bw * w, 2.0), max(bh * h, 2.0)
    x0, y0 = min(max(cx * w - bw / 2, 0.0), w - 2.0), min(max(cy * h - bh / 2, 0.0), h - 2.0)
    return float(round(x0)), float(round(y0)), float(round(min(x0 + bw, w))), float(round(min(y0 + bh, h)))


def _finding_set(profile: dict, rng: np.random.Generator) -> list[int]:
    sets, counts = profile["_sets"]
    return sets[int(rng.choice(len(sets), p=counts))]


def prepared(profile: dict) -> dict:
    """A loaded profile with its sampling arrays ready (sets as probabilities)."""
    if "_sets" not in profile and "sets" in profile:  # RSNA's profile has one class: no finding sets
        counts = np.array([c for _, c in profile["sets"]], np.float64)
        profile["_sets"] = ([ids for ids, _ in profile["sets"]], counts / counts.sum())
    return profile


@dataclass
class Reading:
    """One image of a profile: its findings' boxes (what is drawn) and each reader's boxes."""

    findings: list[tuple[int, Box]]  # class id, drawn box (pixels)
    marks: list[tuple[str, int, Box]]  # reader, class id, box: the label table's rows
    readers: list[str]


def draw_vinbig(profile: dict, rng: np.random.Generator, w: int, h: int, normal_fraction: float,
                split: str = "train") -> Reading:
    """Draw one VinBigData image's truth from the profile: a finding set; per finding, how many of
    the 3 readers mark it and how many boxes each draws, the boxes from the class's geometry and each
    reader's jittered copy. ``split="test"``: one consensus reading (every finding once, no jitter)."""
    readers = ["consensus"] if split == "test" else [f"R{k}" for k in rng.choice(np.arange(1, 18), 3, replace=False)]
    if rng.random() < normal_fraction:
        return Reading([], [], readers)
    findings, marks = [], []
    for cid in _finding_set(profile, rng):
        stats = profile["classes"][VINBIG.findings[cid]]
        geometry = stats["geometry"]
        per_box = np.array(stats["boxes_per_reader"]) / np.sum(stats["boxes_per_reader"])
        k = 1 if split == "test" else 1 + int(rng.choice(3, p=np.array(stats["readers"]) / np.sum(stats["readers"])))
        marking = rng.choice(len(readers), k, replace=False)
        n_boxes = [1 + int(rng.choice(len(per_box), p=per_box)) for _ in marking]
        pool = [_pixels(geometry[int(rng.integers(len(geometry)))], w, h) for _ in range(max(n_boxes))]
        findings += [(cid, box) for box in pool]  # each lesion drawn is marked by one reader at least
        sd = 0.0 if split == "test" else 1.4826 * stats["jitter"]  # the median absolute offset as a normal's sd
        for r, n_box in zip(marking, n_boxes):
            marks += [(readers[r], cid, box if sd == 0 else _jitter(box, rng, w, h, sd)) for box in pool[:n_box]]
    return Reading(findings, marks, readers)


def draw_nih(profile: dict, rng: np.random.Generator, size: int, normal_fraction: float) -> list[tuple[int, Box | None]]:
    """Draw one NIH image's findings from the profile: (class id, box from the box list's geometry for
    the 8 boxed classes; None for the 6 label-only ones)."""
    if rng.random() < normal_fraction:
        return []
    out = []
    for cid in _finding_set(profile, rng):
        geometry = profile["classes"].get(NIH.findings[cid], {}).get("geometry")
        out.append((cid, _pixels(geometry[int(rng.integers(len(geometry)))], size, size) if geometry else None))
    return out


def draw_rsna(profile: dict, rng: np.random.Generator, size: int, normal_fraction: float) -> list[Box]:
    """Draw one RSNA image's opacity boxes from the profile: none, or 1-4 boxes from the release's
    geometry, a second box mostly in the other lung (as the release's ``sides`` share says)."""
    if rng.random() < normal_fraction:
        return []
    per_image = np.array(profile["boxes_per_positive"]) / np.sum(profile["boxes_per_positive"])
    geometry = profile["classes"]["Lung Opacity"]["geometry"]
    rows = [list(geometry[int(rng.integers(len(geometry)))]) for _ in range(1 + int(rng.choice(len(per_image),
                                                                                                 p=per_image)))]
    if len(rows) >= 2 and rng.random() < profile["sides"] and (rows[0][0] > 0.5) == (rows[1][0] > 0.5):
        rows[1][0] = 1 - rows[1][0]  # mirrored into the other lung
    return [_pixels(row, size, size) for row in rows]


def _rsna_id(seed: int, index: int) -> str:
    """A patientId shaped as RSNA's (a UUID), fixed by the seed and the index."""
    return str(uuid.UUID(bytes=np.random.default_rng([seed, index, 7]).bytes(16), version=4))


# --- real anatomy: findings inserted into the user's normal radiographs

class Backgrounds:
    """Normal radiographs (``--backgrounds DIR``) for findings to be inserted into, split between the
    training and the test sets by file (the test anatomy is unseen), each use augmented: a flip, a crop,
    a gamma and contrast change and a small elastic warp. A finding is added in the display
    (log-attenuation) domain, where attenuations add, as lesion-insertion studies blend (:func:`_added`)."""

    def __init__(self, folder: str | Path, split: str):
        from cxrcam.data.images import IMAGE_SUFFIXES, read_image

        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CxrcamError(f"--backgrounds {folder}: no images (DICOM, PNG, JPEG) found")
        test = [f for f in files if for_test(f.name)] or files[-1:]
        chosen = test if split == "test" else ([f for f in files if f not in test] or files)
        self.images = []
        for f in chosen:
            try:
                self.images.append(read_image(f).image.astype(np.float32) / 255)
            except Exception as exc:  # noqa: BLE001 - a background that cannot be read is named, not fatal
                warnings.warn(f"--backgrounds: {f} is left out ({exc})", stacklevel=2)
        if not self.images:
            raise CxrcamError(f"--backgrounds {folder}: none of the {split} backgrounds could be read")
        self.files = chosen

    def draw(self, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, Anatomy]:
        """One augmented background at h x w, and the phantom's anatomy as its assumed geometry."""
        image = self.images[int(rng.integers(len(self.images)))]
        ih, iw = image.shape
        keep = rng.uniform(0.85, 1.0)
        ch, cw = int(ih * keep), int(iw * keep)
        y, x = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
        d = cv2.resize(image[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            d = d[:, ::-1]
        d = np.clip((d ** rng.uniform(0.8, 1.25) - 0.5) * rng.uniform(0.85, 1.15) + 0.5, 0, 1)
        flow = [cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), w / 8) for _ in range(2)]
        flow = [f / (np.abs(f).max() + 1e-6) * 0.01 * w for f in flow]
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        d = cv2.remap(np.ascontiguousarray(d, np.float32), gx + flow[0], gy + flow[1], cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REFLECT)
        return d.astype(np.float32), Anatomy(h, w, [(0.31, 0.44, 0.14, 0.29), (0.69, 0.44, 0.13, 0.29)],
                                             (0.55, 0.63, 0.12, 0.1), (0.565, 0.27, 0.03))


def for_test(name: str) -> bool:
    """Whether a background file serves the test set only (a stable third of the files, by name)."""
    return zlib.crc32(name.encode()) % 3 == 0


def _image_id(seed: int, index: int) -> str:
    return hashlib.md5(f"cxrcam-{seed}-{index}".encode()).hexdigest()


def _jitter(box: Box, rng: np.random.Generator, w: int, h: int, sd: float = 0.06) -> Box:
    """One reader's copy of a box: each edge moved by a normal share ``sd`` of the box's side."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    x0, x1 = x0 + rng.normal(0, sd) * bw, x1 + rng.normal(0, sd) * bw
    y0, y1 = y0 + rng.normal(0, sd) * bh, y1 + rng.normal(0, sd) * bh
    x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 1), w)))
    y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 1), h)))
    return float(round(x0)), float(round(y0)), float(round(max(x1, x0 + 2))), float(round(max(y1, y0 + 2)))


def dicom_dataset(pixels: np.ndarray, bits_stored: int, signed: bool = False, mono1: bool = False):
    """A minimal valid single-frame greyscale DICOM (uncompressed) holding ``pixels``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, int(signed)
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixels.dtype.itemsize * 8, bits_stored, bits_stored - 1
    ds.PixelData = pixels.tobytes()
    return ds


def write_dicom(path: Path, density: np.ndarray, rng: np.random.Generator) -> None:
    """16-bit DICOM with the variety real VinBigData files show: bit depth, polarity,
    window and rescale tags. Displayed correctly, every variant looks the same."""
    bits = int(rng.choice([12, 14, 16]))
    top = 2 ** bits - 1
    mono1 = rng.random() < 0.3
    stored = np.round(density * top * 0.85 + top * 0.05).astype(np.uint16)
    if mono1:
        stored = (top - stored).astype(np.uint16)
    ds = dicom_dataset(stored, bits, mono1=mono1)
    ds.PatientID = path.stem[:16]
    if rng.random() < 0.3:  # a rescale in front of the window
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1000, "US"
    if rng.random() < 0.5:  # a window spanning the phantom's range
        lo, hi = float(stored.min()), float(stored.max())
        offset = float(ds.get("RescaleIntercept", 0))
        ds.WindowCenter = round((lo + hi) / 2 + offset, 1)
        ds.WindowWidth = round((hi - lo) * 0.98, 1)
    ds.save_as(path, enforce_file_format=True)


def written(fmt: str, split: str = "train") -> tuple[str, ...]:
    """The files and folders a dataset of ``fmt`` (and VinBigData ``split``) consists of in its folder."""
    if fmt == "vinbig":
        return f"{split}.csv", split
    if fmt == "rsna":
        return "stage_2_train_labels.csv", "stage_2_train_images"
    return "Data_Entry_2017.csv", "BBox_List_2017.csv", "test_list.txt", "train_val_list.txt", "images"


PROFILES = ("vinbig", "nih", "rsna", "uniform")  # the tables a set is drawn from; uniform: the generator of before
FORMATS = ("vinbig", "nih", "rsna")
LABEL_TABLE = {"nih": "Data_Entry_2017.csv", "rsna": "stage_2_train_labels.csv"}  # vinbig: <split>.csv


def synthesize(fmt: str, out: str | Path, n_images: int, seed: int = 0, size: int = 512,
               progress: bool = True, split: str = "train", overwrite: bool = False,
               normal_fraction: float | None = None, profile: str | None = None,
               backgrounds: str | Path | None = None) -> Path:
    """Write a dataset of ``n_images`` images in the real layout of ``fmt`` (vinbig, nih, rsna).

    ``profile`` (default: ``fmt``'s own) draws the finding sets, readers and boxes from the
    release's statistics (:mod:`cxrcam.data.profiles`); ``uniform`` is the earlier generator (a flat
    class mix, 1-3 findings), which reproduces old figures. Each image is normal with probability
    ``normal_fraction`` (default: the profile's; 2/3 for uniform). ``backgrounds``: a folder of
    normal radiographs the findings are inserted into (:class:`Backgrounds`) instead of a phantom.
    VinBigData ``split="test"``: a labelled held-out set, ``test.csv`` + ``test/`` (with a profile, one
    consensus reading per finding). A folder that already holds a dataset is refused unless
    ``overwrite``; its files are then removed first."""
    if fmt not in FORMATS:
        raise CxrcamError(f"unknown synthetic format {fmt!r}; choose {', '.join(FORMATS)}")
    profile = profile or fmt
    if profile not in PROFILES:
        raise CxrcamError(f"unknown synthetic profile {profile!r}; choose {', '.join(PROFILES)}")
    if profile not in (fmt, "uniform") or (fmt == "rsna" and profile != "rsna"):
        raise CxrcamError(f"--profile {profile} draws {profile}'s classes; --format {fmt} takes --profile {fmt}"
                          + ("" if fmt == "rsna" else " or uniform"))
    if n_images < 1:
        raise CxrcamError("--n-images must be at least 1")
    stats = None if profile == "uniform" else prepared(load_profile(profile))
    if normal_fraction is None:
        normal_fraction = NORMAL_FRACTION if stats is None else stats["normal_share"]
    if not 0 <= normal_fraction <= 1:
        raise CxrcamError(f"--normal-fraction must be in [0, 1], got {normal_fraction}")
    out = Path(out)
    if split not in ("train", "test") or (split == "test" and fmt != "vinbig"):
        raise CxrcamError(f"split {split!r}: vinbig writes train or test, {fmt} writes its released layout")
    table = out / (f"{split}.csv" if fmt == "vinbig" else LABEL_TABLE[fmt])
    if table.exists() and not overwrite:
        raise CxrcamError(f"{table} exists: {out} already holds a dataset; choose another --out or pass --overwrite")
    real = Backgrounds(backgrounds, split) if backgrounds else None
    for name in written(fmt, split):  # --overwrite: nothing of the old dataset stays beside the new one
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if fmt == "vinbig":
        _write_vinbig(out, n_images, seed, size, progress, split, normal_fraction, stats, real)
    elif fmt == "rsna":
        _write_rsna(out, n_images, seed, size, progress, normal_fraction, stats, real)
    else:
        _write_nih(out, n_images, seed, size, progress, normal_fraction, stats, real)
    return out


def _write_rsna(out: Path, n: int, seed: int, size: int, progress: bool, normal_fraction: float, profile: dict,
                backgrounds: Backgrounds | None = None) -> None:
    """RSNA's released layout: ``stage_2_train_labels.csv`` (a row per box, Target 1; one empty row,
    Target 0, for an image without) and ``stage_2_train_images/<patientId>.dcm``, 8-bit MONOCHROME2
    square DICOM as released."""
    (out / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in progress_bar(range(n), desc="synth rsna", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, i])
        base = backgrounds.draw(size, size, rng) if backgrounds else None
        d, _ = base or render_normal(size, size, rng)
        boxes = draw_rsna(profile, rng, size, normal_fraction)
        for box in boxes:
            _added(FITTED["Lung Opacity"], d, box, rng) if base else FITTED["Lung Opacity"](d, box, rng)
        patient = _rsna_id(seed, i)
        pixels = np.round(_finish(d, rng) * 255).astype(np.uint8)
        ds = dicom_dataset(pixels, 8)
        ds.PatientID = patient
        ds.save_as(out / "stage_2_train_images" / f"{patient}.dcm", enforce_file_format=True)
        rows += [(patient, x0, y0, x1 - x0, y1 - y0, 1) for x0, y0, x1, y1 in boxes] or [(patient, "", "", "", "", 0)]
    with open(out / "stage_2_train_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)


def _write_vinbig(out: Path, n: int, seed: int, size: int, progress: bool, split: str,
                  normal_fraction: float, profile: dict | None = None, backgrounds: Backgrounds | None = None) -> None:
    (out / split).mkdir(parents=True, exist_ok=True)
    readers = [f"R{i}" for i in range(1, 18)]
    rows = []
    for i in progress_bar(range(n), desc="synth vinbig", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, i])
        w = int(size * rng.uniform(0.8, 1.15))
        h = int(w * rng.uniform(1.0, 1.3))  # portrait, non-square, like most VinBigData films
        base = backgrounds.draw(h, w, rng) if backgrounds else None
        image_id = _image_id(seed, i)
        if profile is not None:
            d, _ = base or render_normal(h, w, rng)
            reading = draw_vinbig(profile, rng, w, h, normal_fraction, split)
            for cid, box in reading.findings:
                look = FITTED[VINBIG.findings[cid]]
                _added(look, d, box, rng) if base else look(d, box, rng)
            write_dicom(out / split / f"{image_id}.dicom", _finish(d, rng), rng)
            marked = {r for r, _, _ in reading.marks}
            rows += [(image_id, VINBIG.findings[c], c, r, *box) for r, c, box in reading.marks]
            rows += [(image_id, "No finding", 14, r, "", "", "", "") for r in reading.readers if r not in marked]
            continue
        img = synth_image("vinbig", h, w, rng, normal_fraction, base)
        write_dicom(out / split / f"{image_id}.dicom", img.density, rng)
        rads = rng.choice(readers, size=3, replace=False)
        if not img.findings:
            rows += [(image_id, "No finding", 14, r, "", "", "", "") for r in rads]
            continue
        # Readers miss findings (soft labels), but every finding has at least one reader and
        # every reader marks something, as in the real train.csv.
        marked = rng.random((3, len(img.findings))) < 0.85
        marked[rng.integers(3, size=len(img.findings)), np.arange(len(img.findings))] = True
        marked[np.arange(3), rng.integers(len(img.findings), size=3)] |= ~marked.any(axis=1)
        for k, rad in enumerate(rads):
            for cid, box in (f for f, m in zip(img.findings, marked[k]) if m):
                rows.append((image_id, VINBIG.findings[cid], cid, rad, *_jitter(box, rng, w, h)))
    with open(out / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        writer.writerows(rows)


def _write_nih(out: Path, n: int, seed: int, size: int, progress: bool, normal_fraction: float,
               profile: dict | None = None, backgrounds: Backgrounds | None = None) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    box_classes = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                   "Pneumonia", "Pneumothorax"}
    entries, boxes = [], []
    patient, follow = 0, 0
    for i in progress_bar(range(n), desc="synth nih", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, i])
        if i == 0 or rng.random() > 0.3:  # some patients have follow-up images
            patient, follow = patient + 1, 0
        else:
            follow += 1
        name = f"{patient:08d}_{follow:03d}.png"
        base = backgrounds.draw(size, size, rng) if backgrounds else None
        if profile is not None:
            d, anatomy = base or render_normal(size, size, rng)
            findings = draw_nih(profile, rng, size, normal_fraction)
            for cid, box in findings:  # a boxed class fitted to its drawn box; the others as the phantom's
                if box is None:
                    LOOKS["nih"][NIH.findings[cid]](d, anatomy, rng)
                elif base:
                    _added(FITTED[NIH.findings[cid]], d, box, rng)
                else:
                    FITTED[NIH.findings[cid]](d, box, rng)
            img = SynthImage(_finish(d, rng), findings)
        else:
            img = synth_image("nih", size, size, rng, normal_fraction, base)
        cv2.imwrite(str(out / "images" / name), np.round(img.density * 255).astype(np.uint8))
        labels = sorted({NIH.findings[c] for c, _ in img.findings}) or ["No Finding"]
        entries.append((name, "|".join(labels), follow, patient, int(rng.integers(20, 80)),
                        rng.choice(["M", "F"]), "PA", size, size, 0.143, 0.143))
        for cid, box in img.findings:
            if box is None or NIH.findings[cid] not in box_classes:
                continue
            if profile is not None or rng.random() < 0.7:  # a profile boxes every boxed-class finding
                x0, y0, x1, y1 = box
                label = "Infiltrate" if NIH.findings[cid] == "Infiltration" else NIH.findings[cid]
                boxes.append((name, label, x0, y0, x1 - x0, y1 - y0))
    with open(out / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                         "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                         "OriginalImagePixelSpacing[x", "y]"])
        writer.writerows(entries)
    with open(out / "BBox_List_2017.csv", "w", newline="") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        csv.writer(f).writerows(boxes)
    patients = sorted({e[3] for e in entries})
    test_patients = set(np.random.default_rng(seed).permutation(patients)[: max(1, len(patients) // 5)].tolist())
    (out / "test_list.txt").write_text("".join(f"{e[0]}\n" for e in entries if e[3] in test_patients))
    (out / "train_val_list.txt").write_text("".join(f"{e[0]}\n" for e in entries if e[3] not in test_patients))
