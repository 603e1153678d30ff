"""Wan 2.x's and Qwen-Image's blocks with their modulated LayerNorms handed to the quantized layers they feed.

ComfyUI's ``WanAttentionBlock`` (``comfy.ldm.wan.model``) computes ``addcmul(shift, norm1(x), 1 + scale)`` before
``self_attn`` and the same with ``norm2`` before ``ffn``; ``QwenImageTransformerBlock`` (``comfy.ldm.qwen_image``)
does it four times, before its attention's image and text projections and before each stream's MLP. Each is a
layer_norm, a ``1 + scale`` and an ``addcmul``: three launches and two passes over the activation that the
quantized layers' activation quantizer can do as it reads x (``runtime.modulation``). Unlike Flux's, these
blocks hand the normed activation to a submodule (the attention, the MLP) that reads it only through its first
linears, so the fold needs no copy of the submodule's forward: the block's forward (an object patch on the
clone, or set on the loader's own model) calls the stock submodule with the un-normed input and the norm handed
to those linears for the call (``modulation.modulated_call``); fused q / k / v apply it in their one GEMM. The
gated residual adds are ComfyUI's. Calls the fold does not reproduce run the class's own forward: per-token
modulation (Wan 2.2's per-frame ``e``, Qwen-Image's ``timestep_zero_index`` for reference images), and blocks
of other classes (Wan's VACE / audio / animate blocks subclass the block and override ``forward``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from comfyquant.nodes.qwen_rope import FusedQwenAttention
from comfyquant.runtime.kernels.acts import layer_mod
from comfyquant.runtime.modulation import (
    ModulationSite,
    affine_free_eps,
    hands_norm,
    modulated_call,
    with_call_norms,
)
from comfyquant.runtime.norms import child_modules


class FoldedWanBlock:
    """A ``WanAttentionBlock``'s ``forward`` with ``norm1`` handed to ``self_attn``'s q / k / v and ``norm2`` to
    ``ffn``'s first linear (the block's own forward for calls it does not reproduce: see the module docstring)."""

    ATTN, FFN = ("q", "k", "v"), ("0",)

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.eps = affine_free_eps(block.norm1, block.dim)
        if affine_free_eps(block.norm2, block.dim) != self.eps:
            self.eps = None
        self.sites = (ModulationSite(self.eps or 0.0), ModulationSite(self.eps or 0.0))
        self.cast_to = importlib.import_module("comfy.model_management").cast_to

    def __call__(self, x: torch.Tensor, e: torch.Tensor, freqs: Any, context: Any, context_img_len: int = 257,
                 transformer_options: dict | None = None) -> torch.Tensor:
        b, options = self.block, transformer_options if transformer_options is not None else {}
        mods = None
        if self.eps is not None and x.dim() == 3 and e.ndim in (3, 4):
            m = self.cast_to(b.modulation, dtype=x.dtype, device=x.device)  # [1, 6, C]
            mods = (m + e).chunk(6, dim=1) if e.ndim == 3 else (m.unsqueeze(0) + e).unbind(2)  # each [B, F, C]
        if mods is None or mods[0].shape[1] != 1:  # (F > 1: a modulation per frame, repeated over its tokens)
            return type(b).forward(b, x, e, freqs, context, context_img_len=context_img_len,
                                   transformer_options=options)
        e = mods
        attn, ffn = child_modules(b.self_attn, self.ATTN), child_modules(b.ffn, self.FFN)
        x = x.contiguous()
        y = modulated_call(b.self_attn, attn or (), x, e[0], e[1], self.eps, self.sites[0], freqs,
                           transformer_options=options)
        x = torch.addcmul(x, y, e[2])
        del y
        x = x + b.cross_attn(b.norm3(x), context, context_img_len=context_img_len, transformer_options=options)
        for p in (options.get("patches") or {}).get("attn2_patch", ()):
            x = p({"x": x, "transformer_options": options})
        y = modulated_call(b.ffn, ffn or (), x, e[3], e[4], self.eps, self.sites[1])
        return torch.addcmul(x, y, e[5])


class FoldedQwenBlock:
    """A ``QwenImageTransformerBlock``'s ``forward`` with its four modulated norms handed to the attention's image
    and text projections and to each MLP's first linear."""

    IMG, TXT, MLP = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"), ("net.0.proj",)

    def __init__(self, block: nn.Module, fuse_rope: bool = True) -> None:
        self.block = block
        # with fuse_rope, its attention's q / k norms, RoPE and joins in one launch per stream on CUDA
        # (nodes.qwen_rope; ComfyUI's class at 1024², H100: 1.43x -> 1.62x stock bf16, run 111)
        self.fused = FusedQwenAttention(block.attn, fuse_rope)
        eps = {affine_free_eps(block._modules[n], block.dim)
               for n in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")}
        self.eps = eps.pop() if len(eps) == 1 else None
        self.sites = {n: ModulationSite(self.eps or 0.0) for n in ("img1", "txt1", "img2", "txt2")}

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_mask: Any = None, temb: Any = None, image_rotary_emb: Any = None,
                 timestep_zero_index: Any = None, transformer_options: dict | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        b, options = self.block, transformer_options if transformer_options is not None else {}
        if self.eps is None or timestep_zero_index is not None or hidden_states.dim() != 3:
            return type(b).forward(b, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                   image_rotary_emb, timestep_zero_index, transformer_options=options)
        img_mod1, img_mod2 = b.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = b.txt_mod(temb).chunk(2, dim=-1)
        img_shift, img_scale, img_gate = (t.unsqueeze(1) for t in img_mod1.chunk(3, dim=-1))
        txt_shift, txt_scale, txt_gate = (t.unsqueeze(1) for t in txt_mod1.chunk(3, dim=-1))
        img_attn, txt_attn = self._attention(hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                             (img_shift, img_scale), (txt_shift, txt_scale), image_rotary_emb,
                                             options)
        hidden_states = torch.addcmul(hidden_states, img_gate, img_attn)
        encoder_hidden_states = torch.addcmul(encoder_hidden_states, txt_gate, txt_attn)
        del img_attn, txt_attn
        hidden_states = self._mlp(b.img_mlp, hidden_states, img_mod2, self.sites["img2"])
        encoder_hidden_states = self._mlp(b.txt_mlp, encoder_hidden_states, txt_mod2, self.sites["txt2"])
        return encoder_hidden_states, hidden_states

    def _attention(self, img: torch.Tensor, txt: torch.Tensor, mask: Any, img_mod: tuple, txt_mod: tuple,
                   pe: Any, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock attention on both streams' un-normed inputs, each stream's norm handed to its projections;
        both normed in torch first where either stream's projections cannot take it."""
        attn = self.block.attn
        img_layers, txt_layers = child_modules(attn, self.IMG), child_modules(attn, self.TXT)
        if not (hands_norm(img_layers or (), img, *img_mod) and hands_norm(txt_layers or (), txt, *txt_mod)):
            return attn(hidden_states=layer_mod(img, *img_mod, self.eps),
                        encoder_hidden_states=layer_mod(txt, *txt_mod, self.eps), encoder_hidden_states_mask=mask,
                        image_rotary_emb=pe, transformer_options=options)
        norms = ((img_layers, self.sites["img1"].norm(*img_mod, int(img.shape[1]))),
                 (txt_layers, self.sites["txt1"].norm(*txt_mod, int(txt.shape[1]))))
        fused = with_call_norms(self.fused, norms, img, txt, mask, pe, options)
        if fused is not None:
            return fused
        return with_call_norms(attn, norms, hidden_states=img, encoder_hidden_states=txt,
                               encoder_hidden_states_mask=mask, image_rotary_emb=pe, transformer_options=options)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, mod: torch.Tensor, site: ModulationSite) -> torch.Tensor:
        """``x + gate * mlp(modulated norm of x)``, the norm handed to the MLP's first linear."""
        shift, scale, gate = (t.unsqueeze(1) for t in mod.chunk(3, dim=-1))
        first = child_modules(mlp, self.MLP)
        y = modulated_call(mlp, first or (), x, shift, scale, self.eps, site)
        return torch.addcmul(x, gate, y)

