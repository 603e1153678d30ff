"""Video model presets: Wan 2.x, HunyuanVideo (1.0 / 1.5) and LTX-Video (LTXV, LTX-2 audio-video)."""

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
_COND_WHY = "conditioning path (timestep/text -> modulation), runs on one vector per sample: no speed gain"
_MOD_WHY = "adaLN modulation: scale/shift/gate of the residual stream for every token"

WAN = Preset(
    name="wan",
    description="Wan 2.1/2.2 video DiT (t2v, i2v, VACE, camera, S2V/Animate variants)",
    rules=(
        keep(r"^(patch_embedding|vace_patch_embedding|ref_conv|pose_patch_embedding)\.",
             "patch embedder (Conv3d/Conv2d): " + _EMBED_WHY),
        keep(r"^text_embedding\.", "text embedder MLP (umT5 features -> stream): " + _EMBED_WHY),
        keep(r"^time_embedding\.", "timestep embedder MLP: " + _COND_WHY),
        keep(r"^time_projection\.", "timestep -> 6-way modulation projection: " + _MOD_WHY),
        keep(r"^head\.", "output head (norm, modulation, projection to latent patches): error lands in the "
             "prediction"),
        keep(r"^img_emb(_refimage)?\.", "i2v/flf2v CLIP-image projection MLP: " + _EMBED_WHY),
        keep(r"^blocks\.\d+\.modulation$", "per-block modulation table: " + _MOD_WHY),
        keep(r"^vace_blocks\.\d+\.(before|after)_proj\.",
             "VACE zero-initialised injection projections (small, residual into the main stream)"),
        keep(r"^(control_adapter|casual_audio_encoder|audio_injector|trainable_cond_mask|frame_packer|"
             r"cond_encoder|face_encoder|face_adapter|motion_encoder|music_\w+)\.",
             "conditioning encoder of a Wan variant (camera, S2V, Animate): small, off the main compute path"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"^(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)\.weight$",
              "attention projection"),
        quant(r"^(vace_)?blocks\.\d+\.ffn\.[02]\.weight$", "feed-forward linear"),
    ),
    detect=Signature(
        required=(r"^blocks\.0\.self_attn\.q\.weight$", r"^blocks\.0\.cross_attn\.k\.weight$",
                  r"^head\.head\.weight$"),
        ndims=((r"^patch_embedding\.weight$", 5), (r"^blocks\.0\.modulation$", 3)),
        bonus=(r"^time_projection\.",),
    ),
    structure_source=COMFY_TREE + "ldm/wan/model.py (variants: model_animate.py, model_multitalk.py)",
    aliases=("wan2.1", "wan2.2"),
)

HUNYUAN = Preset(
    name="hunyuan",
    description="HunyuanVideo 1.0/1.5 (Flux-style double/single blocks, token-refiner text input)",
    rules=(
        keep(r"^img_in\.", "Conv3d patch embedder (img_in): " + _EMBED_WHY),
        keep(r"^txt_in\.", "text input path (txt_in: embedders + 2-block token refiner on the text tokens): "
             + _EMBED_WHY),
        keep(r"^(time_in|time_r_in|vector_in|guidance_in)\.", "timestep/vector/guidance embedder: " + _COND_WHY),
        keep(r"^(byt5_in|vision_in)\.", "glyph-ByT5 / vision input projection (1.5): " + _EMBED_WHY),
        keep(r"^double_blocks\.\d+\.(img|txt)_mod\.lin\.", "double-block " + _MOD_WHY),
        keep(r"^single_blocks\.\d+\.modulation\.lin\.", "single-block " + _MOD_WHY),
        keep(r"^final_layer\.", "final layer (adaLN + projection to latent patches): error lands in the "
             "prediction"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)\.weight$", "double-block attention projection"),
        quant(r"^double_blocks\.\d+\.(img|txt)_mlp\.[02]\.weight$", "double-block MLP"),
        quant(r"^single_blocks\.\d+\.linear[12]\.weight$", "single-block fused qkv+MLP / output linear"),
    ),
    detect=Signature(
        required=(r"^txt_in\.individual_token_refiner\.blocks\.0\.", r"^double_blocks\.0\.img_attn\.qkv\.weight$"),
        ndims=((r"^img_in\.proj\.weight$", 5),),
        bonus=(r"^guidance_in\.", r"^vision_in\."),
    ),
    structure_source=COMFY_TREE + "ldm/hunyuan_video/model.py (blocks from ldm/flux/layers.py)",
    aliases=("hunyuan-video", "hunyuanvideo"),
)

LTXV = Preset(
    name="ltxv",
    description="LTX-Video (LTXV 0.9.x) and LTX-2 audio-video",
    rules=(
        keep(r"^(audio_)?patchify_proj\.", "patch projection (latent -> stream): " + _EMBED_WHY),
        keep(r"^(audio_|av_ca_\w+_|prompt_|audio_prompt_)?adaln_single\.",
             "AdaLayerNormSingle (timestep embedder + shared modulation): " + _COND_WHY),
        keep(r"^(audio_)?caption_projection\.", "caption projection (T5/Gemma features -> stream): " + _EMBED_WHY),
        keep(r"^(video|audio)_embeddings_connector\.",
             "text embeddings connector: small transformer on the prompt tokens (LTX-2)"),
        keep(r"(^|\.)\w*scale_shift_table\w*$",
             "per-block modulation table: " + _MOD_WHY),
        keep(r"^(audio_)?proj_out\.", "output projection to latent patches: error lands in the prediction"),
        keep(r"\.to_gate_logits\.", "attention gate logits head (one row per head): tiny"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"^transformer_blocks\.\d+\.\w*attn\w*\.(to_q|to_k|to_v|to_out\.0)\.weight$",
              "attention projection"),
        quant(r"^transformer_blocks\.\d+\.(audio_)?ff\.net\.(0\.proj|2)\.weight$", "feed-forward linear"),
    ),
    detect=Signature(
        required=(r"^adaln_single\.emb\.timestep_embedder\.linear_1\.weight$",
                  r"^transformer_blocks\.0\.attn1\.to_q\.weight$"),
        ndims=((r"^patchify_proj\.weight$", 2),),
        bonus=(r"^audio_adaln_single\.",),
    ),
    structure_source=COMFY_TREE + "ldm/lightricks/model.py, ldm/lightricks/av_model.py",
    aliases=("ltx", "ltx-video", "ltx2", "ltxv2"),
)

__all__ = ["HUNYUAN", "LTXV", "WAN"]
