"""Diffusers / text-encoder names of ComfyUI's layers, per model family, for translating LoRA keys.

Each function takes one layer name of the base model as ComfyUI names it (checkpoint prefix removed, no
``.weight``) with its weight shape and returns the names other tools give that layer, as ``Alias`` rows: a
LoRA trained on a diffusers model names ``transformer.transformer_blocks.0.attn.to_q`` what ComfyUI stores as
the first third of ``double_blocks.0.img_attn.qkv``. Facts come from ComfyUI 0.30's ``comfy/utils.py``
(``flux_to_diffusers``, ``mmdit_to_diffusers``, ``unet_to_diffusers``), ``comfy/lora.py`` and diffusers'
``convert_wan_to_diffusers.py``; the tables are this project's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Alias:
    """Another tool's name for (a row range of) a layer: ``rows`` = (start, stop) or None for all rows."""

    name: str
    rows: tuple[int, int] | None = None
    swap: bool = False  # the tool stores the two halves of the rows swapped (adaLN shift/scale)


def _split(names: Sequence[str], sizes: Sequence[int], swap: bool = False) -> list[Alias]:
    out, start = [], 0
    for n, size in zip(names, sizes, strict=True):
        out.append(Alias(n, (start, start + size) if len(names) > 1 else None, swap))
        start += size
    return out


# (ComfyUI layer regex, diffusers names with \1.., row split: "whole" | "thirds" | "qkv_mlp", swapped halves)
Rule = tuple[str, tuple[str, ...], str, bool]

FLUX_RULES: tuple[Rule, ...] = (
    (r"double_blocks\.(\d+)\.img_attn\.qkv", tuple(rf"transformer_blocks.\1.attn.to_{p}" for p in "qkv"),
     "thirds", False),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", tuple(rf"transformer_blocks.\1.attn.add_{p}_proj" for p in "qkv"),
     "thirds", False),
    (r"double_blocks\.(\d+)\.img_attn\.proj", (r"transformer_blocks.\1.attn.to_out.0",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", (r"transformer_blocks.\1.attn.to_add_out",), "whole", False),
    (r"double_blocks\.(\d+)\.img_mod\.lin", (r"transformer_blocks.\1.norm1.linear",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", (r"transformer_blocks.\1.norm1_context.linear",), "whole", False),
    (r"double_blocks\.(\d+)\.img_mlp\.0", (r"transformer_blocks.\1.ff.net.0.proj",), "whole", False),
    (r"double_blocks\.(\d+)\.img_mlp\.0", (r"transformer_blocks.\1.ff.linear_in",), "whole", False),
    (r"double_blocks\.(\d+)\.img_mlp\.2", (r"transformer_blocks.\1.ff.net.2",), "whole", False),
    (r"double_blocks\.(\d+)\.img_mlp\.2", (r"transformer_blocks.\1.ff.linear_out",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", (r"transformer_blocks.\1.ff_context.net.0.proj",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", (r"transformer_blocks.\1.ff_context.linear_in",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", (r"transformer_blocks.\1.ff_context.net.2",), "whole", False),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", (r"transformer_blocks.\1.ff_context.linear_out",), "whole", False),
    (r"single_blocks\.(\d+)\.linear1", (*(rf"single_transformer_blocks.\1.attn.to_{p}" for p in "qkv"),
                                        r"single_transformer_blocks.\1.proj_mlp"), "qkv_mlp", False),
    (r"single_blocks\.(\d+)\.linear2", (r"single_transformer_blocks.\1.proj_out",), "whole", False),
    (r"single_blocks\.(\d+)\.modulation\.lin", (r"single_transformer_blocks.\1.norm.linear",), "whole", False),
    (r"img_in", ("x_embedder",), "whole", False),
    (r"txt_in", ("context_embedder",), "whole", False),
    (r"time_in\.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "whole", False),
    (r"time_in\.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "whole", False),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",), "whole", False),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",), "whole", False),
    (r"guidance_in\.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "whole", False),
    (r"guidance_in\.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "whole", False),
    (r"final_layer\.linear", ("proj_out",), "whole", False),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), "whole", True),
)

SD3_RULES: tuple[Rule, ...] = (
    (r"joint_blocks\.(\d+)\.x_block\.attn\.qkv", tuple(rf"transformer_blocks.\1.attn.to_{p}" for p in "qkv"),
     "thirds", False),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.qkv",
     tuple(rf"transformer_blocks.\1.attn.add_{p}_proj" for p in "qkv"), "thirds", False),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv", tuple(rf"transformer_blocks.\1.attn2.to_{p}" for p in "qkv"),
     "thirds", False),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.proj", (r"transformer_blocks.\1.attn.to_out.0",), "whole", False),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.proj", (r"transformer_blocks.\1.attn2.to_out.0",), "whole", False),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.proj", (r"transformer_blocks.\1.attn.to_add_out",), "whole", False),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1", (r"transformer_blocks.\1.ff.net.0.proj",), "whole", False),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2", (r"transformer_blocks.\1.ff.net.2",), "whole", False),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc1", (r"transformer_blocks.\1.ff_context.net.0.proj",), "whole",
     False),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc2", (r"transformer_blocks.\1.ff_context.net.2",), "whole", False),
    (r"joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1", (r"transformer_blocks.\1.norm1.linear",), "whole", False),
    # the last context block is "pre only": 2 modulation chunks, stored swapped by diffusers (see sd3_aliases)
    (r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1", (r"transformer_blocks.\1.norm1_context.linear",),
     "whole", False),
    (r"context_embedder", ("context_embedder",), "whole", False),
    (r"t_embedder\.mlp\.0", ("time_text_embed.timestep_embedder.linear_1",), "whole", False),
    (r"t_embedder\.mlp\.2", ("time_text_embed.timestep_embedder.linear_2",), "whole", False),
    (r"y_embedder\.mlp\.0", ("time_text_embed.text_embedder.linear_1",), "whole", False),
    (r"y_embedder\.mlp\.2", ("time_text_embed.text_embedder.linear_2",), "whole", False),
    (r"x_embedder\.proj", ("pos_embed.proj",), "whole", False),
    (r"final_layer\.linear", ("proj_out",), "whole", False),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), "whole", True),
)

