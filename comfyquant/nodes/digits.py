"""Conditioning for the bundled digits DiT, so the reference model runs in a stock ComfyUI workflow.

The DiT was trained with a class-label conditioner (``conditioner.txt_table`` -> Flux's ``context``,
``conditioner.vec_table`` -> Flux's pooled ``y``; label 10 is the unconditional one used for CFG), stored
in the model file next to the Flux weights. ComfyUI's Flux takes ``context`` as the conditioning tensor and
``y`` from ``pooled_output``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors import safe_open

from comfyquant.errors import UserError

DIT_ASSET = Path(__file__).resolve().parent.parent / "eval" / "assets" / "digits_dit.safetensors"
NULL_LABEL = 10


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(DIT_ASSET), "pt") as f:
        return f.get_tensor("conditioner.txt_table").float(), f.get_tensor("conditioner.vec_table").float()


def label_conditioning(label: int) -> list:
    """ComfyUI CONDITIONING for one label: ``[[context [1, L, C], {"pooled_output": y [1, V]}]]``."""
    txt, vec = _tables()
    if not 0 <= label < txt.shape[0]:
        raise UserError(f"digit must be 0-{txt.shape[0] - 2} (label {NULL_LABEL} is the unconditional one), got {label}")
    return [[txt[label][None].clone(), {"pooled_output": vec[label][None].clone()}]]


def digits_conditioning(digit: int) -> tuple[list, list]:
    """(positive, negative): the digit's conditioning and the unconditional one CFG needs."""
    if not 0 <= digit <= 9:
        raise UserError(f"digit must be between 0 and 9, got {digit}")
    return label_conditioning(digit), label_conditioning(NULL_LABEL)
