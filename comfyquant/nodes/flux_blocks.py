"""Flux's double- and single-stream blocks with their modulated LayerNorms folded into the quantized linears.

ComfyUI's ``DoubleStreamBlock`` / ``SingleStreamBlock`` (``comfy.ldm.flux.layers``) compute each norm as
``apply_mod(layer_norm(x), 1 + scale, shift)`` inline in ``forward`` (no module the adapter could fold), then
``x += apply_mod(out, gate)``. These forwards compute the same block with ``runtime.modulation``: the norm
applied by the quantized ``qkv`` / ``mlp[0]`` / ``linear1`` as they quantize their input, the gated residual add
as one ``addcmul_``, and on CUDA the q / k norms, RoPE and a double block's join of its two streams as one launch
per stream (``nodes.flux_rope``). They are installed as ComfyUI's own block replacements (``patches_replace["dit"]``,
``ModelPatcher.set_model_patch_replace``), so they belong to the patched clone only and compose with other
nodes: a block that another node replaced already is left alone, and a call this forward does not reproduce
(attention patches, per-token modulation for reference-image models) goes to ``original_block``. Each forward
reads the block's modules per call (the clone's patched layers while it runs), and its module's ``attention``
function as it is then (another node may have replaced it since).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from comfyquant.nodes.flux_rope import FusedQKRope
from comfyquant.runtime.join import join_act
from comfyquant.runtime.modulation import (
    ModulationSite,
    affine_free_eps,
    gated_add_,
    modulated_linear,
    modulated_module,
    per_item,
)

FLUX_LAYERS = "comfy.ldm.flux.layers"
ATTENTION_PATCHES = ("attn1_patch", "attn1_output_patch")  # what the stock forward applies and these do not
# diffusion models whose forward calls "dit" block replacements with Flux's blocks: Flux.1 / Flux.2 / Kontext,
# Chroma (its blocks take their modulations in ``vec``), HunyuanVideo 1.0 (its mask as ``attention_mask``, its
# per-token modulation dims in the arguments)
MODELS = {("comfy.ldm.flux.model", "Flux"), ("comfy.ldm.chroma.model", "Chroma"),
          ("comfy.ldm.hunyuan_video.model", "HunyuanVideo")}


def _mask(args: dict) -> Any:
    return args["attn_mask"] if "attn_mask" in args else args.get("attention_mask")


def _per_token(args: dict, *keys: str) -> bool:
    """Whether the model passed per-token modulation dims (the stock block applies them; these forwards do not)."""
    return any(args.get(k) is not None for k in keys)


def _is(mod: nn.Module, name: str) -> bool:
    return type(mod).__name__ == name and type(mod).__module__ == FLUX_LAYERS


def _mods_fit(mods: tuple, x: torch.Tensor) -> bool:
    for m in mods:
        if not (per_item(m.shift, x) and per_item(m.scale, x) and per_item(m.gate, x)):
            return False
    return True


def _patched_attention(options: dict) -> bool:
    patches = options.get("patches", {}) if isinstance(options, dict) else {}
    return any(patches.get(name) for name in ATTENTION_PATCHES)


class FoldedDoubleBlock:
    """A ``DoubleStreamBlock``'s forward with its four modulated norms folded (a ComfyUI "dit" block
    replacement: ``(args, {"original_block": fn}) -> {"img", "txt"}``)."""

    def __init__(self, blocks: nn.ModuleList, index: int, fuse_rope: bool = True) -> None:
        # the model's list: a block another patch swapped in runs stock (read by its key: ModuleList's indexing
        # costs a few microseconds per call)
        self.blocks, self.slot = blocks, str(index)
        self.block = block = blocks[index]
        self.eps = affine_free_eps(block.img_norm1, block.hidden_size)
        self.sites = {name: ModulationSite(self.eps or 0.0) for name in ("img1", "img2", "txt1", "txt2")}
        self.rope = FusedQKRope(block, block.num_heads, block.hidden_size, fuse_rope)

    def __call__(self, args: dict, extra: dict) -> dict:
        out = None
        if not _per_token(args, "modulation_dims_img", "modulation_dims_txt"):
            out = self.forward(args["img"], args["txt"], args["vec"], args["pe"], _mask(args),
                               args.get("transformer_options") or {})
        if out is None:
            return extra["original_block"](args)
        return {"img": out[0], "txt": out[1]}

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: Any, pe: torch.Tensor, attn_mask: Any,
                options: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block's ``(img, txt)``, or None where the stock forward must run (see the module docstring)."""
        b = self.block
        if (self.eps is None or self.blocks._modules.get(self.slot) is not b or _patched_attention(options) or img.dim() != 3
                or txt.dim() != 3):
            return None
        if b.modulation:
            if not isinstance(vec, torch.Tensor) or vec.shape[0] != img.shape[0]:
                return None  # per-token modulation (modulation_dims): vec holds two rows per item
            img_mod1, img_mod2 = b.img_mod(vec)
            txt_mod1, txt_mod2 = b.txt_mod(vec)
        else:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        if not (_mods_fit((img_mod1, img_mod2), img) and _mods_fit((txt_mod1, txt_mod2), txt)):
            return None
        img_qkv = modulated_linear(b.img_attn.qkv, img, img_mod1.shift, img_mod1.scale, self.eps, self.sites["img1"],
                                   checked=True)
        txt_qkv = modulated_linear(b.txt_attn.qkv, txt, txt_mod1.shift, txt_mod1.scale, self.eps, self.sites["txt1"],
                                   checked=True)
        attn = self._attention(img_qkv, txt_qkv, pe, attn_mask, options)
        del img_qkv, txt_qkv
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        gated_add_(img, b.img_attn.proj(img_attn), img_mod1.gate)
        gated_add_(img, self._mlp(b.img_mlp, img, img_mod2, self.sites["img2"]), img_mod2.gate)
        gated_add_(txt, b.txt_attn.proj(txt_attn), txt_mod1.gate)
        gated_add_(txt, self._mlp(b.txt_mlp, txt, txt_mod2, self.sites["txt2"]), txt_mod2.gate)
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt

    def _attention(self, img_qkv: torch.Tensor, txt_qkv: torch.Tensor, pe: Any, attn_mask: Any,
                   options: dict) -> torch.Tensor:
        """Attention over the joined streams (text first): q / k normed and rotated with the streams' joins in
        one launch each where the fused path applies, else the stock block's ops."""
        b, rope = self.block, self.rope
        total = txt_qkv.shape[1] + img_qkv.shape[1]
        tw, iw = rope.weights(b.txt_attn.norm), rope.weights(b.img_attn.norm)
        if rope.applies(txt_qkv, tw, pe, total) and rope.applies(img_qkv, iw, pe, total):
            q, k, v = rope.joint(((txt_qkv, tw), (img_qkv, iw)), pe)
            return rope.attend(q, k, v, attn_mask, options)
        txt_q, txt_k, txt_v = self._heads(b.txt_attn, txt_qkv)
        img_q, img_k, img_v = self._heads(b.img_attn, img_qkv)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        del txt_q, img_q, txt_k, img_k, txt_v, img_v
        return rope.layers.attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=options)

    def _heads(self, attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, mod: Any, site: ModulationSite) -> torch.Tensor:
        """A block MLP on the modulated norm of x: an ``nn.Sequential`` takes it in its first layer, any other
        module (Flux.2's ``YakMLP``) after the norm in torch."""
        return modulated_module(mlp, x, mod.shift, mod.scale, self.eps, site, checked=True)


