"""Pure tensor math for quantization: formats, int8/fp8 quantizers, Hadamard rotation, error metrics."""

from comfyquant.quant.formats import FORMATS, FormatSpec, get_format
from comfyquant.quant.metrics import ErrorStats, error_stats
from comfyquant.quant.quantize import QuantizedWeight, dequantize_weight, quantize_weight

__all__ = [
    "FORMATS",
    "ErrorStats",
    "FormatSpec",
    "QuantizedWeight",
    "dequantize_weight",
    "error_stats",
    "get_format",
    "quantize_weight",
]
