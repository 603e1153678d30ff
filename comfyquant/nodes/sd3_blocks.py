"""SD3's joint blocks with their modulated LayerNorms folded into the quantized layers (``runtime.modulation``).

ComfyUI's MMDiT (``comfy.ldm.modules.diffusionmodules.mmdit``: SD3 / SD3.5) runs each ``JointBlock`` as
``block_mixing``: per stream ``attn.qkv(modulate(norm1(x), shift_msa, scale_msa))``, joint attention, then
``x + gate_msa * proj(attn)`` and ``x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))``; SD3.5
Medium's first blocks (``x_block_self_attn``) also run ``attn2.qkv(modulate(norm1(x), shift_msa2, scale_msa2))``,
a self-attention of the image stream alone, and add ``gate_msa2 * attn2.proj(...)``. This forward computes the
same with the norms applied by ``qkv`` / ``attn2.qkv`` / ``mlp.fc1`` as they quantize their input and each gated
residual add as one ``addcmul`` (out of place, as the stock block adds), installed as ComfyUI's own block
replacement (``patches_replace["dit"][("double_block", i)]``) on the patched clone. The variants it does not
reproduce go to ``original_block``: scale-only modulation, RMSNorm blocks, per-token conditioning.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.modulation import ModulationSite, affine_free_eps, modulated_linear

MMDIT = "comfy.ldm.modules.diffusionmodules.mmdit"


def _plain(blk: nn.Module, second_attention: bool = False) -> bool:
    """A ``DismantledBlock`` this forward reproduces: shift-and-scale modulation, no second self-attention
    (``second_attention``: or one, SD3.5 Medium's image-stream blocks)."""
    second = getattr(blk, "x_block_self_attn", True)
    return (not second or (second_attention and getattr(blk, "attn2", None) is not None)) \
        and not getattr(blk, "scale_mod_only", True)


class FoldedJointBlock:
    """A ``JointBlock``'s forward with its modulated norms folded (a ComfyUI "dit" block replacement:
    ``(args, {"original_block": fn}) -> {"txt", "img"}``)."""

    def __init__(self, blocks: nn.ModuleList, index: int) -> None:
        # the model's list: a block another patch swapped in runs stock (read by its key: ModuleList's indexing
        # costs a few microseconds per call)
        self.blocks, self.slot = blocks, str(index)
        self.block = block = blocks[index]
        cb, xb = block.context_block, block.x_block
        width = xb.attn.qkv.in_features
        norms = [cb.norm1, xb.norm1, xb.norm2] + ([] if cb.pre_only else [cb.norm2])
        eps = {affine_free_eps(n, width) for n in norms}
        self.eps = eps.pop() if len(eps) == 1 else None  # one eps for all, or no fold
        names = ("txt1", "txt2", "img1", "img2") + (("img1b",) if getattr(xb, "x_block_self_attn", False) else ())
        self.sites = {name: ModulationSite(self.eps or 0.0) for name in names}  # img1b: a second attention's
        mod = sys.modules[type(block).__module__]
        self.attention, self.split_qkv = mod.optimized_attention, mod.split_qkv

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.forward(args["txt"], args["img"], args["vec"], args.get("transformer_options") or {})
        if out is None:
            return extra["original_block"](args)
        return {"txt": out[0], "img": out[1]}

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: Any,
                options: dict) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The block's ``(context, x)`` (context None after a last, pre-only context block), or None where the
        stock forward must run."""
        cb, xb = self.block.context_block, self.block.x_block
        if (self.eps is None or self.blocks._modules.get(self.slot) is not self.block
                or not (_plain(cb) and _plain(xb, second_attention=True))):
            return None
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or x.dim() != 3 or context.dim() != 3 \
                or not c.shape[0] == x.shape[0] == context.shape[0]:
            return None
        second = xb.x_block_self_attn
        c_mods = cb.adaLN_modulation(c).chunk(2 if cb.pre_only else 6, dim=1)
        # (shift, scale, gate) of attn, (shift, scale, gate) of the MLP, then with a second attention its three
        x_mods = xb.adaLN_modulation(c).chunk(9 if second else 6, dim=1)
        cq = self._qkv(cb.attn, context, c_mods[0], c_mods[1], self.sites["txt1"])
        xq = self._qkv(xb.attn, x, x_mods[0], x_mods[1], self.sites["img1"])
        q, k, v = (torch.cat((cq[t], xq[t]), dim=1) for t in range(3))
        attn = self.attention(q, k, v, heads=xb.attn.num_heads, transformer_options=options)
        n_txt = cq[0].shape[1]
        out_c = None if cb.pre_only else self._post(cb, attn[:, :n_txt], context, c_mods[2:], self.sites["txt2"])
        if second:  # the image stream's own self-attention on its second modulation of the same norm
            q2, k2, v2 = self._qkv(xb.attn2, x, x_mods[6], x_mods[7], self.sites["img1b"])
            attn2 = self.attention(q2, k2, v2, heads=xb.attn2.num_heads, transformer_options=options)
            x = torch.addcmul(x, xb.attn2.post_attention(attn2), x_mods[8][:, None])
        return out_c, self._post(xb, attn[:, n_txt:], x, x_mods[2:6], self.sites["img2"])

    def _qkv(self, attn: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             site: ModulationSite) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = modulated_linear(attn.qkv, x, shift[:, None], scale[:, None], self.eps, site, checked=True)
        q, k, v = self.split_qkv(qkv, attn.head_dim)
        q = attn.ln_q(q).reshape(q.shape[0], q.shape[1], -1)
        k = attn.ln_k(k).reshape(q.shape[0], q.shape[1], -1)
        return q, k, v

    def _post(self, blk: nn.Module, attn: torch.Tensor, x: torch.Tensor, mods: tuple,
              site: ModulationSite) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = torch.addcmul(x, blk.attn.post_attention(attn), gate_msa[:, None])
        return torch.addcmul(x, self._mlp(blk.mlp, x, shift_mlp[:, None], scale_mlp[:, None], site), gate_mlp[:, None])

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             site: ModulationSite) -> torch.Tensor:
        """SD3's ``Mlp`` (fc1, act, drop1, norm, fc2, drop2) with the norm handed to ``fc1``; another MLP class
        (a SwiGLU feed-forward) after the norm in torch."""
        if type(mlp).__name__ != "Mlp" or type(mlp).__module__ != MMDIT:
            return modulated_linear(mlp, x, shift, scale, self.eps, None)
        h = modulated_linear(mlp.fc1, x, shift, scale, self.eps, site, checked=True)
        for m in (mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2):
            h = m(h)
        return h


def _is_mmdit(dm: nn.Module) -> bool:
    return any(t.__module__ == MMDIT and t.__name__ == "MMDiT" for t in type(dm).__mro__)


def fold_sd3_blocks(patcher: Any, dm: nn.Module, converted: Callable[[str], bool],
                    taken: Collection[tuple[str, int]]) -> list[str]:
    """Install :class:`FoldedJointBlock` on ``patcher`` for every joint block of an MMDiT ``dm`` whose qkv layers
    ``converted(path)`` says were quantized and that another node did not replace (``taken``: its "dit"
    replacement keys); returns what was folded (``"joint_blocks.0: context_block, x_block"``)."""
    if not _is_mmdit(dm):
        return []
    done = []
    for i, block in enumerate(getattr(dm, "joint_blocks", ())):
        path = f"joint_blocks.{i}"
        fed = [f"{path}.{s}.attn.qkv" for s in ("context_block", "x_block")]
        if type(block).__name__ != "JointBlock" or type(block).__module__ != MMDIT or ("double_block", i) in taken:
            continue
        if not any(converted(p) for p in fed) or not (_plain(block.context_block)
                                                      and _plain(block.x_block, second_attention=True)):
            continue
        folded = FoldedJointBlock(dm.joint_blocks, i)
        if folded.eps is not None:
            patcher.set_model_patch_replace(folded, "dit", "double_block", i)
            done.append(f"{path}: context_block, x_block")
    return done
