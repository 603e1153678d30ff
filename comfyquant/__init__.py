"""comfyquant: quantize diffusion-model checkpoints for ComfyUI and run them fast.

Public API (imported lazily so the CLI starts quickly):
``convert`` (checkpoint -> quantized checkpoint, returns a ``Report``; per-layer choices in ``LayerOptions``), ``load_quantized`` (swap a model's
``nn.Linear`` layers for quantized ones from a file), ``quantize_`` (quantize a live model in place),
``QuantizedTensor``, ``calibrate`` (input statistics of any ``nn.Module`` on real data).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert": ("comfyquant.convert.api", "convert"),
    "Report": ("comfyquant.convert.report", "Report"),
    "LayerOptions": ("comfyquant.convert.choices", "LayerOptions"),
    "load_quantized": ("comfyquant.runtime.loader", "load_quantized"),
    "quantize_": ("comfyquant.runtime.quantize", "quantize_"),
    "QuantizeConfig": ("comfyquant.runtime.quantize", "QuantizeConfig"),
    "QuantizedTensor": ("comfyquant.runtime.tensor", "QuantizedTensor"),
    "describe_dispatch": ("comfyquant.runtime.dispatch_report", "describe_dispatch"),
    "format_dispatch": ("comfyquant.runtime.dispatch_report", "format_dispatch"),
    "calibrate": ("comfyquant.calibration.collector", "calibrate"),
    "CalibrationStats": ("comfyquant.calibration.stats", "CalibrationStats"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'comfyquant' has no attribute {name!r}")