class FoldedSingleBlock:
    """A ``SingleStreamBlock``'s forward with its modulated pre-norm folded into ``linear1`` (a ComfyUI "dit"
    block replacement: ``(args, {"original_block": fn}) -> {"img"}``)."""

    def __init__(self, blocks: nn.ModuleList, index: int, fuse_rope: bool = True) -> None:
        self.blocks, self.slot = blocks, str(index)
        self.block = block = blocks[index]
        self.eps = affine_free_eps(block.pre_norm, block.hidden_size)
        self.site = ModulationSite(self.eps or 0.0)
        self.rope = FusedQKRope(block, block.num_heads, block.hidden_size, fuse_rope)

    def __call__(self, args: dict, extra: dict) -> dict:
        out = None
        if not _per_token(args, "modulation_dims"):
            out = self.forward(args["img"], args["vec"], args["pe"], _mask(args), args.get("transformer_options") or {})
        if out is None:
            return extra["original_block"](args)
        return {"img": out}

    def forward(self, x: torch.Tensor, vec: Any, pe: torch.Tensor, attn_mask: Any,
                options: dict) -> torch.Tensor | None:
        """The block's output, or None where the stock forward must run."""
        b = self.block
        if self.eps is None or self.blocks._modules.get(self.slot) is not b or _patched_attention(options) or x.dim() != 3:
            return None
        if b.modulation:
            if not isinstance(vec, torch.Tensor) or vec.shape[0] != x.shape[0]:
                return None
            mod = b.modulation(vec)[0]
        else:
            mod = vec
        if not _mods_fit((mod,), x):
            return None
        h = modulated_linear(b.linear1, x, mod.shift, mod.scale, self.eps, self.site, checked=True)
        qkv, mlp = torch.split(h, [3 * b.hidden_size, b.mlp_hidden_dim_first], dim=-1)
        w = self.rope.weights(b.norm)
        if self.rope.applies(h, w, pe, h.shape[1]):
            q, k, v = self.rope.single(h, w, pe)
            attn = self.rope.attend(q, k, v, attn_mask, options)
        else:
            q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, b.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = b.norm(q, k, v)
            attn = self.rope.layers.attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=options)
        del qkv, q, k, v
        gated_add_(x, b.linear2(_joined_mlp(b, attn, mlp)), mod.gate)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x


