"""Typed configuration and the one place class lists live."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxrcam.config import load_config
from cxrcam.errors import CxrcamError
from cxrcam.schemas import NIH, RSNA, VINBIG, get_schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_file_and_overrides(tmp_path):
    assert load_config().fusion.iou_thr == 0.4
    path = tmp_path / "c.yaml"
    path.write_text("fusion:\n  method: union\nprepare:\n  size: 256\n")
    config = load_config(path, ["fusion.iou_thr=0.55", "split.seed=3"])
    assert (config.fusion.method, config.fusion.iou_thr, config.prepare.size, config.split.seed) == \
        ("union", 0.55, 256, 3)
    assert load_config(path, ["prepare.size=1"]).prepare.size == 1  # override wins over the file


def test_shipped_configs_load():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("fusion.iuo_thr=0.5", "unknown config key 'fusion.iuo_thr'"),
    ("fusoin.iou_thr=0.5", "unknown config key 'fusoin'"),
    ("fusion.method=nms", "'fusion.method'.*not one of wbf, reader, union"),
    ("prepare.size=big", "'prepare.size': expected int"),
    ("prepare.size", "not of the form"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(CxrcamError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  sise: 256\n")
    with pytest.raises(CxrcamError, match="'prepare.sise'"):
        load_config(path)


def test_schemas():
    assert VINBIG.num_findings == 14 and VINBIG.no_finding_id == 14
    assert VINBIG.class_id("No finding") == 14 and VINBIG.class_name(8) == "Nodule/Mass"
    assert NIH.class_id("Infiltrate") == NIH.class_id("Infiltration") == 3
    assert RSNA.findings == ("Lung Opacity",) and RSNA.no_finding_id is None
    assert len({VINBIG.colour(i) for i in range(15)}) == 15
    with pytest.raises(KeyError, match="unknown dataset"):
        get_schema("chexpert")
