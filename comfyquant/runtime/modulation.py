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

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import ModulatedNorm, Norm, layer_mod
from comfyquant.runtime.nn import QuantLinear, _same, _state


class ModulationSite:
    """One modulated norm's buffer: ``[G, 2K]`` (each batch item's shift, then its scale) in the modulation's
    dtype, remade when the batch size, width, dtype or device changes. ``rms``: the norm is an RMSNorm without a
    weight (LTX-Video's), not a LayerNorm."""

    __slots__ = ("_buf", "_buf3", "eps", "rms")

    def __init__(self, eps: float, rms: bool = False) -> None:
        self.eps = float(eps)
        self.rms = rms
        self._buf: torch.Tensor | None = None  # [G, 2K], what the kernels read
        self._buf3: torch.Tensor | None = None  # the same memory as [G, 1, 2K], for [G, 1, K] inputs

    def norm(self, shift: torch.Tensor, scale: torch.Tensor, rows: int) -> ModulatedNorm:
        """The ``acts.ModulatedNorm`` for this call: ``shift`` and ``scale`` (``[G, 1, K]`` or ``[G, K]``) copied
        into the site's buffer (one launch), ``rows`` rows per batch item."""
        buf, ss = self._buf, shift.shape
        # remade for another shape, dtype or device, and where a buffer made under inference_mode (ComfyUI samples
        # in it) would be written outside it (torch refuses in-place writes to inference tensors there)
        if (buf is None or buf.shape[0] != ss[0] or buf.shape[1] != 2 * ss[-1] or buf.dtype != shift.dtype
                or buf.device != shift.device or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            buf = self._buf = torch.empty((ss[0], 2 * ss[-1]), dtype=shift.dtype, device=shift.device)
            self._buf3 = buf.view(ss[0], 1, 2 * ss[-1])
        # one cat into a view shaped as the inputs (each reshape would be another call into torch, every step)
        if scale.dim() != len(ss):  # ([G, 1, K] with [G, K]: per_item takes either for each)
            scale = scale.view(ss)
        torch.cat((shift, scale), dim=-1, out=self._buf3 if len(ss) == 3 else buf)
        return ModulatedNorm(buf, self.eps, rows, rms=self.rms)


class RmsModulationSite:
    """One modulated RMSNorm's buffer (Z-Image's / Lumina 2's ``rms_norm(x) * w * (1 + scale)``): fp32 ``[G, 2K]``,
    each batch item's shift (zeros) then ``w * (1 + scale) - 1`` (``acts.ModulatedNorm`` with ``rms``), so the
    kernel's ``1 + scale`` is the norm's weight times the item's modulation in fp32."""

    __slots__ = ("_buf", "_weight", "eps")

    def __init__(self, eps: float) -> None:
        self.eps = float(eps)
        self._buf: torch.Tensor | None = None
        self._weight: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (state, w in fp32, w - 1)

    def norm(self, weight: torch.Tensor, scale: torch.Tensor, rows: int) -> ModulatedNorm:
        """The norm for this call: the norm's ``weight [K]`` times ``1 + scale [G, K]`` into the buffer's scale
        half (one launch; ``weight`` in fp32 and ``weight - 1`` are kept while it stays the same tensor)."""
        buf, (g, k) = self._buf, scale.shape
        if (buf is None or buf.shape[0] != g or buf.shape[1] != 2 * k or buf.device != scale.device
                or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            buf = self._buf = torch.zeros((g, 2 * k), dtype=torch.float32, device=scale.device)
        kept = self._weight
        if kept is None or not _same(kept[0], weight) or kept[1].device != scale.device:
            w = weight.detach().to(device=scale.device, dtype=torch.float32)
            kept = self._weight = (_state(weight), w, w - 1)
        torch.addcmul(kept[2], kept[1], scale, out=buf[:, k:])  # w * (1 + scale) - 1, in fp32
        return ModulatedNorm(buf, self.eps, rows, rms=True)

    def forget(self) -> None:
        """Drop the kept copies of the weight (an in-place write to an inference tensor changes neither its
        object, storage nor a version counter)."""
        self._weight = None


def affine_free_eps(norm: nn.Module | None, width: int) -> float | None:
    """The eps of an ``nn.LayerNorm`` over ``width`` without weight or bias (the norm a modulated DiT block
    modulates: Flux's, SD3's), else None (another norm: not foldable as a modulated LayerNorm)."""
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (width,):
        return None
    return None if norm.weight is not None or norm.bias is not None else float(norm.eps)


def per_item(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a modulation tensor holds one vector per batch item of ``x [B, T, K]`` (``[B, 1, K]`` or
    ``[B, K]``): what the fold assumes (ComfyUI's per-token modulation, ``modulation_dims``, is not that)."""
    ts, xs = t.shape, x.shape  # (read once: each tensor attribute is a call into torch, on every block's call)
    if len(xs) != 3 or ts[-1] != xs[-1] or ts[0] != xs[0]:
        return False
    return len(ts) == 2 or (len(ts) == 3 and ts[1] == 1)


def modulated_linear(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                     site: ModulationSite | None, *, checked: bool = False) -> torch.Tensor:
    """``layer(layer_norm(x, eps) * (1 + scale) + shift)`` for ``x [B, T, K]`` and per-item ``shift`` / ``scale``
    (:func:`per_item`). A quantized layer that takes a norm (``QuantLinear.takes_norm``) gets it through
    ``site`` and applies it in its quantizer where the chosen kernel can (else in torch, the same values); any
    other layer, or a traced call, gets :func:`acts.layer_mod` first. ``checked``: the caller has verified
    :func:`per_item` for both (a block forward that checks its modulations once, before it computes anything)."""
    # (``normed`` asks ``takes_norm`` itself: a layer that takes none gets the norm in torch there, the same values)
    if (site is not None and isinstance(layer, QuantLinear) and layer.weight is not None
            and not torch.compiler.is_compiling() and (checked or (per_item(shift, x) and per_item(scale, x)))):
        return layer.normed(x, site.norm(shift, scale, int(x.shape[1])))
    return layer(layer_mod(x, shift, scale, eps))


def modulated_module(module: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                     site: ModulationSite | None, *, checked: bool = False) -> torch.Tensor:
    """``module`` on the modulated norm of ``x``, as :func:`modulated_linear` computes it: an ``nn.Sequential``
    (a block's MLP) hands the norm to its first layer and runs the rest after it; any other module gets it as a
    layer does (a quantized linear in its quantizer, anything else after the norm in torch)."""
    if isinstance(module, nn.Sequential) and len(module) > 0:
        first, *rest = list(module)
        h = modulated_linear(first, x, shift, scale, eps, site, checked=checked)
        for m in rest:
            h = m(h)
        return h
    return modulated_linear(module, x, shift, scale, eps, site, checked=checked)


def accepts_call_norm(layer: nn.Module) -> bool:
    """Whether a norm can be handed to ``layer`` for one call (``QuantLinear.call_norm``): a quantized linear with
    a weight and no input activation or folded norm of its own (a member of a fused sibling group may: the
    group's GEMM applies its members' common call norm)."""
    d = layer.__dict__
    return (isinstance(layer, QuantLinear) and layer.weight is not None and d.get("input_act") is None
            and d.get("input_norm") is None)


def hands_norm(layers: Sequence[nn.Module], x: torch.Tensor, *mods: torch.Tensor) -> bool:
    """Whether a norm can be handed to ``layers`` for an eager call on ``x`` (:func:`with_call_norms`): some layers,
    each :func:`accepts_call_norm`, and each modulation tensor in ``mods`` one vector per batch item of x."""
    return (len(layers) > 0 and not torch.compiler.is_compiling() and all(per_item(t, x) for t in mods)
            and all(accepts_call_norm(m) for m in layers))


def with_call_norms(module: nn.Module, norms: Sequence[tuple[Sequence[nn.Module], Norm]], *args: Any,
                    **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with each ``(layers, norm)`` pair's norm handed to its layers for the call: the
    caller passes an input un-normed, and every layer that reads it applies the norm first (in its quantizer
    where the kernel can, else in torch: the same values). Each pair's layers must be all the module reads that
    input through, each :func:`accepts_call_norm` (a module's attention projections on one stream, say)."""
    held = [(m.__dict__, norm) for layers, norm in norms for m in layers]
    for d, norm in held:
        d["call_norm"] = norm
    try:
        return module(*args, **kwargs)
    finally:
        for d, _ in held:
            d["call_norm"] = None


def modulated_call(module: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor, shift: torch.Tensor,
                   scale: torch.Tensor, eps: float, site: ModulationSite | None, *args: Any, **kwargs: Any) -> Any:
    """``module(layer_norm(x, eps) * (1 + scale) + shift, *args, **kwargs)`` where ``module`` reads its first
    argument only through ``layers`` (a block's attention and its q / k / v, an MLP and its first linear): the
    norm is handed to them (:func:`with_call_norms`) and the normed input never made. In torch first where a
    layer cannot take it, in a traced call, or for a modulation that is not one vector per batch item."""
    if site is not None and hands_norm(layers, x, shift, scale):
        return with_call_norms(module, ((layers, site.norm(shift, scale, int(x.shape[1]))),), x, *args, **kwargs)
    return module(layer_mod(x, shift, scale, eps), *args, **kwargs)


def gated_add_(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``residual += y * gate`` in place, one launch (a block's ``x += apply_mod(out, gate)``: two)."""
    return residual.addcmul_(y, gate)
