"""The ``--budget`` of automatic precision: an output size cap, a quality floor, or both.

``size=0.40``: the output at most 40% of the input's bytes (tensor data; every kept tensor at its stored
size, scales and ``comfy_quant`` included). ``psnr=45``: mean sample PSNR (dB) of the digits-DiT workload.
``cosine=0.999``: mean embedding cosine of the MiniLM workload. ``sqnr=30``: every layer's output SQNR (dB) on
the calibration statistics, for models without a workload. ``size`` may be combined with one quality floor
(``size=0.5,psnr=45``): the smallest plan meeting the floor, refused when it exceeds the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from comfyquant.errors import UserError

QUALITY_KINDS = ("psnr", "cosine", "sqnr")
KINDS = ("size", *QUALITY_KINDS)
HELP = ("size=FRACTION (output bytes / input bytes), psnr=DB (digits DiT), cosine=C (MiniLM), sqnr=DB (every "
        "layer's output SQNR; any model); size may be combined with one of the others, e.g. size=0.5,psnr=45")


@dataclass(frozen=True)
class Budget:
    """What automatic precision must meet; ``None`` fields are unconstrained (at least one is set)."""

    size: float | None = None
    psnr: float | None = None
    cosine: float | None = None
    sqnr: float | None = None

    def __post_init__(self) -> None:
        set_ = [k for k in KINDS if getattr(self, k) is not None]
        if not set_:
            raise UserError(f"--budget: give a size or a quality floor ({HELP})")
        quality = [k for k in QUALITY_KINDS if getattr(self, k) is not None]
        if len(quality) > 1:
            raise UserError(f"--budget: one quality floor at a time, got {' and '.join(quality)}")
        checks = {"size": (lambda v: v > 0, "a fraction of the input's bytes > 0 (e.g. 0.4)"),
                  "psnr": (lambda v: v > 0, "a PSNR in dB > 0 (e.g. 45)"),
                  "cosine": (lambda v: 0 < v <= 1, "a cosine similarity in (0, 1] (e.g. 0.999)"),
                  "sqnr": (lambda v: v > 0, "an SQNR in dB > 0 (e.g. 30)")}
        for k in set_:
            v = getattr(self, k)
            ok, what = checks[k]
            if not math.isfinite(v) or not ok(v):
                raise UserError(f"--budget {k}={v:g}: must be {what}")

    @property
    def quality(self) -> tuple[str, float] | None:
        """The quality floor as (kind, value), or None for a size-only budget."""
        for k in QUALITY_KINDS:
            v = getattr(self, k)
            if v is not None:
                return k, float(v)
        return None

    def describe(self) -> str:
        """The budget the way it is written on the command line (``size=0.4,psnr=45``)."""
        return ",".join(f"{k}={getattr(self, k):g}" for k in KINDS if getattr(self, k) is not None)


def parse_budget(text: str | Budget) -> Budget:
    """``size=0.40`` / ``psnr=45`` / ``cosine=0.999`` / ``sqnr=30`` / ``size=0.5,psnr=45`` -> :class:`Budget`;
    anything else is a one-line UserError."""
    if isinstance(text, Budget):
        return text
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--budget is required with --format auto: {HELP}")
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, raw = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in KINDS:
            raise UserError(f"--budget '{text}': expected KIND=VALUE with KIND one of {', '.join(KINDS)} ({HELP})")
        if key in values:
            raise UserError(f"--budget '{text}': {key} given twice")
        raw = raw.strip()
        pct = raw.endswith("%") and key == "size"
        try:
            v = float(raw.removesuffix("%")) if pct else float(raw)
        except ValueError:
            raise UserError(f"--budget '{text}': {key} value '{raw}' is not a number") from None
        values[key] = v / 100.0 if pct else v
    return Budget(**values)
