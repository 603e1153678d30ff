"""Image model presets: SD3/SD3.5 (MMDiT), SDXL (UNet), Qwen-Image, Z-Image (NextDiT) and its refiner policy."""

from __future__ import annotations

from comfyquant.presets.base import Preset
from comfyquant.presets.common import (
    BIAS_RULE,
    COMFY_TREE,
    EMBEDDING_RULE,
    NORM_RULE,
    Signature,
    keep,
    quant,
)

_EMBED_WHY = "input embedder: errors reach every block, and it is a tiny share of the weights"
_COND_WHY = "conditioning path (timestep/pooled text -> modulation), runs on one vector per sample: no speed gain"
_MOD_WHY = "adaLN modulation: scale/shift/gate of the residual stream for every token"
_FINAL_WHY = "final layer / output projection: its error lands directly in the prediction"

SD3 = Preset(
    name="sd3",
    description="Stable Diffusion 3 / 3.5 (MMDiT joint blocks)",
    rules=(
        keep(r"^(x_embedder|context_embedder)\.", "patch / context embedder: " + _EMBED_WHY),
        keep(r"^(t_embedder|y_embedder)\.", "timestep / pooled-text embedder: " + _COND_WHY),
        keep(r"\.adaLN_modulation\.", _MOD_WHY),
        keep(r"^final_layer\.", _FINAL_WHY),
        keep(r"^(pos_embed|register)$", "learned position embedding / register tokens"),
        NORM_RULE,
        BIAS_RULE,
        quant(r"^joint_blocks\.\d+\.(context|x)_block\.attn2?\.(qkv|proj)\.weight$", "attention projection"),
        quant(r"^joint_blocks\.\d+\.(context|x)_block\.mlp\.(fc1|fc2|w1|w2|w3)\.weight$", "MLP linear"),
    ),
    detect=Signature(
        required=(r"^joint_blocks\.0\.context_block\.attn\.qkv\.weight$",),
        ndims=((r"^x_embedder\.proj\.weight$", 4),),
        bonus=(r"^context_embedder\.weight$", r"^y_embedder\."),
    ),
    structure_source=COMFY_TREE + "ldm/modules/diffusionmodules/mmdit.py",
    aliases=("sd3.5", "sd35", "mmdit"),
)

SDXL = Preset(
    name="sdxl",
    description="SDXL UNet (also SD1.x/2.x UNets: same openaimodel layout)",
    rules=(
        keep(r"^time_embed\.", "timestep embedder MLP (time_embed): " + _COND_WHY),
        keep(r"^label_emb\.", "size/crop + pooled-text embedder (label_emb): " + _COND_WHY),
        keep(r"\.emb_layers\.", "ResBlock time-embedding projection: one vector per sample, shifts every pixel "
             "of the block"),
        NORM_RULE,
        BIAS_RULE,
        quant(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$", "attention projection"),
        quant(r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)\.weight$", "GEGLU feed-forward linear"),
        quant(r"\.(proj_in|proj_out)\.weight$", "spatial-transformer in/out projection (linear in SDXL)"),
    ),
    detect=Signature(
        required=(r"^input_blocks\.0\.0\.weight$", r"^middle_block\.1\.", r"^out\.2\.weight$"),
        ndims=((r"^input_blocks\.0\.0\.weight$", 4),),
        bonus=(r"^label_emb\.",),
    ),
    structure_source=COMFY_TREE + "ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py",
    aliases=("unet", "sd15", "sd1", "sd2"),
)

QWEN_IMAGE = Preset(
    name="qwen-image",
    description="Qwen-Image / Qwen-Image-Edit (60 MMDiT blocks, Qwen2.5-VL text features)",
    rules=(
        keep(r"^(img_in|txt_in)\.", "image / text input projection: " + _EMBED_WHY),
        keep(r"^time_text_embed\.", "timestep embedder: " + _COND_WHY),
        keep(r"^transformer_blocks\.\d+\.(img|txt)_mod\.", _MOD_WHY),
        keep(r"^norm_out\.", "final AdaLayerNormContinuous modulation: " + _MOD_WHY),
        keep(r"^proj_out\.", _FINAL_WHY),
        keep(r"^__\w+__$", "marker tensor"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|"
              r"to_add_out)\.weight$", "joint attention projection"),
        quant(r"^transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)\.weight$", "feed-forward linear"),
    ),
    detect=Signature(
        required=(r"^txt_norm\.weight$", r"^transformer_blocks\.0\.img_mod\.1\.weight$",
                  r"^transformer_blocks\.0\.attn\.add_q_proj\.weight$"),
        ndims=((r"^img_in\.weight$", 2),),
    ),
    structure_source=COMFY_TREE + "ldm/qwen_image/model.py",
    aliases=("qwen", "qwen_image", "qwenimage"),
)

_ZIMAGE_RULES = (
    keep(r"^(x_embedder|cap_embedder|siglip_embedder|clip_text_pooled_proj)\.",
         "patch / caption / image-feature embedder: " + _EMBED_WHY),
    keep(r"^(t_embedder|time_text_embed)\.", "timestep embedder: " + _COND_WHY),
    keep(r"\.adaLN_modulation\.", _MOD_WHY),
    keep(r"^final_layer\.", _FINAL_WHY),
    keep(r"^(x_pad_token|cap_pad_token|siglip_pad_token)$", "learned padding token"),
    NORM_RULE,
    BIAS_RULE,
)
_ZIMAGE_LINEARS = (
    quant(r"\.attention\.(qkv|out)\.weight$", "attention projection"),
    quant(r"\.feed_forward\.w[123]\.weight$", "SwiGLU feed-forward linear"),
)
_ZIMAGE_SOURCE = COMFY_TREE + "ldm/lumina/model.py (NextDiT), model_detection.py (Z-Image parameters)"

ZIMAGE = Preset(
    name="zimage",
    description="Z-Image / Lumina-2 (NextDiT: noise + context refiners, 30 main layers)",
    rules=(*_ZIMAGE_RULES, *_ZIMAGE_LINEARS),
    detect=Signature(
        required=(r"^cap_embedder\.1\.weight$", r"^noise_refiner\.0\.attention\.qkv\.weight$",
                  r"^layers\.0\.attention\.qkv\.weight$"),
        ndims=((r"^x_embedder\.weight$", 2),),
        bonus=(r"^cap_pad_token$",),
    ),
    structure_source=_ZIMAGE_SOURCE,
    aliases=("z-image", "z_image", "lumina2", "lumina"),
)

ZIMAGE_REFINER = Preset(
    name="zimage-refiner",
    description="Z-Image, conservative: also keeps the noise/context refiner blocks in high precision",
    rules=(
        keep(r"^(noise_refiner|context_refiner|siglip_refiner)\.",
             "refiner block: processes the raw latent / caption tokens before the main stack"),
        *_ZIMAGE_RULES,
        *_ZIMAGE_LINEARS,
    ),
    # A refiner-only file (refiner blocks, no main ``layers.N``) is the only structural tell; a full Z-Image
    # checkpoint is the same structure as for ``zimage``, so this policy is chosen with --model.
    detect=Signature(
        required=(r"^noise_refiner\.0\.attention\.qkv\.weight$", r"^context_refiner\.0\.attention\.qkv\.weight$"),
        forbidden=(r"^layers\.\d+\.",),
    ),
    structure_source=_ZIMAGE_SOURCE,
    aliases=("zimage_refiner", "z-image-refiner"),
)

__all__ = ["QWEN_IMAGE", "SD3", "SDXL", "ZIMAGE", "ZIMAGE_REFINER"]
