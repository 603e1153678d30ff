"""The input directions of a LoRA (its down / ``A`` matrices) per checkpoint layer, for ``--calibration-lora``.

A small reader of its own over the safetensors keys (kohya ``lora_down``, PEFT ``lora_A``, with or without
``diffusion_model.`` / ``transformer.`` / ``lora_unet_`` prefixes); to be replaced by ``comfyquant.lora``'s
reader when that lands. Only the down matrices are read: ``A [rank, in_features]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from comfyquant.errors import UserError
from comfyquant.io.reader import CheckpointReader

DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.default.weight", ".lora_A.weight", ".lora.down.weight",
                 "_lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "lora_unet_", "lora_te_",
            "base_model.model.")


def _flat(name: str) -> str:
    return re.sub(r"[._]", "_", name)


def lora_down_matrices(path: str | Path, layers: Mapping[str, int]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{checkpoint layer: A}`` for every LoRA module that matches a layer of ``layers`` (name -> in_features)
    with the same input width, and the LoRA modules that matched none."""
    reader = CheckpointReader(path)
    by_flat: dict[str, str] = {}
    for layer in layers:
        by_flat[_flat(layer)] = layer
        for p in PREFIXES:
            if layer.startswith(p):
                by_flat[_flat(layer[len(p):])] = layer
    found: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key in reader:
        suffix = next((s for s in DOWN_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        module = key[: -len(suffix)]
        for p in PREFIXES:
            if module.startswith(p):
                module = module[len(p):]
                break
        layer = by_flat.get(_flat(module))
        a = reader.get(key)
        if layer is None or a.dim() != 2 or a.shape[1] != layers[layer]:
            unmatched.append(module)
            continue
        found[layer] = a.float().clone()
    if not found:
        raise UserError(f"--calibration-lora {path}: none of its LoRA down matrices matches a layer of this "
                        f"checkpoint (first LoRA module: {unmatched[0] if unmatched else 'none found'})")
    return found, unmatched


def describe(found: Iterable[str], unmatched: list[str]) -> str:
    n = len(list(found))
    extra = f"; {len(unmatched)} LoRA module(s) match no quantized layer" if unmatched else ""
    return f"--calibration-lora: Hessians of {n} layer(s) weighted toward the LoRA's input directions{extra}"
