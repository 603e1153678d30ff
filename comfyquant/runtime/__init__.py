"""comfyquant.runtime: ``QuantizedTensor``, its layouts and op tables, ``QuantLinear``, ``load_quantized`` and
``quantize_`` (run quantized checkpoints in plain PyTorch / diffusers models)."""

# the generic op table and the layouts register into runtime.tensor's registry when imported
from comfyquant.runtime import layouts as _layouts  # noqa: F401
from comfyquant.runtime import ops as _ops  # noqa: F401
from comfyquant.runtime.dispatch_report import LayerDispatch, describe_dispatch, format_dispatch
from comfyquant.runtime.fold import fold_input_activations
from comfyquant.runtime.loader import LoadReport, load_quantized, load_quantized_report
from comfyquant.runtime.modulation import ModulationSite, gated_add_, modulated_linear
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.quantize import QuantizeConfig, QuantizeSummary, quantize_
from comfyquant.runtime.siblings import fuse_sibling_projections
from comfyquant.runtime.tensor import (
    REGISTRY,
    Layout,
    LayoutParams,
    QuantizedTensor,
    dequantize_args,
    register_generic_op,
    register_layout,
    register_layout_op,
)

__all__ = [
    "REGISTRY",
    "LayerDispatch",
    "Layout",
    "LayoutParams",
    "LoadReport",
    "ModulationSite",
    "QuantLinear",
    "QuantizeConfig",
    "QuantizeSummary",
    "QuantizedTensor",
    "dequantize_args",
    "describe_dispatch",
    "fold_input_activations",
    "format_dispatch",
    "fuse_sibling_projections",
    "gated_add_",
    "load_quantized",
    "load_quantized_report",
    "modulated_linear",
    "quantize_",
    "register_generic_op",
    "register_layout",
    "register_layout_op",
]