WAN_RULES: tuple[Rule, ...] = (
    (r"blocks\.(\d+)\.self_attn\.([qkv])", (r"blocks.\1.attn1.to_\2",), "whole", False),
    (r"blocks\.(\d+)\.self_attn\.o", (r"blocks.\1.attn1.to_out.0",), "whole", False),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])", (r"blocks.\1.attn2.to_\2",), "whole", False),
    (r"blocks\.(\d+)\.cross_attn\.o", (r"blocks.\1.attn2.to_out.0",), "whole", False),
    (r"blocks\.(\d+)\.cross_attn\.k_img", (r"blocks.\1.attn2.add_k_proj",), "whole", False),
    (r"blocks\.(\d+)\.cross_attn\.v_img", (r"blocks.\1.attn2.add_v_proj",), "whole", False),
    (r"blocks\.(\d+)\.ffn\.0", (r"blocks.\1.ffn.net.0.proj",), "whole", False),
    (r"blocks\.(\d+)\.ffn\.2", (r"blocks.\1.ffn.net.2",), "whole", False),
    (r"text_embedding\.0", ("condition_embedder.text_embedder.linear_1",), "whole", False),
    (r"text_embedding\.2", ("condition_embedder.text_embedder.linear_2",), "whole", False),
    (r"time_embedding\.0", ("condition_embedder.time_embedder.linear_1",), "whole", False),
    (r"time_embedding\.2", ("condition_embedder.time_embedder.linear_2",), "whole", False),
    (r"time_projection\.1", ("condition_embedder.time_proj",), "whole", False),
    (r"head\.head", ("proj_out",), "whole", False),
    (r"img_emb\.proj\.1", ("condition_embedder.image_embedder.ff.net.0.proj",), "whole", False),
    (r"img_emb\.proj\.3", ("condition_embedder.image_embedder.ff.net.2",), "whole", False),
)
Compiled = tuple[tuple[re.Pattern[str], tuple[str, ...], str, bool], ...]


