"""A DiT block's modulated LayerNorms folded into the quantized linears they feed, and its gated residual adds.

Flux-style blocks compute ``linear(layer_norm(x) * (1 + scale) + shift)`` with a shift and scale per batch item
(the block's modulation of the timestep embedding), and then ``x += gate * out``. In eager torch that is a
layer_norm, a ``1 + scale`` and an ``addcmul`` before the linear (three launches, each a full read and write of
the activation) and a multiply and an add after it. The quantized linear's activation quantizer reads x anyway:
with the row in registers it can take the row's mean and variance and apply the modulation before the absmax
(``acts.ModulatedNorm``, ``act_kernels.layer_mod``), so the normed activation is never written. The residual
add becomes one ``addcmul_``.

Kernels read the modulation by pointer, so each norm site keeps one buffer (:class:`ModulationSite`) that is
refilled per call (one small copy): a layer's eager plan, which holds its pointers, stays valid from step to
step, and CUDA-graph capture sees a fixed address.
"""

from __future__ import annotations

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import ModulatedNorm, layer_mod
from comfyquant.runtime.nn import QuantLinear


class ModulationSite:
    """One modulated norm's buffer: ``[G, 2K]`` (each batch item's shift, then its scale) in the modulation's
    dtype, remade when the batch size, width, dtype or device changes."""

    __slots__ = ("_buf", "eps")

    def __init__(self, eps: float) -> None:
        self.eps = float(eps)
        self._buf: torch.Tensor | None = None

    def norm(self, shift: torch.Tensor, scale: torch.Tensor, rows: int) -> ModulatedNorm:
        """The ``acts.ModulatedNorm`` for this call: ``shift`` and ``scale`` (``[G, 1, K]`` or ``[G, K]``) copied
        into the site's buffer (one launch), ``rows`` rows per batch item."""
        g, k = shift.shape[0], shift.shape[-1]
        buf = self._buf
        # remade for another shape, dtype or device, and where a buffer made under inference_mode (ComfyUI samples
        # in it) would be written outside it (torch refuses in-place writes to inference tensors there)
        if (buf is None or buf.shape[0] != g or buf.shape[1] != 2 * k or buf.dtype != shift.dtype
                or buf.device != shift.device or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            buf = self._buf = torch.empty((g, 2 * k), dtype=shift.dtype, device=shift.device)
        torch.cat((shift.reshape(g, k), scale.reshape(g, k)), dim=-1, out=buf)
        return ModulatedNorm(buf, self.eps, rows)


def affine_free_eps(norm: nn.Module | None, width: int) -> float | None:
    """The eps of an ``nn.LayerNorm`` over ``width`` without weight or bias (the norm a modulated DiT block
    modulates: Flux's, SD3's), else None (another norm: not foldable as a modulated LayerNorm)."""
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (width,):
        return None
    return None if norm.weight is not None or norm.bias is not None else float(norm.eps)


def per_item(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a modulation tensor holds one vector per batch item of ``x [B, T, K]`` (``[B, 1, K]`` or
    ``[B, K]``): what the fold assumes (ComfyUI's per-token modulation, ``modulation_dims``, is not that)."""
    if x.dim() != 3 or t.shape[-1] != x.shape[-1] or t.shape[0] != x.shape[0]:
        return False
    return t.dim() == 2 or (t.dim() == 3 and t.shape[1] == 1)


def modulated_linear(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                     site: ModulationSite | None) -> torch.Tensor:
    """``layer(layer_norm(x, eps) * (1 + scale) + shift)`` for ``x [B, T, K]`` and per-item ``shift`` / ``scale``
    (:func:`per_item`). A quantized layer that takes a norm (``QuantLinear.takes_norm``) gets it through
    ``site`` and applies it in its quantizer where the chosen kernel can (else in torch, the same values); any
    other layer, or a traced call, gets :func:`acts.layer_mod` first."""
    if (site is not None and isinstance(layer, QuantLinear) and layer.weight is not None and layer.takes_norm()
            and not torch.compiler.is_compiling() and per_item(shift, x) and per_item(scale, x)):
        return layer.normed(x, site.norm(shift, scale, int(x.shape[1])))
    return layer(layer_mod(x, shift, scale, eps))


def gated_add_(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``residual += y * gate`` in place, one launch (a block's ``x += apply_mod(out, gate)``: two)."""
    return residual.addcmul_(y, gate)
