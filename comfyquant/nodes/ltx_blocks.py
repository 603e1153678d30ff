"""LTX-Video's blocks with their modulated RMSNorms handed to the quantized layers they feed.

ComfyUI's LTXV ``BasicTransformerBlock`` (``comfy.ldm.lightricks.model``) computes ``rms_norm(x) * (1 + scale) +
shift`` before ``attn1`` (a self-attention that reads its input only through ``to_q`` / ``to_k`` / ``to_v``) and
the same, as ``addcmul(y, y, scale) + shift``, before the feed-forward (read through ``ff.net.0.proj``): an
RMSNorm without a weight, then the modulation, three to four launches and passes over the activation each. Both
are one modulated RMSNorm with a shift (``acts.ModulatedNorm`` with ``rms``; ``modulation.ModulationSite`` with
``rms``), handed to those layers for the call (``modulation.with_call_norms``) by the block's ``forward`` (an
object patch on the clone, or set on the loader's own model); the gated residual adds are in-place ``addcmul_``
as ComfyUI's (its attention one is a multiply and an in-place add). Calls it does not reproduce run the class's
own forward: a timestep per token (image-to-video conditioning gives each token its own), the cross-attention
AdaLN of later LTX versions, gated attention heads (their gate reads the normed input too).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.modulation import ModulationSite, hands_norm, with_call_norms
from comfyquant.runtime.norms import child_modules

ATTN = ("to_q", "to_k", "to_v")  # what attn1 reads its input through (self-attention: k / v read it as context)
FF_INPUT = "net.0.proj"  # the feed-forward's GELU_approx projection (or the activation fold's ProjectionOnly's)


def _rms_eps() -> float | None:
    """The eps ComfyUI's ``comfy.ldm.common_dit.rms_norm`` applies when a block calls it without one."""
    fn = getattr(importlib.import_module("comfy.ldm.common_dit"), "rms_norm", None)
    param = None if fn is None else inspect.signature(fn).parameters.get("eps")
    return None if param is None or not isinstance(param.default, float) else param.default


class FoldedLtxBlock:
    """An LTXV ``BasicTransformerBlock``'s ``forward`` with the attention's and the feed-forward's modulated
    RMSNorms handed to ``attn1``'s q / k / v and ``ff``'s input projection (the block's own forward for calls it
    does not reproduce: see the module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        table = getattr(block, "scale_shift_table", None)
        plain = (not getattr(block, "cross_attention_adaln", True) and getattr(block.attn1, "to_gate_logits", 1) is None
                 and isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[0] >= 6)
        self.eps = _rms_eps() if plain else None
        self.sites = (ModulationSite(self.eps or 0.0, rms=True), ModulationSite(self.eps or 0.0, rms=True))

    def __call__(self, x: torch.Tensor, context: Any = None, attention_mask: Any = None, timestep: Any = None,
                 pe: Any = None, transformer_options: dict | None = None, self_attention_mask: Any = None,
                 prompt_timestep: Any = None) -> torch.Tensor:
        b, options = self.block, transformer_options if transformer_options is not None else {}
        attn, ff = child_modules(b.attn1, ATTN), child_modules(b.ff, (FF_INPUT,))
        if (self.eps is None or not isinstance(timestep, torch.Tensor) or timestep.dim() != 3 or x.dim() != 3
                or timestep.shape[1] != 1 or attn is None or ff is None or not hands_norm([*attn, *ff], x)):
            return type(b).forward(b, x, context, attention_mask, timestep, pe, options, self_attention_mask,
                                   prompt_timestep)
        table = b.scale_shift_table
        mods = (table[None, None, :6].to(device=x.device, dtype=x.dtype)
                + timestep.reshape(x.shape[0], 1, table.shape[0], -1)[:, :, :6, :]).unbind(dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # each [B, 1, C]
        rows = int(x.shape[1])
        norm = self.sites[0].norm(shift_msa, scale_msa, rows)
        y = with_call_norms(b.attn1, ((attn, norm),), x, pe=pe, mask=self_attention_mask,
                            transformer_options=options)
        x.addcmul_(y, gate_msa)
        del y
        x += b.attn2(x, context=context, mask=attention_mask, transformer_options=options)
        norm = self.sites[1].norm(shift_mlp, scale_mlp, rows)
        x.addcmul_(with_call_norms(b.ff, ((ff, norm),), x), gate_mlp)
        return x
