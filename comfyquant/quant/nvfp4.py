"""NVFP4 math: E2M1 elements, one fp8-e4m3 scale per 16 along K, and one fp32 global scale per tensor.

``x ≈ e2m1 * (global * block)``. The global scale is ``amax / (448 * 6)`` so the largest block scale lands on
e4m3's maximum; a block's scale is ``(block_amax / 6) / global`` rounded to e4m3 (comfy-kitchen's
``quantize_nvfp4``, bit for bit). With ``search`` each block also tries the e4m3 values just above and below
that one and keeps the scale with the lowest squared error (~10% lower weight MSE than absmax on
heavy-tailed weights). Scales here are unswizzled ``[R, K/16]``; ``quant.swizzle`` makes the stored layout.
"""

from __future__ import annotations

import torch

from comfyquant.quant.fp4 import FP4_MAX, decode_e2m1, encode_e2m1

BLOCK = 16
E4M3_MAX = 448.0
# steps of the e4m3 code (3 mantissa bits: one step is 1/16 .. 1/8 of the scale) tried around the RTN scale
SEARCH_STEPS = (1, -1, -2, -3)


def global_scale(x: torch.Tensor) -> torch.Tensor:
    """``amax / (448 * 6)`` as a float32 scalar; 1 for an all-zero tensor."""
    g = x.abs().amax().float() / (E4M3_MAX * FP4_MAX)
    return torch.where(g > 0, g, torch.ones_like(g))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    rows, k = x.shape
    if k % BLOCK:
        raise ValueError(f"nvfp4 needs in_features divisible by {BLOCK}, got {k}")
    return x.reshape(rows, k // BLOCK, BLOCK)


def element_scale(block_scales: torch.Tensor, gscale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``global * block`` per block ``[R, K/16, 1]`` in ``dtype`` (float32: one rounding, as comfy-kitchen)."""
    return (gscale.to(dtype) * block_scales.to(dtype)).unsqueeze(-1)


def encode_blocks(xb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of blocked values ``[R, K/16, 16]`` with per-block scales; a zero scale gives zero codes."""
    y = torch.where(scale > 0, xb / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(xb))
    return encode_e2m1(y.clamp_(-FP4_MAX, FP4_MAX))


def _block_sse(xb: torch.Tensor, bs: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    s = element_scale(bs, gscale, xb.dtype)
    return (decode_e2m1(encode_blocks(xb, s), xb.dtype) * s - xb).square().sum(-1)


def block_scales(x: torch.Tensor, gscale: torch.Tensor, search: bool = False) -> torch.Tensor:
    """The fp8-e4m3 block scales ``[R, K/16]`` of a float ``[R, K]`` (K a multiple of 16)."""
    xb = _blocks(x if x.dtype in (torch.float32, torch.float64) else x.float())
    amax = xb.abs().amax(-1).float()
    best = ((amax / FP4_MAX) / gscale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    if not search:
        return best
    best_e = _block_sse(xb, best, gscale)
    codes = best.view(torch.uint8).to(torch.int16)
    for step in SEARCH_STEPS:
        cand = (codes + step).clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn)  # 0x7E = 448, 0x7F = NaN
        e = _block_sse(xb, cand, gscale)
        better = e < best_e
        best, best_e = torch.where(better, cand, best), torch.where(better, e, best_e)
    return best


def quantize(x: torch.Tensor, gscale: torch.Tensor | None = None,
             search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [R, K], block scales fp8 [R, K/16], global fp32 [])`` of a float ``[R, K]``."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    g = global_scale(work) if gscale is None else gscale.float().reshape(())
    bs = block_scales(work, g, search)
    codes = encode_blocks(_blocks(work), element_scale(bs, g, work.dtype))
    return codes.reshape(x.shape), bs, g


def dequantize(codes: torch.Tensor, bs: torch.Tensor, gscale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``[R, K]`` of unpacked codes and unswizzled ``[R, K/16]`` block scales."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    vals = decode_e2m1(codes, work).reshape(codes.shape[0], -1, BLOCK)
    return (vals * element_scale(bs, gscale, work)).reshape(codes.shape).to(dtype)
