"""calib_data stage: readers of the calibration sources (sources.py), their prompt templates (templates.py) and
the seeded, tokenized mixture the quantizers calibrate on (mixture.py)."""

from llmship.calib_data.mixture import CalibrationSet, build_calibration_set

__all__ = ["CalibrationSet", "build_calibration_set"]
