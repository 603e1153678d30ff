"""The format registry: every storage format described once (names, stored tensors, math, ComfyUI/runtime use).

``get_format(name)`` looks one up; ``register_format(fmt)`` adds one (a new format is one file: a
``QuantFormat`` subclass or an ``AffineFormat`` declaration, plus, for the runtime, a kernel kind). The
built-in formats are registered when this package is imported.
"""

from comfyquant.formats.api import QuantizedWeight, dequantize_weight, identify, quantize_weight
from comfyquant.formats.base import (
    AffineFormat,
    CastFormat,
    FormatShapeError,
    LayerGrid,
    Params,
    QuantFormat,
    TensorSlot,
    conf_value,
)
from comfyquant.formats.registry import (
    GPU_GENERATIONS,
    REGISTRY,
    STOCK_COMFY_0_30,
    FormatRegistry,
    get_format,
    gpu_at_least,
    register_format,
)


def _register_builtins() -> None:
    from comfyquant.formats.casts import BF16, FP16
    from comfyquant.formats.fp8 import FP8, FP8_E5M2_FORMAT
    from comfyquant.formats.int4_rot import INT4_ROT
    from comfyquant.formats.int8 import INT8_BLOCK, INT8_ROT, INT8_ROW, INT8_TENSOR
    from comfyquant.formats.mxfp8 import MXFP8
    from comfyquant.formats.nvfp4 import NVFP4

    for fmt in (INT8_ROW, INT8_TENSOR, INT8_ROT, INT8_BLOCK, FP8, FP8_E5M2_FORMAT, INT4_ROT, NVFP4, MXFP8, FP16, BF16):
        if fmt.name not in REGISTRY:
            register_format(fmt)


_register_builtins()

__all__ = [
    "GPU_GENERATIONS",
    "REGISTRY",
    "STOCK_COMFY_0_30",
    "AffineFormat",
    "CastFormat",
    "FormatRegistry",
    "FormatShapeError",
    "LayerGrid",
    "Params",
    "QuantFormat",
    "QuantizedWeight",
    "TensorSlot",
    "conf_value",
    "dequantize_weight",
    "get_format",
    "gpu_at_least",
    "identify",
    "quantize_weight",
    "register_format",
]
