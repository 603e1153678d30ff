"""SmoothQuant for "Enable INT8 on MODEL": per-layer input smoothing from a calibration file.

Each quantized linear gets ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` (``optimize.smoothquant``'s
``smooth_scales``); its weight is quantized as ``W diag(s)`` and its input is multiplied by ``1/s`` before the
quantized product. ComfyUI's Flux norms are modulated or affine-free, so there is no preceding layer to fold
``1/s`` into: it stays with the layer as the runtime's ``pre_quant_scale`` (``p = 1/s``, the layer computes
``(x * p) @ W_stored^T``), which is also how ComfyUI names and applies such a vector.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyquant.calibration import CalibrationFile, check_compatible
from comfyquant.errors import UserError
from comfyquant.optimize.smoothquant import smooth_scales


def resolve_calibration_path(value: str, search: Sequence[str | Path] = ()) -> Path:
    """The calibration file a node input names: an absolute path, or a path relative to one of ``search`` (e.g.
    ComfyUI's output folder, where Capture Calibration writes) or to the working directory."""
    raw = value.strip()
    if not raw:
        raise UserError("no calibration_file given")
    p = Path(os.path.expanduser(raw))
    candidates = [p] if p.is_absolute() else [Path(d) / p for d in search] + [p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = ", ".join(str(c) for c in candidates)
    raise UserError(f"calibration_file {raw!r} not found (looked at {where})")


@dataclass(frozen=True)
class Smoothing:
    """Per-layer calibrated input absmax (layers the file has statistics for) and SmoothQuant's ``alpha``."""

    path: Path
    identity: tuple  # (path, size, mtime_ns): a changed or different file gives another cache key
    alpha: float
    act_absmax: Mapping[str, torch.Tensor]
    missing: tuple[str, ...]  # layers without statistics (not in the file, or never run): quantized unsmoothed

    def cache_key(self) -> tuple:
        """What, besides the format, changes a smoothed layer's quantized values."""
        return ("smoothquant", self.identity, self.alpha)

    def pre_quant_scale(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """``p = 1/s`` for ``weight`` ``[N, K]`` of layer ``name`` (float32, on the weight's device), or None."""
        a = self.act_absmax.get(name)
        if a is None:
            return None
        w_absmax = weight.detach().abs().amax(0).float()
        s = smooth_scales(a.to(w_absmax.device), w_absmax, self.alpha)
        return 1.0 / s


def open_smoothing(path: Path, weights: Mapping[str, tuple[int, ...]], alpha: float) -> Smoothing:
    """Read the input absmax of every layer in ``weights`` (name -> ``[N, K]``) from a calibration file; a
    one-line UserError when the file is not a calibration file or belongs to another model."""
    calib = CalibrationFile(path)
    check_compatible(calib, weights, f"file {path.name}")
    found: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name in weights:
        if name not in calib or int(calib.reader.get(f"{name}.count")) == 0:
            missing.append(name)
            continue
        a = calib.reader.get(f"{name}.absmax").clone().float()
        if not bool(torch.isfinite(a).all()):
            raise UserError(f"calibration file {path.name}: layer '{name}' has non-finite input statistics")
        found[name] = a
    st = path.stat()
    return Smoothing(path, (str(path), st.st_size, st.st_mtime_ns), float(alpha), found, tuple(missing))
