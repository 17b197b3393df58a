"""Calibrate: per-class heat map thresholds (and box settings) chosen on a held-out boxed set."""
from cxrcam.calibrate.run import Calibration, calibrate

__all__ = ["calibrate", "Calibration"]
