"""Requantizing a changed float weight into the format it came from, with fresh scales, by round-to-nearest or
by stochastic rounding (each value goes to the grid point above with probability equal to its distance from the
point below, so the rounding error is zero in expectation; repeated bakes do not drift).

Stochastic rounding works on the format's own grid (``formats.AffineFormat.grid``: the scales round-to-nearest
would choose, in the format's rotated basis where it has one, including formats that search their scales):
the values are rounded onto that grid and encoded with exactly its scales. Any affine format with an integer or
float element grid (int8/int4, fp8, fp4) takes it; values the grid clips (scale search) saturate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import AffineFormat, LayerGrid, QuantFormat
from comfyquant.formats.grids import IntGrid
from comfyquant.runtime.tensor import QuantizedTensor


def requantize(w: torch.Tensor, like: QuantizedTensor, *, stochastic: bool = False,
               generator: torch.Generator | None = None) -> QuantizedTensor:
    """``w`` (float32) quantized with ``like``'s layout and options; the result keeps ``like``'s logical dtype."""
    layout, p = like.layout_cls, like.params
    if not stochastic:
        fresh = QuantizedTensor.from_float(w, layout, **layout.requantize_kwargs(p))
        return fresh.with_parts(params=fresh.params.replace(orig_dtype=p.orig_dtype))
    fmt, lp = p.format, p.layer_params
    stored = stochastic_tensors(w, fmt, lp, generator)
    if getattr(p, "input_scale", None) is not None:
        stored["input_scale"] = p.input_scale
    qdata, params = layout.from_state_dict("(baked)", stored, fmt.comfy_quant(lp), shape=tuple(w.shape),
                                           dtype=p.orig_dtype)
    return QuantizedTensor(qdata, layout, params.replace(backend=p.backend)).to(w.device)


def dequantize_f32(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 weight a quantized tensor stands for (not rounded through its bf16/fp16 logical dtype)."""
    return qt.layout_cls.dequantize(qt.qdata, qt.params.replace(orig_dtype=torch.float32)).float()


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _on_grid(w: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any],
             generator: torch.Generator | None) -> tuple[LayerGrid, torch.Tensor]:
    """The layer's grid and ``w``'s stochastically rounded values on it, in the quantization basis."""
    if not isinstance(fmt, AffineFormat):
        raise UserError(f"stochastic rounding needs a scaled element grid; {fmt.name} has none "
                        "(bake with stochastic=False)")
    w_t = fmt.transform(w.float(), params)
    grid = fmt.grid(w_t, params)
    scale = grid.scale_for()
    y = w_t / scale
    eg = fmt.element_grid
    if isinstance(eg, IntGrid):
        v = torch.floor(y + _uniform(y, generator)).clamp_(-eg.qmax, eg.qmax)
    else:  # float grids (fp8, fp4): between the two neighbouring values of the grid's own table
        v = stochastic_on_table(y, grid_values(eg).to(y.device), generator)
    return grid, v * scale


def stochastic_grid(w: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any],
                    generator: torch.Generator | None) -> torch.Tensor:
    """Stochastically rounded values of ``w`` (float32, original basis) on ``fmt``'s grid for this layer."""
    return fmt.untransform(_on_grid(w, fmt, params, generator)[1], params)


def stochastic_tensors(w: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any],
                       generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The stored tensors (``weight``, scales) of ``w`` stochastically rounded onto the layer's grid."""
    grid, v_t = _on_grid(w, fmt, params, generator)
    return grid.encode(v_t)


def grid_values(grid: Any) -> torch.Tensor:
    """Every finite value of an 8-bit-or-smaller element grid, sorted (float32): decoded from all its codes."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if grid.code_dtype != torch.uint8:
        codes = codes.view(grid.code_dtype)
    else:
        codes = codes[codes < 16] if grid.max <= 6 else codes  # a 4-bit grid decodes its 16 codes
    values = grid.values(codes, torch.float32)
    return torch.unique(values[torch.isfinite(values)])


def stochastic_on_table(y: torch.Tensor, table: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``y`` (float32) stochastically rounded to the sorted values ``table``: the value above with probability
    equal to the distance from the value below over their gap (values outside the table saturate)."""
    y = y.clamp(float(table[0]), float(table[-1]))
    idx = (torch.searchsorted(table, y, right=True) - 1).clamp_(0, len(table) - 1)
    lo = table[idx]
    hi = table[(idx + 1).clamp_(max=len(table) - 1)]
    gap = hi - lo
    p_hi = torch.where(gap > 0, (y - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(y))
    return torch.where(_uniform(y, generator) < p_hi, hi, lo)
