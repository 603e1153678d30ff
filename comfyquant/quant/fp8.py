"""FP8 (e4m3fn / e5m2) weight quantization with one scalar fp32 scale, as ComfyUI's float8 formats store it."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar-scaled FP8: ``scale = absmax / fp8_max``; returns ``(q fp8 [N,K], scale fp32 [])``.

    Values are clamped to the finite range before the cast (a plain cast of an out-of-range value gives NaN
    for e4m3fn); the cast itself rounds to nearest even.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"not an fp8 dtype: {dtype}")
    x = w if w.dtype in (torch.float32, torch.float64) else w.float()
    amax = x.abs().amax()
    fmax = fp8_max(dtype)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).float()
    q = (x / scale).clamp_(-fmax, fmax).to(dtype)
    return q, scale.reshape(())


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype``."""
    return q.to(dtype) * scale.to(dtype)
