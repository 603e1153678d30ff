"""Write a (patched) ComfyUI MODEL's diffusion model as a converter-format safetensors file.

Quantized layers are written as their on-disk form (``weight`` storage, ``weight_scale``, ``comfy_quant``),
everything else as it is in the model, with LoRA patches applied: the model is loaded the way ComfyUI's own
checkpoint save loads it (our layers get their patches from the load callback; ComfyUI's layers are patched
lazily by ``model_state_dict_for_saving``), which works with the classic and the dynamic-VRAM loader. Keys
carry no prefix, so ``UNETLoader`` (for the formats stock ComfyUI reads) and "Load Quantized Diffusion Model"
both load the file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from comfyquant import __version__
from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import QUANT_SUFFIX, decode_comfy_quant
from comfyquant.io.writer import save_file

logger = logging.getLogger("comfyquant.nodes")

STOCK_FORMATS = frozenset({"int8_tensorwise", "float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "convrot_w4a4"})


def model_state_for_saving(patcher: Any) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors with object patches and weight patches applied, on the CPU."""
    import comfy.model_management

    if not hasattr(patcher.model, "diffusion_model"):
        raise UserError("this MODEL has no diffusion_model to save")
    comfy.model_management.load_models_gpu([patcher])
    sd = patcher.model_state_dict_for_saving(patcher.model.diffusion_model, "diffusion_model.")
    return {k: v.to("cpu").detach().contiguous() for k, v in sd.items()}


def save_quantized_model(patcher: Any, path: str | Path) -> dict[str, int]:
    """Write the file; returns format -> layer count (``plain`` for unquantized tensors)."""
    state = model_state_for_saving(patcher)
    formats: Counter = Counter()
    for key, t in state.items():
        if key.endswith(QUANT_SUFFIX):
            formats[str(decode_comfy_quant(t).get("format"))] += 1
    formats["plain"] = sum(1 for k in state if k.endswith(".weight")) - sum(v for f, v in formats.items()
                                                                           if f != "plain")
    if not any(f != "plain" for f in formats):
        logger.warning("comfyquant: the saved model holds no quantized layer (connect a quantized MODEL)")
    unstock = sorted(f for f in formats if f != "plain" and f not in STOCK_FORMATS)
    if unstock:
        logger.warning("comfyquant: %s layers need comfyquant's loader node; stock ComfyUI 0.30 cannot load them",
                       ", ".join(unstock))
    meta = {"comfyquant": json.dumps({"version": __version__, "formats": dict(formats)})}
    save_file(path, state, meta)
    logger.info("comfyquant: saved %s (%s)", path, ", ".join(f"{n} {f}" for f, n in sorted(formats.items())))
    return dict(formats)
