"""Requantizing a changed float weight into the layout it came from, with fresh scales, by round-to-nearest or
by stochastic rounding (each value goes to the grid point above with probability equal to its distance from the
point below, so the rounding error is zero in expectation; repeated bakes do not drift).

Stochastic rounding picks the grid values first, then hands them to the layout's own quantizer: values already
on the grid (the absmax element stays exactly at +-qmax, so the scale is unchanged) come back as the same codes.
Supported: ``int8_tensorwise`` (per tensor, per row, convrot), ``int8_blockwise``, ``float8_e4m3fn/e5m2``.
"""

from __future__ import annotations

import torch

from comfyquant.errors import UserError
from comfyquant.quant import hadamard
from comfyquant.runtime.tensor import QuantizedTensor


def requantize(w: torch.Tensor, like: QuantizedTensor, *, stochastic: bool = False,
               generator: torch.Generator | None = None) -> QuantizedTensor:
    """``w`` (float32) quantized with ``like``'s layout and options; the result keeps ``like``'s logical dtype."""
    layout = like.layout_cls
    kwargs = layout.requantize_kwargs(like.params)
    fresh = QuantizedTensor.from_float(w, layout, **kwargs)
    if stochastic:
        fresh = QuantizedTensor.from_float(stochastic_grid(w, fresh, generator), layout, **kwargs)
    return fresh.with_parts(params=fresh.params.replace(orig_dtype=like.params.orig_dtype))


def dequantize_f32(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 weight a quantized tensor stands for (not rounded through its bf16/fp16 logical dtype)."""
    return qt.layout_cls.dequantize(qt.qdata, qt.params.replace(orig_dtype=torch.float32)).float()


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def stochastic_grid(w: torch.Tensor, rtn: QuantizedTensor, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastically rounded values of ``w`` on the grid of ``rtn`` (its round-to-nearest quantization)."""
    name, p = rtn.layout_name, rtn.params
    if name == "int8_tensorwise":
        scale = p.scale.reshape(-1, 1) if p.scale.numel() > 1 else p.scale.reshape(())
        group = p.convrot_groupsize if p.convrot else None
        basis = hadamard.rotate_weight(w, group) if group else w
        q = torch.floor(basis / scale + _uniform(basis, generator)).clamp_(-127, 127)
        v = q * scale
        return hadamard.unrotate_weight(v, group) if group else v
    if name == "int8_blockwise":
        b, (n, k) = p.block_size, w.shape
        scale = p.scale.repeat_interleave(b, 0)[:n].repeat_interleave(b, 1)[:, :k]
        return torch.floor(w / scale + _uniform(w, generator)).clamp_(-127, 127) * scale
    if name in ("float8_e4m3fn", "float8_e5m2"):
        scale = p.scale.reshape(-1, 1) if p.scale.numel() > 1 else p.scale.reshape(())
        return stochastic_fp8(w / scale, rtn.qdata.dtype, generator) * scale
    raise UserError(f"stochastic rounding is not available for {name} layers (int8 and fp8 only); "
                    "bake with stochastic=False")


def stochastic_fp8(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` (float32, inside the fp8 range) stochastically rounded to the ``dtype`` grid, as float32.

    The two neighbours come from the nearest value and its next code in magnitude (fp8 codes of one sign are
    ordered like their magnitudes).
    """
    fmax = float(torch.finfo(dtype).max)
    a = x.abs().clamp(max=fmax)
    near = a.to(dtype)
    near_f = near.float()
    bits = near.view(torch.uint8).to(torch.int16)
    below = near_f <= a
    other_bits = torch.where(below, bits + 1, bits - 1).clamp_(0, 255).to(torch.uint8)
    other = other_bits.view(dtype).float()
    other = torch.where(below & (near_f >= fmax), near_f, other)  # nothing above the largest finite value
    other = torch.where(~below & (bits == 0), near_f, other)  # nothing below zero in magnitude
    lo, hi = torch.where(below, near_f, other), torch.where(below, other, near_f)
    gap = hi - lo
    p_hi = torch.where(gap > 0, (a - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(a))
    out = torch.where(_uniform(a, generator) < p_hi, hi, lo)
    return out.copysign(x)
