"""FP4 E2M1 (the NVFP4 element type): encoding with round-to-nearest-even, decoding, and two-per-byte packing.

A code is 4 bits: sign (bit 3), 2 exponent bits, 1 mantissa bit; magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Values
beyond +-6 saturate. Packing follows ComfyUI's ``nvfp4``: two codes per uint8 along the last dim, the even element
in the HIGH nibble.
"""

from __future__ import annotations

import torch

FP4_MAX = 6.0
# magnitude of codes 0..7; codes 8..15 are the same values negated (8 is -0.0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between consecutive magnitudes; at a tie round-to-nearest-even picks the even code (mantissa bit 0):
# ">" keeps the lower code (0, 2, 4, 6 are even), ">=" moves up to the even upper code.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def encode_e2m1(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 in ``0 .. 15``) of float values, nearest-even, saturating at +-6; the sign of -0 is kept."""
    m = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for t in _TIES_DOWN:
        code += m > t
    for t in _TIES_UP:
        code += m >= t
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def _lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=dtype, device=device)


def decode_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float values of E2M1 codes (uint8 ``0 .. 15``)."""
    return _lut(dtype, codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte along the last dim (even element in the high nibble): ``[..., K]`` -> ``[..., K/2]``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"fp4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | (c[..., 1::2] & 0x0F)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., K/2]`` -> codes ``[..., K]``."""
    b = packed.view(torch.uint8)
    return torch.stack((b >> 4, b & 0x0F), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
