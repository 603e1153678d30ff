"""Requantizing a changed float weight into the format it came from, with fresh scales, by round-to-nearest or
by stochastic rounding (each value goes to the grid point above with probability equal to its distance from the
point below, so the rounding error is zero in expectation; repeated bakes do not drift).

Stochastic rounding picks the grid values first, on the format's own grid (``formats.AffineFormat.grid``: the
scales round-to-nearest would choose, in the format's rotated basis where it has one), then hands them to the
layout's quantizer: values already on the grid come back as the same codes (the absmax element stays at the grid
maximum, so the scales do not change). Any affine format with an integer or float element grid takes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import AffineFormat, QuantFormat
from comfyquant.formats.grids import FloatGrid, IntGrid
from comfyquant.runtime.tensor import QuantizedTensor


def requantize(w: torch.Tensor, like: QuantizedTensor, *, stochastic: bool = False,
               generator: torch.Generator | None = None) -> QuantizedTensor:
    """``w`` (float32) quantized with ``like``'s layout and options; the result keeps ``like``'s logical dtype."""
    layout = like.layout_cls
    kwargs = layout.requantize_kwargs(like.params)
    if stochastic:
        w = stochastic_grid(w, like.params.format, like.params.layer_params, generator)
    fresh = QuantizedTensor.from_float(w, layout, **kwargs)
    return fresh.with_parts(params=fresh.params.replace(orig_dtype=like.params.orig_dtype))


def dequantize_f32(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 weight a quantized tensor stands for (not rounded through its bf16/fp16 logical dtype)."""
    return qt.layout_cls.dequantize(qt.qdata, qt.params.replace(orig_dtype=torch.float32)).float()


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def stochastic_grid(w: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any],
                    generator: torch.Generator | None) -> torch.Tensor:
    """Stochastically rounded values of ``w`` (float32, original basis) on ``fmt``'s grid for this layer."""
    if not isinstance(fmt, AffineFormat):
        raise UserError(f"stochastic rounding needs a scaled integer or float grid; {fmt.name} has none "
                        "(bake with stochastic=False)")
    w_t = fmt.transform(w.float(), params)
    scale = fmt.grid(w_t, params).scale_for()
    y = w_t / scale
    grid = fmt.element_grid
    if isinstance(grid, IntGrid):
        v = torch.floor(y + _uniform(y, generator)).clamp_(-grid.qmax, grid.qmax)
    elif isinstance(grid, FloatGrid):
        v = stochastic_float(y, grid.dtype, generator)
    else:  # pragma: no cover - every registered grid is one of the two
        raise UserError(f"stochastic rounding does not know the element grid of {fmt.name}")
    return fmt.untransform(v * scale, params)


def stochastic_float(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` (float32, clamped to the ``dtype`` range) stochastically rounded to the values of an 8-bit float
    dtype, as float32. The two neighbours are the nearest value and its next code in magnitude (codes of one
    sign are ordered like their magnitudes)."""
    fmax = float(torch.finfo(dtype).max)
    a = x.abs().clamp(max=fmax)
    near = a.to(dtype)
    near_f = near.float()
    bits = near.view(torch.uint8).to(torch.int16)
    below = near_f <= a
    other = torch.where(below, bits + 1, bits - 1).clamp_(0, 255).to(torch.uint8).view(dtype).float()
    other = torch.where(below & (near_f >= fmax), near_f, other)  # nothing above the largest finite value
    other = torch.where(~below & (bits == 0), near_f, other)  # nothing below zero in magnitude
    lo, hi = torch.where(below, near_f, other), torch.where(below, other, near_f)
    gap = hi - lo
    p_hi = torch.where(gap > 0, (a - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(a))
    return torch.where(_uniform(a, generator) < p_hi, hi, lo).copysign(x)
