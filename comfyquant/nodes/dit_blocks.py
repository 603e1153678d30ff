"""The DiT families whose blocks' modulated LayerNorms the node pack folds into their quantized layers
(``runtime.modulation``), one entry point for the adapter and the loader: Flux-style double / single blocks
(``flux_blocks``: Flux.1, Flux.2, Chroma, HunyuanVideo) and SD3's joint blocks (``sd3_blocks``), as ComfyUI's
"dit" block replacements; Wan 2.x's, Qwen-Image's (``wan_blocks``) and Z-Image's / Lumina 2's
(``lumina_blocks``) blocks, as their blocks' ``forward``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from comfyquant.nodes.flux_blocks import fold_flux_blocks
from comfyquant.nodes.lumina_blocks import fold_lumina_blocks
from comfyquant.nodes.sd3_blocks import fold_sd3_blocks
from comfyquant.nodes.wan_blocks import fold_wan_qwen_blocks


def block_replacements(patcher: Any) -> dict:
    """ComfyUI's "dit" block replacements on ``patcher``: ``(block kind, index) -> replacement``."""
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def fold_dit_blocks(patcher: Any, dm: nn.Module, converted: Callable[[str], bool],
                    install: Callable[[str, Any], None], taken: Callable[[str], bool]) -> list[str]:
    """Install the folded block forwards on ``patcher`` for the diffusion model ``dm`` (nothing for a family this
    does not know), leaving blocks another node replaced already; ``install(path, obj)`` / ``taken(path)`` set
    and test a block's ``forward`` below ``dm`` (the adapter's object patches, the loader's own model). Returns
    what was folded, a line per block."""
    replaced = set(block_replacements(patcher))
    return (fold_flux_blocks(patcher, dm, converted, replaced) + fold_sd3_blocks(patcher, dm, converted, replaced)
            + fold_wan_qwen_blocks(dm, converted, install, taken) + fold_lumina_blocks(dm, converted, install, taken))
