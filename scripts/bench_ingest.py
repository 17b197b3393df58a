"""Benchmark: DICOM -> cached 512 px image, cxrcam vs the public VinBigData notebook approach.

Same files, same process, one core each (a `prepare` worker is one process per core):
  notebook  `apply_voi_lut(pixel_array)` on the full image in float, MONOCHROME1 fix,
            min-max to uint8, then `cv2.resize` (the widely copied `read_xray`);
  cxrcam    `cxrcam.data.images.read_image(path, 512)`;
  exact     the full pipeline on every pixel in float64, area resize, rounded once.
Accuracy is the mean absolute difference to `exact` in grey levels (0-255).
The files carry real chest pixels: the NIH images in ../shared/data/nih, scaled to the
common VinBigData sizes as 12-bit DICOM (some MONOCHROME1, some windowed), plus the real
JPEG-compressed DICOM in ../shared/data/dicom.

    python scripts/bench_ingest.py [--n 24] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxrcam.data.images import read_image  # noqa: E402
from cxrcam.data.synth import write_dicom  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = [(2430, 1994), (3072, 3072), (2880, 2304)]  # most common VinBigData (rows, cols)


def notebook(path: Path, size: int) -> np.ndarray:
    dicom = pydicom.dcmread(path)
    data = apply_voi_lut(dicom.pixel_array, dicom)
    if dicom.PhotometricInterpretation == "MONOCHROME1":
        data = np.amax(data) - data
    data = data - np.min(data)
    data = data / np.max(data)
    data = (data * 255).astype(np.uint8)
    return cv2.resize(data, (size, size))


def exact(path: Path, size: int) -> np.ndarray:
    ds = pydicom.dcmread(path)
    v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = 1 - v
    return np.rint(cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA) * 255)


def make_files(folder: Path, n: int) -> list[Path]:
    pngs = sorted((SHARED / "nih" / "images").glob("*.png"))
    files = []
    for i in range(n):
        rng = np.random.default_rng(i)
        grey = read_image(pngs[i % len(pngs)]).image.astype(np.float32) / 255
        rows, cols = SIZES[i % len(SIZES)]
        density = cv2.resize(grey, (cols, rows), interpolation=cv2.INTER_CUBIC)
        density = np.clip(density + rng.normal(0, 0.004, density.shape).astype(np.float32), 0, 1)
        files.append(folder / f"{i}.dicom")
        write_dicom(files[-1], density, rng)  # bit depth, polarity, window, rescale vary
    files.append(SHARED / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    return files


def timed(fn, files, size, repeat) -> tuple[float, list[np.ndarray]]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        outs = [fn(f, size) for f in files]
        best = min(best, time.perf_counter() - start)
    return len(files) / best, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.n)
        for f in files[:2]:  # warm the page cache and imports
            notebook(f, args.size), read_image(f, args.size)
        ref = [exact(f, args.size) for f in files]
        nb_rate, nb = timed(notebook, files, args.size, args.repeat)
        our_rate, ours = timed(lambda f, s: read_image(f, s).image, files, args.size, args.repeat)
    err = lambda outs: float(np.mean([np.abs(o.astype(np.float64) - r).mean() for o, r in zip(outs, ref)]))  # noqa: E731
    worst = lambda outs: float(max(np.abs(o.astype(np.float64) - r).max() for o, r in zip(outs, ref)))  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"files: {len(files)} DICOM ({args.n} of {', '.join(f'{r}x{c}' for r, c in SIZES)}, 12-16 bit, + 1 real JPEG), "
          f"to {args.size} px, best of {args.repeat}, one core")
    print("| method | images/s (one core) | mean abs diff to exact (grey levels) | max abs diff |")
    print("|---|---|---|---|")
    print(f"| notebook read_xray + cv2.resize | {nb_rate:.2f} | {err(nb):.3f} | {worst(nb):.0f} |")
    print(f"| cxrcam read_image | {our_rate:.2f} | {err(ours):.3f} | {worst(ours):.0f} |")
    print(f"speed-up: {our_rate / nb_rate:.2f}x")


if __name__ == "__main__":
    main()
