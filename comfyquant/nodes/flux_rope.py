"""The fused q / k norm + RoPE path of the folded Flux blocks (``nodes.flux_blocks``): when it applies, and the
attention call it hands q, k, v to.

ComfyUI's Flux-family blocks run ``QKNorm`` (an ``RMSNorm`` each for q and k), then ``flux.math.attention``: RoPE
with ``EmbedND``'s rotations and ``optimized_attention(q, k, v, heads, skip_reshape=True)``. The folded blocks do the
norm and RoPE in one launch per stream (``runtime.rope.norm_rope_heads``) and call the same
``optimized_attention`` (looked up per call, so another node's replacement of it still runs). They keep the stock
calls where the block's attention is not ``flux.math``'s own (a node replaced it), where a norm is not a plain
``RMSNorm`` with a ``[D]`` weight (LoRA patches applied per call, offloaded weights), and wherever the kernel does
not take the tensors (CPU, fp32, an unusual ``pe``): those calls compute exactly what the stock block computes.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.rope import QKV, kernel_applies, norm_rope_heads

FLUX_MATH = "comfy.ldm.flux.math"
Weights = tuple[torch.Tensor, torch.Tensor, float | None]


def _is_stock_attention(fn: Any) -> bool:
    return getattr(fn, "__module__", None) == FLUX_MATH and getattr(fn, "__name__", None) == "attention"


def plain_rms(norm: nn.Module, d: int) -> bool:
    """An ``nn.RMSNorm`` over ``[d]`` with its weight, and no per-call weight patches (ComfyUI's lowvram / LoRA
    ``weight_function``) or per-call weight casts."""
    return (isinstance(norm, nn.RMSNorm) and tuple(norm.normalized_shape) == (d,) and norm.weight is not None
            and not getattr(norm, "weight_function", None) and not getattr(norm, "bias_function", None)
            and not getattr(norm, "comfy_cast_weights", False))


class FusedQKRope:
    """One block's fused path: its module's stock ``attention`` (None: the block's attention is not ComfyUI's
    own, or ``enabled`` is off, so the path never runs), heads and head size."""

    def __init__(self, block: nn.Module, heads: int, hidden: int, enabled: bool = True) -> None:
        self.layers = sys.modules[type(block).__module__]
        found = getattr(self.layers, "attention", None)
        self.math = sys.modules.get(FLUX_MATH)
        usable = enabled and _is_stock_attention(found) and callable(getattr(self.math, "optimized_attention", None))
        self.stock = found if usable else None
        self.heads, self.head_dim = heads, hidden // heads

    def weights(self, qk_norm: nn.Module) -> Weights | None:
        """(q weight, k weight, eps) of a ``QKNorm``, or None where the fused path must leave it to the stock call
        (also when the stock attention was replaced since the block was folded)."""
        if self.stock is None or getattr(self.layers, "attention", None) is not self.stock:
            return None
        qn, kn = getattr(qk_norm, "query_norm", None), getattr(qk_norm, "key_norm", None)
        if not (plain_rms(qn, self.head_dim) and plain_rms(kn, self.head_dim)) or qn.eps != kn.eps:
            return None
        return qn.weight, kn.weight, qn.eps

    def applies(self, qkv: torch.Tensor, w: Weights | None, pe: torch.Tensor | None, tokens: int) -> bool:
        """Whether the kernel takes this stream's projection (``tokens``: the joint sequence it is part of)."""
        return (w is not None and not torch.compiler.is_compiling()  # traced: the stock ops, which compile
                and kernel_applies((qkv, qkv, qkv), self.heads, self.head_dim, w[:2], pe, tokens))

    def joint(self, streams: tuple[tuple[torch.Tensor, Weights], ...], pe: torch.Tensor | None) -> QKV:
        """q, k, v of the streams joined in order (each ``(projection, weights)``), normed and rotated."""
        first = streams[0][0]
        total = sum(s[0].shape[1] for s in streams)
        shape = (first.shape[0], self.heads, total, self.head_dim)
        out = tuple(torch.empty(shape, dtype=first.dtype, device=first.device) for _ in range(3))
        start = 0
        for qkv, (qw, kw, eps) in streams:  # (applies() checked the kernel takes them: on CUDA it runs)
            norm_rope_heads(qkv, self.heads, self.head_dim, qw, kw, eps, pe, out, start, kernel=qkv.is_cuda)
            start += qkv.shape[1]
        return out

    def single(self, h: torch.Tensor, w: Weights, pe: torch.Tensor | None) -> QKV:
        """q, k (normed and rotated) and v (a view) of a single block's ``linear1`` output."""
        return norm_rope_heads(h, self.heads, self.head_dim, w[0], w[1], w[2], pe, None, 0, write_v=False,
                               kernel=h.is_cuda)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, options: dict) -> torch.Tensor:
        """What ``flux.math.attention`` does after RoPE: ComfyUI's ``optimized_attention`` on ``[B, H, L, D]``."""
        return self.math.optimized_attention(q, k, v, self.heads, skip_reshape=True, mask=mask,
                                             transformer_options=options)
