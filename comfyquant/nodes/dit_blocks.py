"""The DiT families whose blocks' modulated LayerNorms the node pack folds into their quantized layers
(``runtime.modulation``), one entry point for the adapter and the loader: Flux-style double / single blocks
(``flux_blocks``: Flux.1, Flux.2, Chroma, HunyuanVideo) and SD3's joint blocks (``sd3_blocks``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from comfyquant.nodes.flux_blocks import fold_flux_blocks
from comfyquant.nodes.sd3_blocks import fold_sd3_blocks


def fold_dit_blocks(patcher: Any, dm: nn.Module, converted: Callable[[str], bool]) -> list[str]:
    """Install the folded block forwards on ``patcher`` for the diffusion model ``dm`` (nothing for a family this
    does not know); returns what was folded, a line per block."""
    return fold_flux_blocks(patcher, dm, converted) + fold_sd3_blocks(patcher, dm, converted)
