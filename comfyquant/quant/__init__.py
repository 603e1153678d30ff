"""Pure tensor math for quantization: int8/fp8 quantizers, Hadamard rotation, error metrics.

Formats (what is stored, and how) live in ``comfyquant.formats``, which builds on these functions.
"""

from comfyquant.quant.metrics import ErrorStats, error_stats

__all__ = ["ErrorStats", "error_stats"]
