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

_H200 = "NVIDIA H200 (sm_90), torch 2.11+cu130, triton 3.6, comfyquant bench 2026-11-22 (CUDA-graph GPU time)"

# From benchmarks/results/bench_h200_2026-11-22.json.gz (M in {1, 16, 256, 1024}) and
# bench_smallM_h200_2026-11-22.json.gz (Flux/Wan, M in {1, 16, 64, 256}): the weight-only kernel wins at
# M <= 16, W8A8 from M=64 (3072->3072: from 256, recorded as 128). T5/SDXL shapes were not swept at 64: 64 is
# the recorded crossover within (16, 256].
# t5xxl ff0 (4096->10240): W8A8 already won at M=1. sdxl 1280->1280: W8A8 won from 1024 only; 640->640: the
# weight-only kernel won at every swept M (W8A8 never measured faster on this width).
MEASURED: tuple[Threshold, ...] = tuple(
    Threshold("int8", n, k, m_min, 9, _H200)
    for n, k, m_min in (
        (9216, 3072, 64), (3072, 3072, 128), (12288, 3072, 64), (3072, 12288, 64), (21504, 3072, 64),
        (3072, 15360, 64), (5120, 5120, 64), (13824, 5120, 64), (5120, 13824, 64), (1280, 1280, 1024),
        (5120, 1280, 64), (1280, 5120, 64), (640, 640, 16384), (4096, 4096, 64), (10240, 4096, 1),
        (4096, 10240, 64),
    )
)


def m_threshold(kind: str, n: int, k: int, cc_major: int,
                table: tuple[Threshold, ...] = MEASURED) -> int:
    """The row count from which the quantized-activation GEMM is used for this shape on this generation."""
    for t in table:
        if t.kind == kind and t.n == n and t.k == k and t.cc_major == cc_major:
            return t.m_min
    return DEFAULT_M_MIN.get((kind, cc_major), FALLBACK_M_MIN)
