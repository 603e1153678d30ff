"""comfyquant.lora: LoRAs for quantized models.

* merge into a float checkpoint while converting it (``comfyquant convert --merge-lora``; ``merge.LoRAMerge``),
* run them on a quantized model, baked into the weights or as a low-rank side path (``apply`` / ``remove``),
* write the quantization error of a conversion as a LoRA that corrects it (``--extract-lora``).

Files are read by ``read_lora`` (kohya, PEFT/diffusers, ComfyUI-native, ai-toolkit/BFL Flux, LyCORIS LoCon /
LoHa / LoKr, DoRA), and mapped onto the base model's own names by ``keymap.build_keymap``.
"""

from __future__ import annotations

from comfyquant.lora.files import Adapter, LoRAFile, read_lora
from comfyquant.lora.keymap import KeyMap, Target, build_keymap
from comfyquant.lora.merge import LoRAMerge, LoraSpec, MergeConfig

__all__ = ["Adapter", "KeyMap", "LoRAFile", "LoRAMerge", "LoraSpec", "MergeConfig", "Target", "build_keymap",
           "read_lora"]
