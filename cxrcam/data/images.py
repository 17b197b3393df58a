"""Decode chest radiographs (DICOM, PNG, JPEG) to 8-bit grey, optionally resized.

DICOM follows the display pipeline every reader of these datasets needs:
stored pixels -> modality LUT (rescale) -> VOI LUT or window -> MONOCHROME1 inversion ->
[0, 1] output range. Stored pixels are integers, so the pipeline is evaluated once per
possible stored value as a table. When that table is a line clamped at both ends (rescale
and LINEAR windows, the usual case) the image is clipped at the knees, area-resized, and the
line applied to the small image: area averaging commutes with a linear map, so this is
exact and touches each full-resolution pixel twice. Other tables (SIGMOID, LUT sequences)
are gathered pixel by pixel, then resized. Either way the result matches running the
pipeline on every pixel in float and area-resizing, rounded to 8 bits once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxrcam.errors import ImageReadError

# a decoder's own warning line ("[ WARN:0@2.6] global grfmt_png.cpp ...") would stand beside cxrcam's
# failure report of the same file: errors only (each worker process imports this module too)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

DICOM_SUFFIXES = (".dicom", ".dcm")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = DICOM_SUFFIXES + RASTER_SUFFIXES

_PLUGIN_HINT = (
    "its transfer syntax ({}) needs a decoder plugin: pip install 'cxrcam[jpeg]' "
    "(pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg)"
)


ASPECT_LIMIT = 2.0  # a side more than twice the other is squashed visibly by the square resize


def warn_squashed(sizes: dict[str, tuple[float, float]]) -> None:
    """One warning for the images (id -> original height, width) that the square model input
    squashes by more than ``ASPECT_LIMIT``: their maps and boxes are distorted; crop them first."""
    odd = {i: hw for i, hw in sizes.items() if min(hw) > 0 and max(hw) / min(hw) > ASPECT_LIMIT}
    if odd:
        image_id, (h, w) = next(iter(odd.items()))
        warnings.warn(f"{len(odd)} image(s) more than {ASPECT_LIMIT:g}x wider than tall or taller than wide "
                      f"(e.g. {image_id}: {w:g} x {h:g}) are squashed to a square; crop them to the chest "
                      f"for undistorted maps and boxes", stacklevel=2)


@dataclass
class Decoded:
    image: np.ndarray  # uint8, H x W (resized when a size was asked for)
    orig_height: int
    orig_width: int


def read_image(path: str | Path, size: int | tuple[int, int] | None = None) -> Decoded:
    """Read one radiograph as 8-bit grey; ``size`` (square side or (w, h)) resizes it.

    Any failure (missing file, corrupt data, unsupported codec) raises
    :class:`ImageReadError` with a readable reason, so batch jobs can skip and report it.
    """
    path = Path(path)
    target = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            img01, (h, w) = _dicom_to_unit(path, target)
        else:
            img01 = _raster_to_unit(path)
            h, w = img01.shape
            img01 = _resize(img01, target)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as exc:  # decoders raise many types; all mean "unreadable"
        raise ImageReadError(f"{path}: {type(exc).__name__}: {exc}") from None
    if img01.dtype == np.uint8:
        return Decoded(img01, h, w)
    out = np.empty(img01.shape, np.uint8)
    np.multiply(img01, 255.0, out=img01)
    np.rint(img01, out=img01)
    np.clip(img01, 0, 255, out=img01)
    out[...] = img01
    return Decoded(out, h, w)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def _raster_to_unit(path: Path) -> np.ndarray:
    """PNG/JPEG (grey, RGB, RGBA, 8 or 16 bit) -> uint8 grey or float32 in [0, 1]."""
    data = np.fromfile(path, dtype=np.uint8)  # raises FileNotFoundError
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt or truncated?)")
    if img.ndim == 3:  # colour or alpha: the X-ray is in the colour channels
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}")


def _resize(img: np.ndarray, target: tuple[int, int] | None) -> np.ndarray:
    """Area averaging to (w, h): what every pixel of the original contributes, no aliasing."""
    if target is None or target == (img.shape[1], img.shape[0]):
        return img
    return cv2.resize(img, target, interpolation=cv2.INTER_AREA)


def _linear_knees(lut: np.ndarray) -> tuple[int, int] | None:
    """(k0, k1) if ``lut`` is constant up to k0, linear from k0 to k1 and constant after."""
    k0 = int(np.flatnonzero(lut != lut[0])[0]) - 1 if (lut != lut[0]).any() else 0
    k1 = int(np.flatnonzero(lut != lut[-1])[-1]) + 1 if (lut != lut[-1]).any() else len(lut) - 1
    if k1 <= k0 + 1:
        return k0, k1
    seg = lut[k0:k1 + 1]
    line = np.linspace(seg[0], seg[-1], len(seg))
    if np.abs(seg - line).max() <= 1e-9 * max(abs(seg[-1] - seg[0]), 1e-300):
        return k0, k1
    return None


def _dicom_to_unit(path: Path, target: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as exc:
        raise ImageReadError(f"{path}: not a DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            raise ImageReadError(f"{path}: unsupported transfer syntax {syntax.name}") from None
        if not available:
            raise ImageReadError(f"{path}: " + _PLUGIN_HINT.format(syntax.name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = ds.pixel_array
    if stored.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        stored = stored[0]  # multi-frame: the first frame is the radiograph
    if ds.get("SamplesPerPixel", 1) == 3 and stored.ndim in (3, 4):  # colour (pydicom gives RGB): as PNGs are
        rgb = stored[0] if stored.ndim == 4 else stored
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.dtype == np.uint8 else \
            cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2GRAY)
        return _resize((grey.astype(np.float32) / top), target), grey.shape
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: expected a greyscale image, got shape {stored.shape}")
    shape = stored.shape

    def pipeline(values: np.ndarray) -> np.ndarray:
        return apply_voi_lut(apply_modality_lut(values, ds), ds).astype(np.float64)

    if np.issubdtype(stored.dtype, np.integer):
        # Unsigned data indexes the table directly; signed data is shifted to start at 0.
        smin, smax = int(stored.min()), int(stored.max())
        lo = min(smin, 0)
        index = stored if lo == 0 else stored.astype(np.int32) - lo
        lut = pipeline(np.arange(lo, smax + 1, dtype=np.int64).astype(stored.dtype))
        if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
            present = np.bincount(index.ravel(), minlength=len(lut)) > 0  # any table shape
            vmin, vmax = lut[present].min(), lut[present].max()
        else:  # rescale and windowing are monotone: the extremes sit at the extreme values
            vmin, vmax = sorted((lut[smin - lo], lut[smax - lo]))
        lut = _to_unit(lut, vmin, vmax, ds)
        knees = _linear_knees(lut[smin - lo:])
        if knees is None:
            return _resize(lut.astype(np.float32)[index], target), shape
        k0, k1 = knees[0] + smin, knees[1] + smin  # stored values at the knees
        clipped = np.empty(shape, np.float32)  # clip and widen in one pass
        np.clip(stored, k0, k1, out=clipped, casting="unsafe")
        small = _resize(clipped, target)
        y0, y1 = lut[k0 - lo], lut[k1 - lo]
        slope = (y1 - y0) / (k1 - k0) if k1 > k0 else 0.0
        return (y0 + (small - k0) * slope).astype(np.float32), shape
    values = pipeline(stored)
    unit = _to_unit(values, values.min(), values.max(), ds).astype(np.float32)
    return _resize(unit, target), shape


def _to_unit(values: np.ndarray, vmin: float, vmax: float, ds) -> np.ndarray:
    """Scale to [0, 1] over the image's displayed range; invert MONOCHROME1.
    A constant image maps to 0 (no division by zero, no NaN)."""
    span = vmax - vmin
    out = (values - vmin) / span if span > 0 else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out
