"""Checkpoint key prefixes: which part of a bundled checkpoint a tensor belongs to, and its name without them.

Full checkpoints (SDXL, SD3, Flux "all in one") bundle the diffusion model, text encoders and the VAE under
prefixes such as ``model.diffusion_model.``, ``conditioner.embedders.0.transformer.`` and
``first_stage_model.``. Preset rules are written against the names with that prefix removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIFFUSION = "diffusion"
TEXT_ENCODER = "text"
VAE = "vae"
NONE = ""  # no known prefix: the file holds one model on its own

# Ordered: the first pattern that matches the start of a name wins, so longer prefixes come first.
_PREFIXES: tuple[tuple[str, str], ...] = (
    (r"model\.diffusion_model\.", DIFFUSION),
    (r"diffusion_model\.", DIFFUSION),
    (r"model\.model\.", DIFFUSION),
    (r"first_stage_model\.", VAE),
    (r"vae\.", VAE),
    (r"conditioner\.embedders\.\d+\.(transformer|model)\.", TEXT_ENCODER),
    (r"conditioner\.embedders\.\d+\.", TEXT_ENCODER),
    (r"cond_stage_model\.(transformer|model)\.", TEXT_ENCODER),
    (r"cond_stage_model\.", TEXT_ENCODER),
    (r"text_encoders\.[A-Za-z0-9_]+\.transformer\.", TEXT_ENCODER),
    (r"text_encoders\.[A-Za-z0-9_]+\.", TEXT_ENCODER),
    (r"(clip_[lg]|t5xxl|t5xl|umt5xxl|llama|qwen\w*|mistral\w*|gemma\w*)\.transformer\.", TEXT_ENCODER),
    (r"text_encoder(_[23])?\.", TEXT_ENCODER),
    (r"transformer\.(?=(double_blocks|single_blocks|blocks|transformer_blocks|joint_blocks|layers)\.)", DIFFUSION),
    (r"unet\.", DIFFUSION),
    (r"net\.", DIFFUSION),
    # Bare "model." prefixes some single-model exports; but "model.layers.N.self_attn" / "model.embed_tokens" /
    # "model.norm." are the inside of a Llama-style text encoder, so those are not stripped.
    (r"model\.(?!(embed_tokens|norm|language_model|visual|vision_tower)\.|layers\.\d+\.(self_attn|mlp|"
     r"input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.)",
     DIFFUSION),
)
_COMPILED = tuple((re.compile(p), c) for p, c in _PREFIXES)


@dataclass(frozen=True)
class NameParts:
    """A tensor name split into its checkpoint prefix, the part preset rules see, and the bundle component."""

    prefix: str
    rest: str
    component: str


def split_name(name: str) -> NameParts:
    """Split ``name`` at the first known prefix; names without one belong to no particular component."""
    for rx, component in _COMPILED:
        m = rx.match(name)
        if m and m.end() < len(name):
            return NameParts(name[: m.end()], name[m.end():], component)
    return NameParts("", name, NONE)


def strip_prefix(name: str) -> tuple[str, str]:
    """``(prefix, rest)`` for a checkpoint key, e.g. ``("model.diffusion_model.", "img_in.weight")``."""
    parts = split_name(name)
    return parts.prefix, parts.rest