def _joined_mlp(b: nn.Module, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """``cat((attn, mlp_act(mlp)), 2)``, linear2's input: with Flux.1's GELU one pass on CUDA (``runtime.join``: the
    stock GELU on the strided MLP half then ``cat`` took ~2 ms of a 42 ms int8 step, run 101), else the stock ops."""
    if b.yak_mlp:
        half = b.mlp_hidden_dim_first // 2
        return torch.cat((attn, b.mlp_act(mlp[..., half:]) * mlp[..., :half]), 2)
    act = b.mlp_act
    if type(act) is nn.GELU:
        return join_act(attn, mlp, "gelu_tanh" if act.approximate == "tanh" else "gelu")
    return torch.cat((attn, act(mlp)), 2)


def fold_flux_blocks(patcher: Any, dm: nn.Module, converted: Callable[[str], bool],
                     taken: Collection[tuple[str, int]], fuse_rope: bool = True) -> list[str]:
    """Install :class:`FoldedDoubleBlock` / :class:`FoldedSingleBlock` on ``patcher`` (a clone) for every block of
    a Flux diffusion model ``dm`` whose norm-fed layers ``converted(path)`` says were quantized and that another
    node did not replace (``taken``: its "dit" replacement keys); returns what was folded
    (``"double_blocks.0: img_norm1, img_norm2, txt_norm1, txt_norm2"``)."""
    if (type(dm).__module__, type(dm).__name__) not in MODELS:
        return []
    done = []
    for i, block in enumerate(getattr(dm, "double_blocks", ())):
        path = f"double_blocks.{i}"
        fed = [f"{path}.{s}_attn.qkv" for s in ("img", "txt")] + [f"{path}.{s}_mlp.0" for s in ("img", "txt")]
        if (_is(block, "DoubleStreamBlock") and any(converted(p) for p in fed)
                and ("double_block", i) not in taken):
            folded = FoldedDoubleBlock(dm.double_blocks, i, fuse_rope)
            if folded.eps is not None:
                patcher.set_model_patch_replace(folded, "dit", "double_block", i)
                done.append(f"{path}: img_norm1, img_norm2, txt_norm1, txt_norm2")
    for i, block in enumerate(getattr(dm, "single_blocks", ())):
        path = f"single_blocks.{i}"
        if (_is(block, "SingleStreamBlock") and converted(f"{path}.linear1")
                and ("single_block", i) not in taken):
            folded = FoldedSingleBlock(dm.single_blocks, i, fuse_rope)
            if folded.eps is not None:
                patcher.set_model_patch_replace(folded, "dit", "single_block", i)
                done.append(f"{path}: pre_norm")
    return done
