"""Measured small-batch thresholds: below ``m_min`` rows, the W8A8 GEMM loses to the weight-only kernel.

Data, not state: each row records the GPU it was measured on (``comfyquant bench``; see docs/PERFORMANCE.md).
Shapes not in the table use the per-generation default. ``m_min`` is the smallest M at which the W8A8 path
(activation quantization included) beat the weight-only int8 kernel for that ``(N, K)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Threshold:
    """One measured routing threshold for a ``(kind, N, K)`` on a GPU generation (compute-capability major)."""

    kind: str
    n: int
    k: int
    m_min: int
    cc_major: int
    measured_on: str


# Defaults per compute-capability major, used for shapes not measured (rows, W8A8 path from this M up).
DEFAULT_M_MIN = MappingProxyType({
    ("int8", 9): 64,
    ("int8", 8): 64,
    ("fp8", 9): 64,
    ("fp8", 8): 64,
})
FALLBACK_M_MIN = 64

MEASURED: tuple[Threshold, ...] = ()


def m_threshold(kind: str, n: int, k: int, cc_major: int,
                table: tuple[Threshold, ...] = MEASURED) -> int:
    """The row count from which the quantized-activation GEMM is used for this shape on this generation."""
    for t in table:
        if t.kind == kind and t.n == n and t.k == k and t.cc_major == cc_major:
            return t.m_min
    return DEFAULT_M_MIN.get((kind, cc_major), FALLBACK_M_MIN)
