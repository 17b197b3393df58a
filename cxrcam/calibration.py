"""``calibration.json``: written by ``cxrcam calibrate``, read by localize, refine, the detector's
CAM pass and evaluate (for the random-map control), in this one module.

It records the heat map calibrate chose (method and target layer, and the layers each class fuses
where some class takes a finer map), each class's box setting
(threshold, threshold mode and box scale, and score and min_area where it chose them), the dataset
whose classes those are, the images it was calibrated on, an ensemble's operating points, the
2-class filter's thresholds, and the evidence. A reader gets the per-class box settings
(:class:`~cxrcam.boxes.BoxRules`) and the map to cut them from (``cam``; the map pass,
:class:`~cxrcam.cam.checkpoint.CheckpointMaps`, uses it): both belong together, since a threshold
chosen for one map means nothing on another.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcam.boxes import BoxRules
from cxrcam.config import BoxConfig
from cxrcam.errors import CxrcamError
from cxrcam.files import write_json
from cxrcam.schemas import Schema

SETTING_KEYS = ("threshold", "score", "min_area", "threshold_mode", "scale")  # what a class's entry may set of boxes.*


@dataclass
class CalibrationFile:
    """What a calibration.json says, checked as it is read."""

    path: Path
    settings: dict[int, dict[str, Any]]  # class id -> the box settings calibrate chose for it
    names: dict[int, str]  # class id -> the class name calibrate gave it
    image_ids: list[str] = field(default_factory=list)  # the images it was calibrated on
    cam: dict | None = None  # the heat map it chose: method, target_layer
    schema: str | None = None  # the dataset whose classes it set
    checkpoints: list[str] = field(default_factory=list)  # the classifier(s) it calibrated
    operating_points: list | None = None  # an ensemble's decision thresholds, chosen on its mean probabilities
    filter: dict | None = None  # the 2-class filter calibrate chose: low, high and its evidence

    @classmethod
    def read(cls, path: str | Path) -> "CalibrationFile":
        path = Path(path)
        try:
            saved = json.loads(path.read_text())
            settings = {int(e["class_id"]): {k: e[k] for k in SETTING_KEYS if k in e} for e in saved["classes"].values()}
            names = {int(e["class_id"]): str(name) for name, e in saved["classes"].items()}
        except FileNotFoundError:
            raise CxrcamError(f"calibration file not found: {path}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CxrcamError(f"{path}: not a calibration.json written by `cxrcam calibrate` ({exc!r})") from None
        checkpoints = saved.get("checkpoint", [])
        return cls(path, settings, names, list(saved.get("image_ids", [])), saved.get("cam"), saved.get("schema"),
                   [checkpoints] if isinstance(checkpoints, str) else list(checkpoints), saved.get("operating_points"),
                   saved.get("filter"))

    def check_schema(self, schema: Schema) -> None:
        """Thresholds are set by class id: another dataset's (NIH's thresholds on a VinBigData
        model) would land on the wrong classes. Refused, naming both."""
        wrong = self.schema not in (None, schema.name) or any(
            c >= schema.num_findings or schema.class_name(c) != name for c, name in self.names.items())
        if wrong:
            raise CxrcamError(f"{self.path} calibrates {self.schema or 'another dataset'}'s classes "
                              f"({', '.join(list(self.names.values())[:3])}, ...); the classifier predicts "
                              f"{schema.name} classes: calibrate on its own boxed data")

    def rules(self, default: BoxConfig) -> BoxRules:
        """``default`` with each calibrated class's own settings."""
        return BoxRules(default, {c: dataclasses.replace(default, **s) for c, s in self.settings.items()})


def box_rules(config: BoxConfig, schema: Schema | None = None) -> tuple[BoxRules, CalibrationFile | None]:
    """Each class's box settings from ``config``, and the calibration file it names (checked against
    ``schema`` when given), if any."""
    if not config.calibration:
        return BoxRules(config), None
    calibration = CalibrationFile.read(config.calibration)
    if schema is not None:
        calibration.check_schema(schema)
    return calibration.rules(config), calibration


def filter_range(config: BoxConfig, calibration: CalibrationFile | None,
                 detector: dict | None = None) -> tuple[float, float]:
    """The 2-class filter's (low, high): the configured numbers, or for "auto" the choice made for
    the boxes being filtered (:func:`~cxrcam.outputs.postprocess.choose_filter`): ``detector``'s,
    train-detector's for its own boxes (refine), else the calibration's for CAM boxes, else no
    filter (0, 1)."""
    chosen = detector or ((calibration.filter or {}) if calibration is not None else {})
    low = chosen.get("low", 0.0) if config.filter_low == "auto" else config.filter_low
    high = chosen.get("high", 1.0) if config.filter_high == "auto" else config.filter_high
    if not 0 <= low <= high <= 1:
        raise CxrcamError(f"the 2-class filter needs 0 <= low ({low}) <= high ({high}) <= 1 (boxes.filter_low and "
                          f"boxes.filter_high{'; ' + str(calibration.path) if calibration is not None else ''})")
    return float(low), float(high)


def _strict(value: Any) -> Any:
    """NaN and infinities as null: strict JSON readers refuse a bare NaN."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_calibration(path: str | Path, content: dict[str, Any]) -> None:
    """Write calibration.json (atomically; undefined figures as null)."""
    write_json(path, _strict(content))


__all__ = ["CalibrationFile", "box_rules", "filter_range", "write_calibration"]