def compile_rules(rules: Sequence[Rule]) -> Compiled:
    return tuple((re.compile(p), n, s, w) for p, n, s, w in rules)


FLUX, SD3, WAN = compile_rules(FLUX_RULES), compile_rules(SD3_RULES), compile_rules(WAN_RULES)


def rule_aliases(rules: Compiled, layer: str, shape: tuple[int, ...]) -> list[Alias]:
    """Every alias the rules give ``layer`` (several rules may name one layer: ``ff.net.0.proj`` and
    ``ff.linear_in``)."""
    out: list[Alias] = []
    for rx, names, split, swap in rules:
        m = rx.fullmatch(layer)
        if m is None:
            continue
        full = [m.expand(n) for n in names]
        rows = shape[0] if shape else 0
        if split == "thirds":
            out += _split(full, [rows // 3] * 3)
        elif split == "qkv_mlp":  # Flux linear1: q, k, v (hidden rows each) then the MLP input
            h = shape[1]
            out += _split(full, [h, h, h, rows - 3 * h])
        else:
            out += [Alias(n, None, swap) for n in full]
    return out


def sd3_aliases(layer: str, shape: tuple[int, ...]) -> list[Alias]:
    """SD3 rules; the pre-only last context block's modulation (2 chunks) is stored swapped by diffusers."""
    out = rule_aliases(SD3, layer, shape)
    if layer.endswith("context_block.adaLN_modulation.1") and len(shape) == 2 and shape[0] == 2 * shape[1]:
        out = [Alias(a.name, a.rows, True) for a in out]
    return out


# -- SDXL / SD1 UNet: ldm (ComfyUI) names -> diffusers names, derived from the block structure --------------
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_BASIC = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def unet_res_blocks(layers: Sequence[str]) -> int:
    """Residual blocks per level of an ldm UNet, from where the first downsampler sits."""
    for name in layers:
        m = re.fullmatch(r"input_blocks\.(\d+)\.0\.op", name)
        if m:
            return int(m.group(1)) - 1
    ids = [int(m.group(1)) for n in layers if (m := re.match(r"input_blocks\.(\d+)\.", n))]
    return max(ids, default=1)


def unet_diffusers_name(layer: str, nrb: int) -> str | None:
    """The diffusers ``UNet2DConditionModel`` name of an ldm UNet layer (None if it has none)."""
    if layer in _UNET_BASIC:
        return _UNET_BASIC[layer]
    m = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(\d+)\.(.+)", layer) or \
        re.fullmatch(r"(middle_block)\.(\d+)\.(.+)", layer)
    if m is None:
        return None
    if m.group(1) == "middle_block":
        idx, rest = int(m.group(2)), m.group(m.lastindex or 0)
        if m.lastindex == 4:  # middle_block.N.S.rest is not a layout ldm uses
            return None
        return _res(f"mid_block.resnets.{idx // 2}", rest) if idx in (0, 2) else f"mid_block.attentions.0.{rest}"
    kind, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        level, i = divmod(n - 1, nrb + 1)
        if i == nrb:
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        return _res(f"down_blocks.{level}.resnets.{i}", rest) if sub == 0 else f"down_blocks.{level}.attentions.{i}.{rest}"
    level, i = divmod(n, nrb + 1)
    if sub == 0:
        return _res(f"up_blocks.{level}.resnets.{i}", rest)
    if rest == "conv":
        return f"up_blocks.{level}.upsamplers.0.conv"
    return f"up_blocks.{level}.attentions.{i}.{rest}"


def _res(prefix: str, rest: str) -> str | None:
    return f"{prefix}.{_RESNET[rest]}" if rest in _RESNET else None


def unet_lora_names(diffusers: str) -> list[str]:
    """LoRA module names for a diffusers UNet layer: kohya SD1/SD2 (``lora_unet_`` + underscores), PEFT/diffusers
    (``unet.`` and bare), the old attention-processor form (``.processor.to_q``), SimpleTuner LyCORIS."""
    names = [f"lora_unet_{diffusers.replace('.', '_')}", f"lycoris_{diffusers.replace('.', '_')}",
             f"unet.{diffusers}", diffusers]
    proc = diffusers.replace(".to_", ".processor.to_")
    if proc != diffusers:
        proc = proc[:-2] if proc.endswith(".to_out.0") else proc
        names += [f"unet.{proc}", proc]
    return names


# -- text encoders -------------------------------------------------------------------------------------------
CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
            "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
            "self_attn.out_proj": "self_attn_out_proj"}
OPENCLIP_MAP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def encoder_kind(prefix: str) -> str:
    """Which text encoder a checkpoint prefix holds: clip_l, clip_g, clip_h, t5xxl or other."""
    for kind in ("clip_l", "clip_g", "clip_h", "t5xxl"):
        if f".{kind}." in f".{prefix}":
            return kind
    table = {"conditioner.embedders.0.transformer.": "clip_l", "conditioner.embedders.1.model.": "clip_g",
             "cond_stage_model.transformer.": "clip_l", "cond_stage_model.model.": "clip_h"}
    return table.get(prefix, "other")


def clip_hf_layer(rest: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int] | None]]:
    """HF-layout CLIP layer names (``text_model.encoder.layers.N.self_attn.q_proj``) of a tensor in either the
    HF layout or OpenCLIP's (``transformer.resblocks.N.attn.in_proj_weight`` holds q, k, v as row thirds)."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", rest)
    if m and m.group(2) in CLIP_MAP:
        return [(f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}", None)]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest)
    if m is None:
        return []
    b, part = m.group(1), m.group(2)
    if part == "attn.in_proj_weight":
        third = shape[0] // 3
        return [(f"text_model.encoder.layers.{b}.self_attn.{p}_proj", (i * third, (i + 1) * third))
                for i, p in enumerate("qkv")]
    if part.endswith(".weight") and part[: -len(".weight")] in OPENCLIP_MAP:
        return [(f"text_model.encoder.layers.{b}.{OPENCLIP_MAP[part[:-len('.weight')]]}", None)]
    return []


def clip_lora_names(kind: str, hf_layer: str, has_clip_l: bool) -> list[str]:
    """kohya and diffusers LoRA names of one CLIP layer (``text_model.encoder.layers.N.<proj>``)."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", hf_layer)
    if m is None:
        return []
    b, c = m.group(1), m.group(2)
    kohya = f"text_model_encoder_layers_{b}_{CLIP_MAP[c]}"
    if kind == "clip_g" and has_clip_l:
        return [f"lora_te2_{kohya}", f"text_encoder_2.{hf_layer}"]
    if kind == "clip_g":
        return [f"lora_te_{kohya}", f"text_encoder.{hf_layer}", f"lora_prior_te_{kohya}"]
    return [f"lora_te_{kohya}", f"lora_te1_{kohya}", f"text_encoder.{hf_layer}"]


def t5_lora_names(layer: str, has_clip_l: bool, has_clip_g: bool) -> list[str]:
    """kohya / OneTrainer names of a T5 layer (``lora_te{N}_`` with N after the CLIP encoders present)."""
    idx = 1 + has_clip_g + has_clip_l
    flat = layer.replace(".", "_")
    names = [f"lora_te{idx}_{flat}"]
    if has_clip_l and not has_clip_g:  # OneTrainer Flux files name T5 te2 as well
        names.append(f"lora_te3_{flat}")
    return names


FAMILY_ALIASES: dict[str, Callable[[str, tuple[int, ...]], list[Alias]]] = {
    "flux": lambda layer, shape: rule_aliases(FLUX, layer, shape),
    "chroma": lambda layer, shape: rule_aliases(FLUX, layer, shape),
    "sd3": sd3_aliases,
    "wan": lambda layer, shape: rule_aliases(WAN, layer, shape),
}
