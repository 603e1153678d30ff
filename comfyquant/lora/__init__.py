"""comfyquant.lora: LoRAs for quantized models.

* merge into a float checkpoint while converting it (``comfyquant convert --merge-lora``; ``merge.LoRAMerge``),
* run them on a quantized model, baked into the weights or as a low-rank side path (``apply`` / ``remove``),
* write the quantization error of a conversion as a LoRA that corrects it (``--extract-lora``; ``extract``).

Files are read by ``read_lora`` (kohya, PEFT/diffusers, ComfyUI-native, ai-toolkit/BFL Flux, LyCORIS LoCon /
LoHa / LoKr, DoRA, full diffs) and mapped onto the base model's own names by ``keymap.build_keymap``.
The runtime half (``apply``, ``remove``, ``LoRAHandle``) is imported on first use, so the converter does not
load the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

from comfyquant.lora.files import Adapter, LoRAFile, read_lora
from comfyquant.lora.keymap import KeyMap, Target, build_keymap
from comfyquant.lora.merge import LoRAMerge, LoraSpec, MergeConfig

_LAZY = {"apply": "comfyquant.lora.live", "remove": "comfyquant.lora.live", "LoRAHandle": "comfyquant.lora.live"}

__all__ = ["Adapter", "KeyMap", "LoRAFile", "LoRAHandle", "LoRAMerge", "LoraSpec", "MergeConfig", "Target", "apply",
           "build_keymap", "read_lora", "remove"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'comfyquant.lora' has no attribute {name!r}")
