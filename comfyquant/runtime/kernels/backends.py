"""The one explicit backend choice for quantized linears: by device, GPU generation, triton presence and shape.

``choose_backend`` is a pure function of its arguments (plus cached, read-only hardware facts); callers pass
an override per call or per module. There is no global switch.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import MappingProxyType

import torch

from comfyquant.errors import UserError
from comfyquant.runtime.kernels.thresholds import m_threshold

KINDS = ("int8", "int8_block", "fp8")
AUTO = "auto"  # placeholder a traced call passes to the op; resolved by ``resolve_name`` at run time

# Backend names, per kind:
#   torch        pure torch: per-token quant, torch._int_mm (int8) / float matmul (fp8), float32 epilogue
#   dequant      weight-only: dequantize W to x's dtype and run F.linear (any device)
#   triton       Triton W8A8: fused (rotate +) per-token quant kernel, int8 GEMM with fused epilogue
#   triton_w8a16 Triton weight-only GEMM for small M: int8 W dequantized in registers, bf16/fp16 x
#   scaled_mm    fp8 torch._scaled_mm with rowwise (or static per-tensor) activation scales
BACKENDS = MappingProxyType({
    "int8": ("torch", "dequant", "triton", "triton_w8a16"),
    "int8_block": ("torch", "dequant"),
    "fp8": ("torch", "dequant", "scaled_mm", "triton_w8a16"),
})


@dataclass(frozen=True)
class BackendChoice:
    """Which implementation runs a quantized linear, and why (shown by ``QuantLinear.extra_repr`` / bench)."""

    name: str
    reason: str


# assume_constant_result: torch.compile treats these hardware facts as constants instead of tracing into
# torch.cuda / importlib calls (which break the graph on CUDA devices).
@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once; never imported on the CPU path)."""
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``; None for non-CUDA devices."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _available(name: str, kind: str, device: torch.device) -> str | None:
    """None when ``name`` can run ``kind`` on ``device``, else why not."""
    if name not in BACKENDS[kind]:
        return f"backend {name!r} does not implement {kind} (choose from {', '.join(BACKENDS[kind])})"
    cap = device_capability(device)
    if name.startswith("triton"):
        if cap is None:
            return f"backend {name!r} needs a CUDA device, got {device.type}"
        if not triton_available():
            return f"backend {name!r} needs the triton package, which is not installed"
        if cap < (8, 0):
            return f"backend {name!r} needs compute capability >= 8.0, got {cap[0]}.{cap[1]}"
    if name == "scaled_mm" and (cap is None or cap < (8, 9)):
        return f"backend 'scaled_mm' needs an fp8-capable CUDA GPU (compute capability >= 8.9), got {cap}"
    return None


def choose_backend(x: torch.Tensor, *, kind: str, n: int, k: int,
                   override: str | None = None) -> BackendChoice:
    """Pick the backend for ``x [..., k] @ W[n, k]^T``; ``override`` forces one (UserError if it cannot run)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    if override is not None:
        why_not = _available(override, kind, x.device)
        if why_not is not None:
            raise UserError(why_not)
        return BackendChoice(override, "requested")
    cap = device_capability(x.device)
    if cap is None:
        return BackendChoice("torch", f"{x.device.type}: pure-torch reference path")
    if kind == "int8_block":
        return BackendChoice("torch", "int8 block-wise: per-K-block torch._int_mm")
    m = x.numel() // k if k else 0
    gen = f"sm_{cap[0]}{cap[1]}"
    if kind == "fp8":
        if cap < (8, 9):
            return BackendChoice("dequant", f"{gen} has no fp8 matrix units")
        if k % 16 or n % 16:
            return BackendChoice("dequant", f"K={k}, N={n} not multiples of 16 (fp8 _scaled_mm needs them)")
        m_min = m_threshold("fp8", n, k, cap[0])
        if m < m_min and triton_available():
            return BackendChoice("triton_w8a16", f"M={m} < {m_min} (measured threshold): weight-only kernel")
        return BackendChoice("scaled_mm", f"{gen}: fp8 _scaled_mm, M={m}")
    if not triton_available() or cap < (8, 0):
        return BackendChoice("torch", f"{gen}: no triton int8 path; torch._int_mm")
    m_min = m_threshold("int8", n, k, cap[0])
    if m < m_min:
        return BackendChoice("triton_w8a16", f"M={m} < {m_min} (measured threshold): weight-only kernel")
    return BackendChoice("triton", f"{gen}: triton W8A8, M={m} >= {m_min}")


def resolve_name(x: torch.Tensor, kind: str, n: int, k: int, name: str) -> str:
    """Inside an op: turn ``auto`` (or a requested name, validated here) into the backend that runs."""
    return choose_backend(x, kind=kind, n=n, k=k, override=None if name == AUTO else name).name
