"""Flux-family presets: Flux.1 (dev/schnell), Flux.2 and Chroma (incl. Chroma Radiance).

All three share ``comfy/ldm/flux/layers.py``'s DoubleStreamBlock / SingleStreamBlock, whose attention
(``qkv``, ``proj``) and MLP (``img_mlp.0/2``, ``linear1``, ``linear2``) linears hold almost all weights and
are quantized. What differs is where the conditioning enters: per-block ``*_mod.lin`` (Flux.1), three shared
``*_stream_modulation.lin`` (Flux.2), or one ``distilled_guidance_layer`` approximator (Chroma).
"""

from __future__ import annotations

from comfyquant.presets.base import Preset
from comfyquant.presets.common import (
    BIAS_RULE,
    COMFY_TREE,
    NORM_RULE,
    Signature,
    keep,
    quant,
)

_BLOCK_LINEARS = (
    quant(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)\.weight$", "double-block attention projection"),
    quant(r"^double_blocks\.\d+\.(img|txt)_mlp\.\d+\.weight$", "double-block MLP"),
    quant(r"^double_blocks\.\d+\.(img|txt)_mlp\.(gate|up|down)_proj\.weight$", "double-block MLP (gated)"),
    quant(r"^single_blocks\.\d+\.linear[12]\.weight$", "single-block fused qkv+MLP / output linear"),
)

_INPUTS_WHY = "first projection into the stream: errors reach every block, and it is a tiny share of the weights"
_FINAL_WHY = "final layer (adaLN + projection to latent patches): its error lands directly in the prediction"
_MOD_WHY = (
    "adaLN modulation: scale/shift/gate of the whole residual stream, computed from one vector per sample "
    "(no speed gain from int8, and its error is broadcast to every token)"
)

FLUX = Preset(
    name="flux",
    description="Flux.1 dev/schnell (19 double + 38 single blocks, per-block modulation)",
    rules=(
        keep(r"^img_in\.", "image input embedder (img_in): " + _INPUTS_WHY),
        keep(r"^txt_in\.", "text input embedder (txt_in): " + _INPUTS_WHY),
        keep(r"^time_in\.", "timestep embedder MLP (time_in): feeds every modulation; one vector per sample"),
        keep(r"^vector_in\.", "pooled-CLIP vector embedder (vector_in): feeds every modulation"),
        keep(r"^guidance_in\.", "guidance embedder (guidance_in) of the guidance-distilled dev model"),
        keep(r"^double_blocks\.\d+\.(img|txt)_mod\.lin\.", "double-block " + _MOD_WHY),
        keep(r"^single_blocks\.\d+\.modulation\.lin\.", "single-block " + _MOD_WHY),
        keep(r"^final_layer\.", _FINAL_WHY),
        NORM_RULE,
        BIAS_RULE,
        *_BLOCK_LINEARS,
    ),
    detect=Signature(
        required=(r"^double_blocks\.0\.img_attn\.qkv\.weight$", r"^img_in\.weight$",
                  r"^double_blocks\.0\.img_mod\.lin\.weight$"),
        forbidden=(r"^distilled_guidance_layer\.", r"^double_stream_modulation_img\.",
                   r"^txt_in\.individual_token_refiner\."),
        ndims=((r"^img_in\.weight$", 2), (r"^single_blocks\.0\.linear1\.weight$", 2)),
        bonus=(r"^guidance_in\.", r"^vector_in\."),
    ),
    structure_source=COMFY_TREE + "ldm/flux/model.py, ldm/flux/layers.py",
    aliases=("flux1", "flux-dev", "flux-schnell"),
)

FLUX2 = Preset(
    name="flux2",
    description="Flux.2 (shared stream modulations, bias-free gated MLPs, Mistral text features)",
    rules=(
        keep(r"^img_in\.", "image input embedder (img_in): " + _INPUTS_WHY),
        keep(r"^txt_in\.", "text input embedder (txt_in): " + _INPUTS_WHY),
        keep(r"^time_in\.", "timestep embedder MLP (time_in): feeds the shared modulations"),
        keep(r"^guidance_in\.", "guidance embedder (guidance_in): feeds the shared modulations"),
        keep(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin\.",
             "shared stream " + _MOD_WHY),
        keep(r"^final_layer\.", _FINAL_WHY),
        NORM_RULE,
        BIAS_RULE,
        *_BLOCK_LINEARS,
    ),
    detect=Signature(
        required=(r"^double_blocks\.0\.img_attn\.qkv\.weight$", r"^double_stream_modulation_img\.lin\.weight$"),
        forbidden=(r"^distilled_guidance_layer\.",),
        ndims=((r"^img_in\.weight$", 2),),
        bonus=(r"^single_stream_modulation\.lin\.weight$",),
    ),
    structure_source=COMFY_TREE + "ldm/flux/model.py (global_modulation branch), ldm/flux/layers.py, "
    "model_detection.py (flux2 parameters)",
    aliases=("flux.2",),
)

CHROMA = Preset(
    name="chroma",
    description="Chroma / Chroma Radiance (Flux-style blocks without per-block modulation; "
    "distilled_guidance_layer approximator)",
    rules=(
        keep(r"^distilled_guidance_layer\.",
             "distilled guidance approximator: produces every block's modulation vectors"),
        keep(r"^img_in(_patch)?\.", "image input embedder: " + _INPUTS_WHY),
        keep(r"^txt_in\.", "text input embedder (txt_in): " + _INPUTS_WHY),
        keep(r"^final_layer\.", "final layer: projection to latent patches, error lands in the prediction"),
        keep(r"^nerf_(image_embedder|blocks|final_layer|final_layer_conv)\.",
             "Radiance pixel-space NeRF head: small per-pixel MLPs whose output is the image itself"),
        keep(r"^__x0__$|^__sequential__$", "marker tensor"),
        NORM_RULE,
        BIAS_RULE,
        *_BLOCK_LINEARS,
    ),
    detect=Signature(
        required=(r"^double_blocks\.0\.img_attn\.qkv\.weight$", r"^distilled_guidance_layer\."),
        forbidden=(r"_mod\.lin\.weight$", r"^double_stream_modulation_img\."),
        ndims=((r"^distilled_guidance_layer\.in_proj\.weight$", 2),),
        bonus=(r"^nerf_blocks\.",),
    ),
    structure_source=COMFY_TREE + "ldm/chroma/model.py, ldm/chroma/layers.py, ldm/chroma_radiance/model.py",
    aliases=("chroma-radiance", "distillation_large"),
)

__all__ = ["CHROMA", "FLUX", "FLUX2"]
