"""Element grids: the set of values one stored element can take, and rounding onto it.

A grid knows nothing about scales: ``round(y)`` takes values already divided by their scale and returns the
codes (int8 values for integer grids, fp8 values for float grids, uint8 E2M1 codes for FP4), clamped to the
grid's range; ``values`` turns codes back into floats. Formats combine a grid with a scale granularity (``formats.scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfyquant.quant import fp4


@dataclass(frozen=True)
class IntGrid:
    """Symmetric integers ``-qmax .. qmax`` (int8: 127, int4: 7), round half to even; codes held as int8."""

    name: str
    qmax: int

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest grid point (ties to even) of ``y``, clamped to the range, as int8 codes."""
        return torch.round(y).clamp_(-self.qmax, self.qmax).to(torch.int8)

    def values(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return codes.to(dtype)

    def snap(self, y: torch.Tensor) -> torch.Tensor:
        """``values(round(y))`` in y's float dtype without the int8 round trip (two kernels instead of four)."""
        return torch.round(y).clamp_(-self.qmax, self.qmax)


@dataclass(frozen=True)
class FloatGrid:
    """A torch float dtype's finite values (fp8 e4m3fn / e5m2): clamp to +-max, then the cast rounds (RNE)."""

    name: str
    dtype: torch.dtype

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def code_dtype(self) -> torch.dtype:
        return self.dtype

    def round(self, y: torch.Tensor) -> torch.Tensor:
        # clamp first: a plain cast of an out-of-range value gives NaN for e4m3fn
        return y.clamp(-self.max, self.max).to(self.dtype)

    def values(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return codes.to(dtype)

    def snap(self, y: torch.Tensor) -> torch.Tensor:
        """``values(round(y))``: the nearest grid value of ``y``, in y's dtype."""
        return self.round(y).to(y.dtype)


@dataclass(frozen=True)
class Fp4Grid:
    """FP4 E2M1 (``0, +-0.5 .. +-6``), round half to even, saturating; codes are uint8 ``0 .. 15`` (unpacked)."""

    name: str = "fp4_e2m1"

    @property
    def max(self) -> float:
        return fp4.FP4_MAX

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def round(self, y: torch.Tensor) -> torch.Tensor:
        return fp4.encode_e2m1(y)

    def values(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fp4.decode_e2m1(codes, dtype)

    def snap(self, y: torch.Tensor) -> torch.Tensor:
        """``values(round(y))``: the nearest grid value of ``y``, in y's dtype."""
        return self.values(self.round(y), y.dtype)


INT8 = IntGrid("int8", 127)
INT4 = IntGrid("int4", 7)
FP8_E4M3 = FloatGrid("fp8_e4m3", torch.float8_e4m3fn)
FP8_E5M2 = FloatGrid("fp8_e5m2", torch.float8_e5m2)
FP4_E2M1 = Fp4Grid()
