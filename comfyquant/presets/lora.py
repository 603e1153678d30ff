"""The LoRA preset, plus the two model-agnostic ones: ``none`` (no exclusions) and ``generic`` (detection failed)."""

from __future__ import annotations

from comfyquant.presets.base import Preset
from comfyquant.presets.common import BIAS_RULE, EMBEDDING_RULE, NORM_RULE, Signature, keep, quant

_LORA_MARKERS = r"\.(lora_up|lora_down|lora_A|lora_B|lora_mid|hada_w\d_[ab]|lokr_w\d(_[ab])?)(\.weight)?$"

LORA = Preset(
    name="lora",
    description="LoRA / LyCORIS adapters (kohya and PEFT key names)",
    rules=(
        keep(r"\.(alpha|scale|dora_scale)$|\.(alpha|dora_scale)\.", "LoRA alpha / scale / DoRA magnitude: "
             "scalars and vectors that set the adapter's strength"),
        quant(r"\.(lora_up|lora_down|lora_A|lora_B)\.weight$",
              "LoRA up/down matrix (2-D, both sides >= 16)"),
        keep(r".", "not a 2-D LoRA up/down matrix >= 16 wide (rank < 16, conv LoRA, LoHa/LoKr factor, "
             "diff tensor): kept"),
    ),
    detect=Signature(required=(_LORA_MARKERS,)),
    structure_source="LoRA key layouts (kohya `lora_up/lora_down/alpha`, PEFT `lora_A/lora_B`); "
    "ComfyUI 0.30.0 comfy/lora.py",
    aliases=("lycoris",),
    kind="lora",
)

NONE = Preset(
    name="none",
    description="No model-specific exclusions: every 2-D linear weight (both sides >= 16) is quantized",
    rules=(),
    structure_source="not model-specific (base default only)",
    kind="any",
)

GENERIC = Preset(
    name="generic",
    description="Detection failed: conservative union of the high-precision patterns of all known families",
    rules=(
        keep(r"(^|\.)(img_in|txt_in|x_embedder|patch_embed\w*|patchify_proj|cap_embedder|context_embedder|"
             r"caption_projection|text_embedding|input_embedder|siglip_embedder)\.",
             "input embedder (by name; detection failed)"),
        keep(r"(^|\.)(time_in|t_embedder|time_embed\w*|time_projection|time_text_embed|vector_in|y_embedder|"
             r"guidance_in|label_emb|adaln_single|distilled_guidance_layer|emb_layers)\.",
             "timestep / conditioning embedder (by name; detection failed)"),
        keep(r"(adaLN_modulation|_mod\.|modulation|scale_shift_table)", "modulation (by name; detection failed)"),
        keep(r"(^|\.)(final_layer|norm_out|proj_out|head|lm_head|conv_out|out)\.",
             "final / output layer (by name; detection failed)"),
        keep(r"(^|\.)(text_projection|visual_projection)\.", "projection head (by name; detection failed)"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
    ),
    structure_source="guessed (union of the other presets' patterns, for files no preset recognizes)",
    kind="diffusion",  # in a bundled checkpoint: text encoders and VAE are kept, as for the known families
)

__all__ = ["GENERIC", "LORA", "NONE"]
