"""Quantize a ComfyUI CLIP's text encoders on the fly (the engine behind "Enable INT8 on CLIP").

A CLIP object holds a stack of text encoders under one ModelPatcher (``clip_l``, ``clip_g``, ``t5xxl``,
``umt5xxl``, an LLM such as ``qwen25_7b``), each with its own preset (CLIP keeps its text projection, T5 its
relative-position table). Each encoder of the stack goes through :func:`~comfyquant.nodes.adapter.adapt_model`
on its own, so its preset is detected from its layers alone, and the converted layers become object patches on a
clone of the CLIP: the input CLIP is never changed. Stock ComfyUI runs an int8 text encoder file through
comfy-kitchen's kernels; this puts comfyquant's runtime on its layers instead.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from comfyquant.nodes.adapter import AdapterReport, adapt_model
from comfyquant.nodes.cache import CACHE, QuantCache
from comfyquant.nodes.ops import is_plain_linear
from comfyquant.nodes.settings import AdapterSettings

logger = logging.getLogger("comfyquant.nodes")
MSG_NO_ENCODERS = "Enable INT8 on CLIP: the CLIP holds no text encoder with linear layers; returning it unchanged."


def encoders(stack: nn.Module) -> list[str]:
    """The text encoders of a CLIP's model stack: its direct children that hold a float linear layer."""
    return [name for name, child in stack.named_children() if any(is_plain_linear(m) for m in child.modules())]


def adapt_clip(clip: Any, settings: AdapterSettings, *, progress: Any = None,
               cache: QuantCache = CACHE) -> tuple[Any, list[tuple[str, AdapterReport]]]:
    """(a clone of ``clip`` with its text encoders' linears quantized as object patches, (encoder, report) per
    encoder of the stack).
    ``settings.model_type`` must be ``auto`` (each encoder gets its own preset)."""
    if settings.model_type != "auto":
        raise ValueError("adapt_clip detects each text encoder's preset itself: model_type must be 'auto'")
    import comfy.model_management

    out = clip.clone()
    # the stack back to its own layers first: while another clone of this CLIP is loaded, its converted layers
    # sit in the shared stack and an encoder would not look like one
    comfy.model_management.unload_model_and_clones(out.patcher)
    names = encoders(out.patcher.model)
    if not names:
        logger.warning(MSG_NO_ENCODERS)
    reports: list[tuple[str, AdapterReport]] = []
    patcher = out.patcher
    for name in names:
        patcher, report = adapt_model(patcher, settings, progress=progress, cache=cache, root="", within=name)
        reports.append((name, report))
    out.patcher = patcher
    return out, reports
