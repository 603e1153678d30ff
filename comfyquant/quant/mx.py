"""MXFP8 math: fp8-e4m3 elements with one E8M0 (power-of-two) scale per 32 along K.

An E8M0 byte ``e`` means ``2^(e - 127)``; byte 0 is used for all-zero blocks and read as 0 (comfy-kitchen's
convention). A block's scale is the smallest power of two with ``amax / scale <= 448`` (no element clips),
computed exactly from the float's exponent, so the bytes equal comfy-kitchen's ``quantize_mxfp8``. Scales here
are unswizzled ``[R, K/32]`` uint8; ``quant.swizzle`` makes the stored layout.
"""

from __future__ import annotations

import torch

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127


def e8m0_from_amax(amax: torch.Tensor, elem_max: float = E4M3_MAX) -> torch.Tensor:
    """E8M0 bytes (uint8) of ``2^ceil(log2(amax / elem_max))``, clamped to ``[2^-126, 2^127]``; 0 where amax is 0."""
    # float64: amax / elem_max neither underflows nor rounds across a power of two (amax has 24 bits)
    mant, exp = torch.frexp(amax.double() / elem_max)  # v = mant * 2^exp, mant in [0.5, 1)
    ceil_log2 = torch.where(mant == 0.5, exp - 1, exp)
    byte = (ceil_log2 + E8M0_BIAS).clamp(1, 254).to(torch.uint8)
    return torch.where(amax > 0, byte, torch.zeros_like(byte))


def e8m0_to_float(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``2^(e - 127)`` of E8M0 bytes (uint8 or float8_e8m0fnu), 0 for byte 0."""
    e = scales.view(torch.uint8).to(torch.int32)
    val = torch.ldexp(torch.ones(e.shape, dtype=dtype, device=e.device), e - E8M0_BIAS)
    return torch.where(e == 0, torch.zeros_like(val), val)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    rows, k = x.shape
    if k % BLOCK:
        raise ValueError(f"mxfp8 needs in_features divisible by {BLOCK}, got {k}")
    return x.reshape(rows, k // BLOCK, BLOCK)


def block_scales(x: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes ``[R, K/32]`` (uint8) of a float ``[R, K]``."""
    return e8m0_from_amax(_blocks(x).abs().amax(-1))


def encode_blocks(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8-e4m3 elements ``[R, K]`` of ``x / scale`` (zero for zero-scale blocks), clamped to +-448."""
    xb = _blocks(x if x.dtype in (torch.float32, torch.float64) else x.float())
    s = e8m0_to_float(scales, xb.dtype).unsqueeze(-1)
    y = torch.where(s > 0, xb / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xb))
    return y.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(x.shape)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [R, K], E8M0 bytes [R, K/32])`` of a float ``[R, K]``."""
    scales = block_scales(x)
    return encode_blocks(x, scales), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``[R, K]`` of fp8 elements and unswizzled E8M0 ``[R, K/32]`` scales (exact in float32 and wider)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    vals = _blocks(q.to(work))
    return (vals * e8m0_to_float(scales, work).unsqueeze(-1)).reshape(q.shape).to(dtype)
