"""Error metrics between a reference tensor and its quantized approximation, computed in float64."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ErrorStats:
    """SQNR in dB (inf when exact), MSE relative to the reference's mean square, largest absolute error."""

    sqnr_db: float
    rel_mse: float
    max_abs_err: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-safe dict (inf becomes None)."""
        return {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref-approx)^2)`` in dB."""
    return error_stats(ref, approx).sqnr_db


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> ErrorStats:
    """All three metrics in one pass over float64 copies."""
    r = ref.detach().to(torch.float64)
    e = approx.detach().to(torch.float64) - r
    signal = float(r.square().sum())
    noise = float(e.square().sum())
    if noise == 0.0:
        sq = math.inf
    elif signal == 0.0:
        sq = -math.inf
    else:
        sq = 10.0 * math.log10(signal / noise)
    rel = noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf)
    max_abs = float(e.abs().max()) if e.numel() else 0.0
    return ErrorStats(sq, rel, max_abs)


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN or Inf.

    A float32 sum is non-finite whenever any element is, and costs a fraction of a full ``isfinite`` scan,
    which then only runs to confirm (a sum can also overflow on huge finite values).
    """
    if x.numel() == 0 or math.isfinite(float(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())
