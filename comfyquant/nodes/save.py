"""Write a (patched) ComfyUI MODEL's diffusion model as a converter-format safetensors file.

Quantized layers are written as their on-disk form (``weight`` storage, ``weight_scale``, ``comfy_quant``),
everything else as it is in the model, with LoRA patches applied: the model is loaded the way ComfyUI's own
checkpoint save loads it (our layers get their patches from the load callback; ComfyUI's layers are patched
lazily by ``model_state_dict_for_saving``), which works with the classic and the dynamic-VRAM loader. Layers
with dynamic LoRAs (a side path from "Load LoRA (quantized model)") are written with the side path baked in
(dequantize, add, requantize), since a file holds weights only. Keys carry no prefix, so ``UNETLoader`` (for the formats stock ComfyUI reads) and "Load Quantized Diffusion Model"
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
from comfyquant.lora.rounding import dequantize_f32, requantize
from comfyquant.lora.sidepath import LoRASidePath
from comfyquant.nodes.ops import ComfyQuantLinear

logger = logging.getLogger("comfyquant.nodes")

STOCK_FORMATS = frozenset({"int8_tensorwise", "float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "convrot_w4a4"})
# ComfyUI 0.30 loads (and multiplies inputs by) ``pre_quant_scale`` only where QUANT_ALGOS lists it: nvfp4. For
# the others the key is left unread and the layer computes x @ (W diag(s))^T: wrong outputs, no error.
STOCK_PRE_QUANT = frozenset({"nvfp4"})
PRE_QUANT = ".pre_quant_scale"


def model_state_for_saving(patcher: Any) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors with object patches and weight patches applied, on the CPU."""
    import comfy.model_management

    if not hasattr(patcher.model, "diffusion_model"):
        raise UserError("this MODEL has no diffusion_model to save")
    comfy.model_management.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    sd = patcher.model_state_dict_for_saving(dm, "diffusion_model.")
    baked = bake_side_paths(dm, sd, "")  # the keys carry no prefix
    if baked:
        logger.info("comfyquant: baked the dynamic LoRAs of %d layers into the saved weights", baked)
    return {k: v.to("cpu").detach().contiguous() for k, v in sd.items()}


def bake_side_paths(dm: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Replace, in ``sd``, the weight (and bias) of every layer of ``dm`` that has a LoRA side path with the
    side path baked in (float32 sum, requantized in the layer's format); returns how many layers."""
    count = 0
    for name, mod in dm.named_modules():
        side = getattr(mod, "adapter", None)
        if not isinstance(mod, ComfyQuantLinear) or not isinstance(side, LoRASidePath) or not side.entries:
            continue
        qt = mod.qweight
        w = dequantize_f32(qt)
        new = requantize(w + side.weight_delta(*w.shape).to(w.device), qt)
        for suffix in qt.state_dict_tensors():
            sd.pop(f"{prefix}{name}.{suffix}", None)
        for suffix, t in new.state_dict_tensors().items():
            sd[f"{prefix}{name}.{suffix}"] = t
        if side.bias is not None:
            key = f"{prefix}{name}.bias"
            if key not in sd:
                raise UserError(f"{name}: a LoRA adds a bias to a layer without one; save cannot bake it")
            sd[key] = (sd[key].to(torch.float32) + side.bias.to(sd[key].device, torch.float32)).to(sd[key].dtype)
        count += 1
    return count


def check_pre_quant_scales(state: dict[str, torch.Tensor]) -> None:
    """Refuse (one line) a state whose smoothed layers (SmoothQuant's ``pre_quant_scale``, from Enable INT8 on
    MODEL's outlier_method smoothquant) stock ComfyUI would load without their smoothing."""
    bad: Counter = Counter()
    for key in state:
        if key.endswith(PRE_QUANT):
            conf = state.get(key[: -len(PRE_QUANT)] + QUANT_SUFFIX)
            fmt = str(decode_comfy_quant(conf).get("format")) if conf is not None else "plain"
            if fmt not in STOCK_PRE_QUANT:
                bad[fmt] += 1
    if bad:
        what = ", ".join(f"{n} {f}" for f, n in sorted(bad.items()))
        raise UserError(f"Save Quantized Model: this model's layers are smoothed (outlier_method smoothquant: {what} "
                        "layers with a pre_quant_scale), which stock ComfyUI 0.30 ignores outside nvfp4 and "
                        "there is no earlier layer to fold it into, so the file would load with wrong outputs; "
                        "save a model quantized with outlier_method none or hadamard")


def save_quantized_model(patcher: Any, path: str | Path) -> dict[str, int]:
    """Write the file; returns format -> layer count (``plain`` for unquantized tensors)."""
    state = model_state_for_saving(patcher)
    check_pre_quant_scales(state)
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
