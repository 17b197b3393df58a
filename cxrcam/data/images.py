"""Decode chest radiographs (DICOM, PNG, JPEG) to 8-bit grey, optionally resized.

DICOM follows the display pipeline every reader of these datasets needs:
stored pixels -> modality LUT (rescale) -> VOI LUT or window -> MONOCHROME1 inversion ->
[0, 1] output range. Stored pixels are integers, so the pipeline is evaluated once per
distinct stored value as a lookup table and then gathered; that is exact (the same numbers
as running it on every pixel in float) and several times cheaper. Resizing uses area
averaging on the full-precision result, then rounds to 8 bits once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxrcam.errors import ImageReadError

DICOM_SUFFIXES = (".dicom", ".dcm")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = DICOM_SUFFIXES + RASTER_SUFFIXES

_PLUGIN_HINT = (
    "its transfer syntax ({}) needs a decoder plugin: pip install 'cxrcam[jpeg]' "
    "(pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg)"
)


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
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            img01 = _dicom_to_unit(path)
        else:
            img01 = _raster_to_unit(path)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as exc:  # decoders raise many types; all mean "unreadable"
        raise ImageReadError(f"{path}: {type(exc).__name__}: {exc}") from None
    h, w = img01.shape
    if size is not None:
        tw, th = (size, size) if isinstance(size, int) else size
        if (tw, th) != (w, h):
            img01 = cv2.resize(img01, (tw, th), interpolation=cv2.INTER_AREA)
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


def _dicom_to_unit(path: Path) -> np.ndarray:
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
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: expected a greyscale image, got shape {stored.shape}")

    def pipeline(values: np.ndarray) -> np.ndarray:
        return apply_voi_lut(apply_modality_lut(values, ds), ds).astype(np.float64)

    if np.issubdtype(stored.dtype, np.integer):
        # Unsigned data indexes the table directly; signed data is shifted to start at 0.
        lo = min(int(stored.min()), 0)
        index = stored if lo == 0 else stored.astype(np.int32) - lo
        present = np.bincount(index.ravel()) > 0
        lut = pipeline(np.arange(lo, lo + len(present), dtype=np.int64).astype(stored.dtype))
        vmin, vmax = lut[present].min(), lut[present].max()
        lut = _to_unit(lut, vmin, vmax, ds)
        return lut.astype(np.float32)[index]
    values = pipeline(stored)
    return _to_unit(values, values.min(), values.max(), ds).astype(np.float32)


def _to_unit(values: np.ndarray, vmin: float, vmax: float, ds) -> np.ndarray:
    """Scale to [0, 1] over the image's displayed range; invert MONOCHROME1.
    A constant image maps to 0 (no division by zero, no NaN)."""
    span = vmax - vmin
    out = (values - vmin) / span if span > 0 else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out
