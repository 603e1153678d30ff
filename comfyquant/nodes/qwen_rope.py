"""Qwen-Image's attention with its q / k norms, RoPE and stream join in one launch per stream (the folded
``QwenImageTransformerBlock``'s, ``nodes.wan_blocks``).

ComfyUI's ``comfy.ldm.qwen_image.model.Attention`` projects each stream (``to_q`` / ``to_k`` / ``to_v`` for the image,
``add_*_proj`` for the text), makes q and k contiguous, runs four per-head ``RMSNorm`` s, joins the streams (text
first) with three ``torch.cat``, rotates the joint q and k with ``flux.math.apply_rope1`` (``EmbedND``'s rotations)
and calls ``optimized_attention_masked``. :class:`FusedQwenAttention` computes the same with the projections as the
stock forward calls them (in its order, with the block's sibling q / k / v group armed, so they still run as one
GEMM) and ``runtime.rope.norm_rope_parts`` writing each stream's rows of the joint q / k / v (on CUDA the kernel; where
it does not take the tensors, the same norm, rotation and joins in torch). It declines (the stock forward runs) where
the attention is not ComfyUI's own class, an ``attn1_patch`` is set or a norm is patched per call.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from comfyquant.nodes.flux_rope import FLUX_MATH, plain_rms
from comfyquant.runtime.rope import norm_rope_parts
from comfyquant.runtime.siblings import ArmedForward

QWEN_MODEL = "comfy.ldm.qwen_image.model"
IMG, TXT = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _stock_module(attn: nn.Module) -> Any | None:
    """The attention's module where it is ComfyUI's own ``Attention`` rotating with ``flux.math.apply_rope1`` and
    calling ``optimized_attention_masked``, else None."""
    cls = type(attn)
    mod = sys.modules.get(cls.__module__)
    rope = getattr(mod, "apply_rope1", None)
    if (cls.__module__ != QWEN_MODEL or cls.__name__ != "Attention" or getattr(rope, "__module__", None) != FLUX_MATH
            or not callable(getattr(mod, "optimized_attention_masked", None))):
        return None
    return mod


class FusedQwenAttention:
    """One block's fused attention path (``enabled`` False, or an attention that is not the stock one: never)."""

    def __init__(self, attn: nn.Module, enabled: bool = True) -> None:
        self.attn = attn
        self.module = _stock_module(attn) if enabled else None
        self.heads, self.head_dim = int(attn.heads), int(attn.dim_head)

    def weights(self) -> tuple[torch.Tensor, ...] | None:
        """The four norms' weights (image q, k, text q, k) and their common eps, or None where a norm is not a plain
        ``RMSNorm`` over the head."""
        if self.module is None:
            return None
        norms = [getattr(self.attn, n, None) for n in NORMS]
        if not all(plain_rms(n, self.head_dim) for n in norms) or len({n.eps for n in norms}) != 1:
            return None
        return (*(n.weight for n in norms), norms[0].eps)

    def __call__(self, img: torch.Tensor, txt: torch.Tensor, mask: Any, pe: Any,
                 options: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(img_out, txt_out)`` as the stock forward returns them, the projections run as called here (the
        caller hands them their norms), or None where the path does not apply (nothing computed)."""
        w = self.weights()
        if (w is None or torch.compiler.is_compiling() or not isinstance(pe, torch.Tensor)
                or (options.get("patches") or {}).get("attn1_patch") or img.dim() != 3 or txt.dim() != 3):
            return None
        a, (h, d) = self.attn, (self.heads, self.head_dim)

        def project() -> tuple[tuple, tuple]:
            return tuple(a._modules[n](img) for n in IMG), tuple(a._modules[n](txt) for n in TXT)

        armed = a.__dict__.get("forward")  # the stock forward runs armed: its q / k / v stay one GEMM here too
        img_qkv, txt_qkv = armed.run(project) if isinstance(armed, ArmedForward) else project()
        shape = (img.shape[0], h, img.shape[1] + txt.shape[1], d)
        out = tuple(torch.empty(shape, dtype=img_qkv[0].dtype, device=img.device) for _ in range(3))
        # the kernel where it takes the projections, else the same ops in torch (runtime.rope's fallback)
        norm_rope_parts(txt_qkv, (0, 0, 0), h, d, w[2], w[3], w[4], pe, out, 0)
        norm_rope_parts(img_qkv, (0, 0, 0), h, d, w[0], w[1], w[4], pe, out, txt.shape[1])
        return self._attend(out, txt.shape[1], mask, img.dtype, options)

    def _attend(self, qkv: tuple, seq_txt: int, mask: Any, dtype: torch.dtype,
                options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``optimized_attention_masked`` on the joint q / k / v and the output projections, as the stock forward
        ends (its text-mask layout included, in the image stream's ``dtype``)."""
        a, q = self.attn, qkv[0]
        attn_mask = None
        if mask is not None:
            attn_mask = torch.zeros((q.shape[0], 1, q.shape[2]), dtype=dtype, device=q.device)
            attn_mask[:, 0, :seq_txt] = mask
        joint = self.module.optimized_attention_masked(*qkv, self.heads, attn_mask, transformer_options=options,
                                                        skip_reshape=True)
        img_out = a.to_out[1](a.to_out[0](joint[:, seq_txt:, :]))
        return img_out, a.to_add_out(joint[:, :seq_txt, :])
