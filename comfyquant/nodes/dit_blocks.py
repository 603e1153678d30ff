"""The DiT families whose blocks' modulated LayerNorms the node pack folds into their quantized layers
(``runtime.modulation``), one entry point for the adapter and the loader: Flux-style double / single blocks
(``flux_blocks``: Flux.1, Flux.2, Chroma, HunyuanVideo) and SD3's joint blocks (``sd3_blocks``), as ComfyUI's
"dit" block replacements; Wan 2.x's, Qwen-Image's (``wan_blocks``) and Z-Image's / Lumina 2's
(``lumina_blocks``) and LTX-Video's (``ltx_blocks``) blocks, as their blocks' ``forward``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from comfyquant.nodes.flux_blocks import fold_flux_blocks
from comfyquant.nodes.ltx_blocks import FoldedLtxBlock
from comfyquant.nodes.lumina_blocks import FoldedLuminaBlock
from comfyquant.nodes.sd3_blocks import fold_sd3_blocks
from comfyquant.nodes.wan_blocks import FoldedQwenBlock, FoldedWanBlock


def _no_rope(cls: Callable[[nn.Module], Any]) -> Callable[[nn.Module, bool], Any]:
    """``cls`` as a :data:`BLOCK_FORWARDS` maker for a block without a fused-RoPE attention."""
    return lambda block, fuse_rope: cls(block)


# ComfyUI's (module, class) of a block folded through its ``forward`` -> (layers its norms feed, at least one of which
# must be converted; the norms, as reported; the forward ``make(block, fuse_rope)``, whose ``eps`` is None where the
# block does not fold; only Qwen-Image's has a fused q / k norm + RoPE attention to take or leave)
BLOCK_FORWARDS: dict[tuple[str, str], tuple[tuple[str, ...], str, Callable[[nn.Module, bool], Any]]] = {
    ("comfy.ldm.wan.model", "WanAttentionBlock"): (("self_attn.q", "ffn.0"), "norm1, norm2", _no_rope(FoldedWanBlock)),
    ("comfy.ldm.qwen_image.model", "QwenImageTransformerBlock"): (
        ("attn.to_q", "attn.add_q_proj", "img_mlp.net.0.proj", "txt_mlp.net.0.proj"),
        "img_norm1, img_norm2, txt_norm1, txt_norm2", FoldedQwenBlock),
    ("comfy.ldm.lumina.model", "JointTransformerBlock"): (("attention.qkv", "feed_forward.w1"),
                                                          "attention_norm1, ffn_norm1", _no_rope(FoldedLuminaBlock)),
    ("comfy.ldm.lightricks.model", "BasicTransformerBlock"): (("attn1.to_q", "ff.net.0.proj"),
                                                              "attn1's norm, ff's norm", _no_rope(FoldedLtxBlock)),
}


def block_replacements(patcher: Any) -> dict:
    """ComfyUI's "dit" block replacements on ``patcher``: ``(block kind, index) -> replacement``."""
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def fold_dit_blocks(patcher: Any, dm: nn.Module, converted: Callable[[str], bool],
                    install: Callable[[str, Any], None], taken: Callable[[str], bool],
                    fuse_rope: bool = True) -> list[str]:
    """Install the folded block forwards on ``patcher`` for the diffusion model ``dm`` (nothing for a family this
    does not know), leaving blocks another node replaced already; ``install(path, obj)`` / ``taken(path)`` set
    and test a block's ``forward`` below ``dm`` (the adapter's object patches, the loader's own model). Returns
    what was folded, a line per block. ``fuse_rope``: the Flux-family and Qwen-Image blocks' q / k norms and RoPE in
    one kernel (``nodes.flux_rope``, ``nodes.qwen_rope``; ``RuntimeOptions.fuse_rope``)."""
    replaced = set(block_replacements(patcher))
    return (fold_flux_blocks(patcher, dm, converted, replaced, fuse_rope)
            + fold_sd3_blocks(patcher, dm, converted, replaced)
            + fold_block_forwards(dm, converted, install, taken, fuse_rope))


def fold_block_forwards(dm: nn.Module, converted: Callable[[str], bool], install: Callable[[str, Any], None],
                        taken: Callable[[str], bool], fuse_rope: bool = True) -> list[str]:
    """Install the :data:`BLOCK_FORWARDS` forward of every such block of ``dm`` whose norm-fed layers
    ``converted(path)`` says were quantized, except where ``taken(path)`` says another patch set it; returns what
    was folded (``"blocks.0: norm1, norm2"``). ``fuse_rope``: Qwen-Image's fused attention (``nodes.qwen_rope``)."""
    done = []
    for path, block in dm.named_modules():
        entry = BLOCK_FORWARDS.get((type(block).__module__, type(block).__name__))
        if entry is None:
            continue
        fed, names, make = entry
        key = f"{path}.forward"
        if not any(converted(f"{path}.{f}") for f in fed) or taken(key):
            continue
        forward = make(block, fuse_rope)
        if forward.eps is not None:
            install(key, forward)
            done.append(f"{path}: {names}")
    return done
