"""A small float32 Flux-layout checkpoint for the convert_to_quant compatibility tests.

Under ``--flux2`` the preset keeps img_in, txt_in, time_in and final_layer in high precision (convert_to_quant's
--flux2 list too) and quantizes the blocks; ``img_mod.lin`` (96 rows) is the one quantized layer whose shape is
not a multiple of 64 (``--heur``), ``txt_in`` (K = 48) the one that MXFP8's 32-wide blocks cannot take.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "img_in": (64, 64), "txt_in": (64, 48), "time_in.in_layer": (64, 64),
    "double_blocks.0.img_attn.qkv": (192, 64), "double_blocks.0.img_mod.lin": (96, 64),
    "double_blocks.0.img_mlp.0": (256, 64), "double_blocks.0.img_mlp.2": (64, 256),
    "single_blocks.0.linear1": (320, 64), "single_blocks.0.linear2": (64, 320), "final_layer.linear": (64, 64),
}
BIASED = ("img_in", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear2")


def flux_like(seed: int = 5) -> dict[str, torch.Tensor]:
    """float32 weights (N(0, 0.05), a few outliers), biases and a norm scale."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for layer, shape in SHAPES.items():
        w = torch.randn(*shape, generator=g) * 0.05
        w[0, 0] = 0.4  # an outlier per layer: per-tensor and per-row scales differ
        sd[f"{layer}.weight"] = w
        if layer in BIASED:
            sd[f"{layer}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    sd["double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(64)
    return sd


def save_flux_like(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = {k: v.to(dtype) for k, v in flux_like().items()}
    save_file(sd, str(path))
    return sd
