"""A one-sided lower confidence bound on a mean from a few items: what a quality floor is planned on.

A workload's metric is a mean over items (sample PSNR in dB, embedding cosine), and a plan is checked on a
few calibration items. Their mean estimates the metric on all inputs with a standard error ``s / sqrt(n)``;
planning on ``mean - t s / sqrt(n)`` (Student t, ``n - 1`` degrees of freedom, one-sided at ``confidence``)
gives headroom that grows with the items' spread and shrinks as there are more of them. Pure float64 math;
the t quantile comes from the closed-form t distribution of integer degrees of freedom (no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


def t_two_sided(t: float, dof: int) -> float:
    """``P(|T| < t)`` for Student's t with ``dof >= 1`` degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:
        term, s = math.cos(theta), 0.0
        for k in range(1, (dof - 1) // 2 + 1):
            s += term
            term *= 2 * k / (2 * k + 1) * c2
        return 2.0 / math.pi * (theta + math.sin(theta) * s)
    term, s = 1.0, 0.0
    for k in range(1, dof // 2 + 1):
        s += term
        term *= (2 * k - 1) / (2 * k) * c2
    return math.sin(theta) * s


@lru_cache(maxsize=256)
def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t with ``dof`` degrees of freedom, to float64
    precision (bisection on ``theta = atan(t / sqrt(dof))``, where the two-sided probability is monotone)."""
    if not 0.5 <= p < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {p}")
    want = 2.0 * p - 1.0
    lo, hi = 0.0, math.pi / 2
    while True:
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            return math.sqrt(dof) * math.tan(mid)
        if t_two_sided(math.sqrt(dof) * math.tan(mid), dof) < want:
            lo = mid
        else:
            hi = mid


@dataclass(frozen=True)
class MeanBound:
    """``n`` items' mean, sample standard deviation, the t factor used and ``lower = mean - t sd / sqrt(n)``."""

    n: int
    mean: float
    sd: float
    t: float
    lower: float


def lower_bound(values: Sequence[float], confidence: float) -> MeanBound:
    """The one-sided ``confidence`` lower bound of the mean of ``values`` (module docstring). One item has no
    spread to estimate: its bound is its value (the caller's fixed margin is then the only headroom)."""
    n = len(values)
    if n == 0:
        raise ValueError("a confidence bound needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return MeanBound(1, mean, 0.0, 0.0, mean)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    t = t_quantile(confidence, n - 1)
    return MeanBound(n, mean, sd, t, mean - t * sd / math.sqrt(n))
