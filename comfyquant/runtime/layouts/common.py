"""Helpers shared by the layouts: argument unpacking for linear/mm/addmm and validation messages."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from comfyquant.errors import UserError
from comfyquant.runtime.tensor import REGISTRY, QuantizedTensor, run_dequantized

aten = torch.ops.aten


def linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of an ``F.linear`` / ``aten.linear`` call."""
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, w, b


def weight_only_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on the dequantized weight in the input's dtype (``full_precision_matrix_mult`` layers)."""
    wd = w.dequantize().to(x.dtype)
    return F.linear(x, wd, None if bias is None else bias.to(x.dtype))


def fallback(func: Any, layout_cls: type, args: tuple, kwargs: dict) -> Any:
    """Log (once per op and layout) and run ``func`` on dequantized arguments."""
    REGISTRY.note_fallback(func, layout_cls)
    if func is aten.linear.default:
        x, w, b = linear_args(args, kwargs)
        x = x.dequantize() if isinstance(x, QuantizedTensor) else x
        w = w.dequantize() if isinstance(w, QuantizedTensor) else w
        b = b.dequantize() if isinstance(b, QuantizedTensor) else b
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    return run_dequantized(func, args, kwargs)


def fmt_shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def require(cond: bool, layer: str, message: str) -> None:
    """Raise the loader's one-line UserError naming the layer when ``cond`` is false."""
    if not cond:
        raise UserError(f"layer {layer}: {message}")


def check_scale(layer: str, name: str, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored scale must exist, be floating point and finite."""
    require(scale is not None, layer, f"{name} is missing")
    assert scale is not None
    require(scale.dtype.is_floating_point, layer, f"{name} has dtype {scale.dtype}, expected a float dtype")
    require(bool(torch.isfinite(scale).all()), layer, f"{name} holds NaN or Inf values")
    require(bool((scale > 0).all()), layer, f"{name} holds zero or negative values")
    return scale


def is_scalar_shape(t: torch.Tensor) -> bool:
    return t.numel() == 1 and t.dim() <= 2


def matmul_operands(func: Any, args: tuple) -> tuple[Any, Any, Any]:
    """(bias or None, a, b) of ``mm(a, b)`` / ``addmm(bias, a, b)``."""
    if func is aten.addmm.default:
        return args[0], args[1], args[2]
    return None, args[0], args[1]
