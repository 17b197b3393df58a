"""Image ingest: the DICOM display pipeline, codecs, bit depths, PNG variants, bad files."""
from __future__ import annotations

import subprocess
import sys
import warnings

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxrcam.data.images import image_size, read_image
from cxrcam.data.synth import dicom_dataset
from cxrcam.errors import ImageReadError

from conftest import shared

REAL = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def make_dicom(path, pixels: np.ndarray, bits_stored: int, signed: bool = False, mono1: bool = False,
               window=None, rescale=None):
    ds = dicom_dataset(pixels, bits_stored, signed=signed, mono1=mono1)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.save_as(path, enforce_file_format=True)
    return path


def reference(path, size=None) -> np.ndarray:
    """The exact result, computed the plain way: the full pipeline on every pixel in float64,
    min-max to [0, 1], inversion, then area resizing."""
    ds = pydicom.dcmread(path)
    v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    span = v.max() - v.min()
    v = (v - v.min()) / span if span else np.zeros_like(v)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = 1 - v
    if size:
        v = cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA)
    return v * 255


@pytest.fixture
def chest16() -> np.ndarray:
    """Real chest pixels (NIH) spread over 12 bits, non-square."""
    img = read_image(shared("nih", "images", "00009745_000.png")).image[:900, 100:800]
    rng = np.random.default_rng(0)
    return (img.astype(np.uint16) * 16 + rng.integers(0, 16, img.shape)).astype(np.uint16)


@pytest.mark.parametrize("variant", [
    dict(bits_stored=12),
    dict(bits_stored=12, mono1=True),
    dict(bits_stored=12, window=(1800, 1500)),
    dict(bits_stored=12, window=(800, 2000), rescale=(1, -1000)),
    dict(bits_stored=16, rescale=(2, 0)),
    dict(bits_stored=12, window=(1800, 1500), sigmoid=True),  # not a clamped line: gathered
    dict(bits_stored=12, voi_lut=True),  # an arbitrary table
])
def test_dicom_pipeline_matches_full_resolution_reference(tmp_path, chest16, variant):
    sigmoid, voi_lut = variant.pop("sigmoid", False), variant.pop("voi_lut", False)
    path = make_dicom(tmp_path / "x.dcm", chest16, **variant)
    if sigmoid or voi_lut:
        ds = pydicom.dcmread(path)
        if sigmoid:
            ds.VOILUTFunction = "SIGMOID"
        if voi_lut:  # a gamma-like curve over stored values 500..3500
            item = pydicom.Dataset()
            item.add_new(0x00283002, "US", [3001, 500, 16])  # LUTDescriptor
            item.add_new(0x00283006, "US", (np.linspace(0, 1, 3001) ** 0.6 * 65535).astype(np.uint16).tolist())
            ds.VOILUTSequence = [item]
        ds.save_as(path)
    for size in (None, 256):
        ours = read_image(path, size).image.astype(np.float64)
        exact = reference(path, size)
        assert np.abs(ours - exact).max() <= 0.501  # rounding to 8 bits (+ float32 precision)


def test_window_clips_outside_values(tmp_path, chest16):
    path = make_dicom(tmp_path / "w.dcm", chest16, 12, window=(1800, 600))
    img = read_image(path).image
    assert (img[chest16 < 1500] == 0).all()
    assert (img[chest16 > 2100] == 255).all()


def test_signed_12_bit(tmp_path, chest16):
    signed = (chest16.astype(np.int32) - 2048).astype(np.int16)
    path = make_dicom(tmp_path / "s.dcm", signed, 12, signed=True)
    ours = read_image(path).image.astype(np.float64)
    assert np.abs(ours - reference(path)).max() <= 0.501
    unsigned = read_image(make_dicom(tmp_path / "u.dcm", chest16, 12)).image
    assert np.array_equal(ours, unsigned)  # same picture whatever the pixel representation


def test_8_bit_dicom(tmp_path):
    pixels = np.tile(np.arange(256, dtype=np.uint8), (10, 1))
    img = read_image(make_dicom(tmp_path / "e.dcm", pixels, 8)).image
    assert np.array_equal(img, pixels)


