"""Typed configuration and the one place class lists live."""
from __future__ import annotations

import colorsys


import pytest

from cxrcam.config import SHIPPED, load_config
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH, RSNA, VINBIG, get_schema

CONFIGS = SHIPPED  # the configs the package ships


def test_defaults_file_and_overrides(tmp_path):
    assert load_config().fusion.iou_thr == 0.4
    path = tmp_path / "c.yaml"
    path.write_text("fusion:\n  method: union\nprepare:\n  size: 256\n")
    config = load_config(path, ["fusion.iou_thr=0.55", "split.seed=3"])
    assert (config.fusion.method, config.fusion.iou_thr, config.prepare.size, config.split.seed) == \
        ("union", 0.55, 256, 3)
    assert load_config(path, ["prepare.size=64"]).prepare.size == 64  # override wins over the file


def test_default_yaml_documents_every_key_with_its_default():
    """configs/default.yaml holds every section and key the code defines, at the built-in value."""
    import dataclasses

    import yaml

    from cxrcam.config import Config

    written = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    defaults = dataclasses.asdict(Config())
    assert list(written) == list(defaults)  # every section, in the code's order
    for section, keys in defaults.items():
        assert set(written[section]) == set(keys), section
    assert load_config(CONFIGS / "default.yaml") == Config()


def test_shipped_configs_load():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("fusion.iuo_thr=0.5", "unknown config key 'fusion.iuo_thr'"),
    ("fusoin.iou_thr=0.5", "unknown config key 'fusoin'"),
    ("fusion.method=nms", "'fusion.method'.*not one of wbf, majority, reader, union"),
    ("prepare.size=big", "'prepare.size': expected an integer, got 'big'"),
    ("detector.box_images=some", "'detector.box_images': 'some' is not an integer or 'none'$"),
    ("boxes.min_prob=high", "'boxes.min_prob': 'high' is not a number or 'auto'$"),
    ("prepare.size", "not of the form"),
    ("boxes.threshhold=0.5", "unknown config key 'boxes.threshhold'; did you mean 'boxes.threshold'"),
    ("boxs.threshold=0.5", "did you mean 'boxes'"),
    ("prepare.workers=-2", "'prepare.workers': -2 must be at least 0"),
    ("cam.batch_size=0", "'cam.batch_size': 0 must be at least 1"),
    ("boxes.threshold=1.5", "'boxes.threshold': 1.5 must be between 0.0 and 1.0"),
    ("train.lr=0", "'train.lr': 0.0 must be above 0"),
    ("detector.pseudo_weight=.nan", "'detector.pseudo_weight': nan must be above 0"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(CxrcamError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  sise: 256\n")
    with pytest.raises(CxrcamError, match="'prepare.sise'"):
        load_config(path)


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrcamError, match="weights.yaml is not a text"):
        load_config(path)


def test_schemas():
    assert VINBIG.num_findings == 14 and VINBIG.no_finding_id == 14
    assert VINBIG.class_id("No finding") == 14 and VINBIG.class_name(8) == "Nodule/Mass"
    assert NIH.class_id("Infiltrate") == NIH.class_id("Infiltration") == 3
    assert RSNA.findings == ("Lung Opacity",) and RSNA.no_finding_id is None
    assert len({VINBIG.colour(i) for i in range(15)}) == 15
    for i in range(20):  # no class colour can be taken for the yellow of the truth boxes
        hue, saturation, _ = colorsys.rgb_to_hsv(*(v / 255 for v in VINBIG.colour(i)))
        assert abs(hue * 360 - 60) > 20 or saturation < 0.2, (i, VINBIG.colour(i))
    with pytest.raises(KeyError, match="unknown dataset"):
        get_schema("chexpert")
