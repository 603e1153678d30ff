"""Calibration on real activations: per-layer input statistics (Hessian, absmax, percentiles, a row sample).

``calibrate(model, data)`` runs any ``nn.Module`` with forward hooks and returns :class:`CalibrationStats`;
``calibrate_to_file`` streams them to a calibration file; :class:`CalibrationFile` reads one lazily.
"""

from comfyquant.calibration.collector import (
    CalibrationConfig,
    Collector,
    calibrate,
    calibrate_to_file,
    linear_modules,
    strip_prefix,
)
from comfyquant.calibration.fileio import CalibrationFile, check_compatible, save_stats
from comfyquant.calibration.stats import CalibrationStats, LayerStats, merge_all

__all__ = [
    "CalibrationConfig",
    "CalibrationFile",
    "CalibrationStats",
    "Collector",
    "LayerStats",
    "calibrate",
    "calibrate_to_file",
    "check_compatible",
    "linear_modules",
    "merge_all",
    "save_stats",
    "strip_prefix",
]
