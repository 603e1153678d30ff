"""Text encoder presets: T5-XXL / umT5 (encoder only), CLIP (L/G, also vision) and Llama-style LLM encoders."""

from __future__ import annotations

from comfyquant.presets.base import Preset
from comfyquant.presets.common import (
    BIAS_RULE,
    COMFY_TREE,
    EMBEDDING_RULE,
    NORM_RULE,
    Signature,
    drop,
    keep,
    quant,
)

T5XXL = Preset(
    name="t5xxl",
    description="T5-XXL / umT5-XXL text encoder (encoder kept, decoder dropped)",
    rules=(
        drop(r"^decoder\.", "T5 decoder: diffusion models use only the encoder's hidden states"),
        drop(r"^lm_head\.", "T5 LM head: part of the decoder path, unused by diffusion models"),
        keep(r"\.relative_attention_bias\.weight$", "relative position bias table (an embedding)"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"\.SelfAttention\.[qkvo]\.weight$", "self-attention projection"),
        quant(r"\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$", "feed-forward linear"),
    ),
    detect=Signature(
        required=(r"^encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$",
                  r"^encoder\.block\.0\.layer\.1\.DenseReluDense\."),
        ndims=((r"^encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$", 2),),
        bonus=(r"^shared\.weight$", r"^encoder\.final_layer_norm\."),
    ),
    structure_source=COMFY_TREE + "text_encoders/t5.py",
    aliases=("t5", "umt5", "umt5xxl", "t5-xxl"),
    kind="text",
)

CLIP = Preset(
    name="clip",
    description="CLIP text encoders (CLIP-L, OpenCLIP-G in ComfyUI layout) and CLIP vision towers",
    rules=(
        keep(r"(^|\.)text_projection(\.weight)?$", "text projection: produces the pooled vector that drives "
             "SDXL/Flux/SD3 modulation"),
        keep(r"(^|\.)visual_projection(\.weight)?$", "vision projection head: produces the image embedding"),
        keep(r"\.embeddings\.(patch_embedding|position_embedding|token_embedding)\.",
             "patch / token / position embedding"),
        keep(r"(^|\.)multi_modal_projector\.", "multimodal projector (LLaVA-style): small, feeds the LLM"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$", "self-attention projection"),
        quant(r"\.mlp\.(fc1|fc2)\.weight$", "MLP linear"),
    ),
    detect=Signature(
        required=(r"(^|\.)(text_model|vision_model)\.encoder\.layers\.0\.self_attn\.q_proj\.weight$",),
        ndims=((r"(^|\.)encoder\.layers\.0\.mlp\.fc1\.weight$", 2),),
        bonus=(r"text_projection", r"embeddings\.token_embedding\.weight$"),
    ),
    structure_source=COMFY_TREE + "clip_model.py",
    aliases=("clip_l", "clip_g", "clip-l", "clip-g", "clip-vision"),
    kind="text",
)

LLM_TE = Preset(
    name="llm-te",
    description="Llama-style LLM text encoders (Qwen2.5-VL, Qwen3, Mistral, Llama, Gemma)",
    rules=(
        keep(r"(^|\.)lm_head\.", "LM head: output vocabulary projection (unused for conditioning, kept as is)"),
        keep(r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector)\.",
             "vision tower / projector: activation outliers, small share of the weights (guessed: the seed "
             "keeps its MLPs; kept entirely here)"),
        keep(r"(^|\.)mm_\w+$", "multimodal projection parameter"),
        EMBEDDING_RULE,
        NORM_RULE,
        BIAS_RULE,
        quant(r"(^|\.)layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$", "attention projection"),
        quant(r"(^|\.)layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", "SwiGLU MLP linear"),
    ),
    detect=Signature(
        required=(r"(^|\.)layers\.0\.self_attn\.q_proj\.weight$", r"(^|\.)layers\.0\.mlp\.gate_proj\.weight$"),
        ndims=((r"(^|\.)layers\.0\.self_attn\.q_proj\.weight$", 2),),
        bonus=(r"embed_tokens\.weight$", r"(^|\.)layers\.0\.input_layernorm\.weight$"),
    ),
    structure_source=COMFY_TREE + "text_encoders/llama.py, text_encoders/qwen_vl.py (vision-tower rule "
    "partially guessed)",
    aliases=("llm", "mistral", "qwen-te", "llama", "qwen25vl", "qwen3"),
    kind="text",
)

__all__ = ["CLIP", "LLM_TE", "T5XXL"]
