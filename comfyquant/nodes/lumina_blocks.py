"""Z-Image's and Lumina 2's blocks with their modulated RMSNorms handed to the quantized layers they feed.

ComfyUI's ``JointTransformerBlock`` (``comfy.ldm.lumina.model``, NextDiT) with modulation computes
``attention_norm1(x) * (1 + scale_msa)`` before ``attention`` (read only through its fused ``qkv``) and
``ffn_norm1(x) * (1 + scale_mlp)`` before ``feed_forward`` (read through ``w1`` and ``w3``): an RMSNorm with a
weight, then a per-item scale, each a pass over the activation and its launches. Both are one modulated RMSNorm
(``acts.ModulatedNorm`` with ``rms``: scale ``w * (1 + scale) - 1``, no shift, ``modulation.RmsModulationSite``),
handed to those layers for the call (``modulation.with_call_norms``) by the block's ``forward`` (an object patch
on the clone, or set on the loader's own model). The post-norms and gates are ComfyUI's; each gated residual add
is one ``addcmul`` (ComfyUI's ``x + gate * y``: two launches and passes). Calls it
does not reproduce run the class's own forward: reference images at timestep zero (``timestep_zero_index``),
blocks without modulation (the context refiner), norms without an eps of their own.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.modulation import RmsModulationSite, hands_norm, per_item, with_call_norms
from comfyquant.runtime.norms import child_modules


def _eps(norm: nn.Module | None, width: int) -> float | None:
    """The eps of an RMSNorm over ``width`` with a weight (the norm a Lumina block modulates), else None."""
    if (type(norm).__name__ != "RMSNorm" or tuple(getattr(norm, "normalized_shape", ())) != (width,)
            or getattr(norm, "weight", None) is None or getattr(norm, "eps", None) is None):
        return None
    return float(norm.eps)


class FoldedLuminaBlock:
    """A modulated ``JointTransformerBlock``'s ``forward`` with ``attention_norm1`` handed to ``attention.qkv`` and
    ``ffn_norm1`` to ``feed_forward.w1`` / ``w3`` (the block's own forward where it does not reproduce it)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        dim = block.attention_norm1.normalized_shape[0]
        eps = {_eps(block.attention_norm1, dim), _eps(block.ffn_norm1, dim)}
        self.eps = eps.pop() if len(eps) == 1 and getattr(block, "modulation", False) else None
        self.sites = (RmsModulationSite(self.eps or 0.0), RmsModulationSite(self.eps or 0.0))
        self.clamp_fp16 = sys.modules[type(block).__module__].clamp_fp16

    def forget_derived(self) -> None:
        """Drop the sites' kept copies of the norms' weights (``nodes.patching.forget_derived``)."""
        for site in self.sites:
            site.forget()

    def __call__(self, x: torch.Tensor, x_mask: Any, freqs_cis: Any, adaln_input: Any = None,
                 timestep_zero_index: Any = None, transformer_options: dict | None = None) -> torch.Tensor:
        b, options = self.block, transformer_options if transformer_options is not None else {}
        attn, ffn = b.attention, b.feed_forward
        qkv, mlp = child_modules(attn, ("qkv",)), child_modules(ffn, ("w1", "w3"))
        if (self.eps is None or timestep_zero_index is not None or adaln_input is None or x.dim() != 3
                or qkv is None or mlp is None or not hands_norm([*qkv, *mlp], x)):
            return type(b).forward(b, x, x_mask, freqs_cis, adaln_input, timestep_zero_index,
                                   transformer_options=options)
        scale_msa, gate_msa, scale_mlp, gate_mlp = b.adaLN_modulation(adaln_input).chunk(4, dim=1)
        if not per_item(scale_msa, x):
            return type(b).forward(b, x, x_mask, freqs_cis, adaln_input, timestep_zero_index,
                                   transformer_options=options)
        rows = int(x.shape[1])
        norm = self.sites[0].norm(b.attention_norm1.weight, scale_msa, rows)
        h = with_call_norms(attn, ((qkv, norm),), x, x_mask, freqs_cis, transformer_options=options)
        x = torch.addcmul(x, gate_msa.unsqueeze(1).tanh(), b.attention_norm2(self.clamp_fp16(h)))
        norm = self.sites[1].norm(b.ffn_norm1.weight, scale_mlp, rows)
        h = with_call_norms(ffn, ((mlp, norm),), x)
        return torch.addcmul(x, gate_mlp.unsqueeze(1).tanh(), b.ffn_norm2(self.clamp_fp16(h)))