def test_rgb_dicom_is_converted_like_an_rgb_png(tmp_path):
    """A colour (secondary capture) DICOM reads as the grey a PNG of the same pixels gives."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    rgb[..., 1] = rgb[..., 0] // 2  # channels differ, so the conversion weights matter
    ds = dicom_dataset(rgb[..., 0], 8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "colour.dcm", enforce_file_format=True)
    cv2.imwrite(str(tmp_path / "colour.png"), rgb[..., ::-1])  # OpenCV writes BGR
    dicom, png = read_image(tmp_path / "colour.dcm"), read_image(tmp_path / "colour.png")
    assert (dicom.orig_height, dicom.orig_width) == (40, 56)
    assert np.abs(dicom.image.astype(int) - png.image.astype(int)).max() <= 1


def test_constant_image_has_no_nan(tmp_path):
    path = make_dicom(tmp_path / "c.dcm", np.full((40, 30), 1234, np.uint16), 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning either
        img = read_image(path, 16).image
    assert img.shape == (16, 16) and (img == 0).all()


def test_real_jpeg_dicom_and_monochrome1_inversion():
    normal = read_image(shared("dicom", REAL))
    inverted = read_image(shared("dicom", "Fake_MONOHR1.dcm"))
    assert (normal.orig_height, normal.orig_width) == (1024, 1024)
    assert normal.image.std() > 20  # a real picture, not a blank
    # same stored pixels, opposite polarity: the two displays add up to white
    total = normal.image.astype(int) + inverted.image.astype(int)
    assert np.abs(total - 255).max() <= 1
    assert image_size(shared("dicom", REAL)) == (1024, 1024)


def test_jpeg2000_dicom_with_plugin(tmp_path, chest16):
    pytest.importorskip("openjpeg")
    from pydicom.uid import JPEG2000Lossless

    path = make_dicom(tmp_path / "j.dcm", chest16, 12)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm")
    assert pydicom.dcmread(tmp_path / "j2k.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(read_image(tmp_path / "j2k.dcm").image, read_image(path).image)


def test_missing_codec_plugin_gives_install_hint(tmp_path, chest16):
    """Without pylibjpeg-openjpeg a JPEG 2000 file says how to fix it, not a decoder stack."""
    pytest.importorskip("openjpeg")
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(make_dicom(tmp_path / "j.dcm", chest16, 12))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm")
    # the state of a machine without a JPEG 2000 plugin: pydicom's decoder has none to call
    code = ("from pydicom.pixels import get_decoder\n"
            "from pydicom.uid import JPEG2000Lossless\n"
            "d = get_decoder(JPEG2000Lossless)\n"
            "for label in list(d.available_plugins) + list(d.missing_dependencies):\n"
            "    d.remove_plugin(label.split(' ')[0].rstrip(':'))\n"
            "from cxrcam.data.images import read_image\n"
            "from cxrcam.errors import ImageReadError\n"
            f"try:\n    read_image({str(tmp_path / 'j2k.dcm')!r})\n"
            "except ImageReadError as e:\n    print('MSG', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MSG" in out.stdout, out.stderr
    assert "cxrcam[jpeg]" in out.stdout and "JPEG 2000" in out.stdout


@pytest.mark.parametrize("kind", ["grey8", "rgb", "rgba", "grey16"])
def test_png_variants(tmp_path, kind):
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    data = {"grey8": grey, "rgb": cv2.merge([grey] * 3), "rgba": cv2.merge([grey] * 3 + [np.full_like(grey, 7)]),
            "grey16": grey.astype(np.uint16) * 257}[kind]
    cv2.imwrite(str(tmp_path / "x.png"), data)
    out = read_image(tmp_path / "x.png")
    assert (out.orig_height, out.orig_width) == (48, 64)
    assert np.abs(out.image.astype(int) - grey).max() <= 1
    assert read_image(tmp_path / "x.png", (32, 24)).image.shape == (24, 32)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_files_raise_readable_error(tmp_path, content):
    for name in ("bad.png", "bad.dcm"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)


def test_truncated_dicom_pixels(tmp_path, chest16):
    path = make_dicom(tmp_path / "t.dcm", chest16, 12)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.dcm"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.dcm")
