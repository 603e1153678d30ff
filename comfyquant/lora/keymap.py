"""LoRA module names -> the base checkpoint's own tensors (and row ranges of fused tensors).

Built from the base checkpoint's key names and shapes (headers only), for every name form users' LoRAs come
in: the ComfyUI-native and generic forms (``diffusion_model.X``, the full key without ``.weight``, ``X``),
kohya (``lora_unet_X`` with dots as underscores, ``lora_te1_...``), ``transformer.X`` / ``lycoris_X`` /
``base_model.model.X``, and per family the diffusers names (``families.py``), including fused targets: Flux
``img_attn.qkv`` from separate ``to_q``/``to_k``/``to_v`` LoRAs, each into its own row slice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from comfyquant.lora import families as fam
from comfyquant.presets.prefixes import DIFFUSION, NONE, TEXT_ENCODER, split_name


@dataclass(frozen=True)
class Target:
    """Where one LoRA module's difference goes: ``tensor`` (a base tensor name), its ``rows`` [start, stop) or
    all rows, whether the module stores the two row halves swapped, and the layer's bias tensor if any."""

    tensor: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    swap: bool = False
    bias: str | None = None

    @property
    def target_shape(self) -> tuple[int, ...]:
        """The shape the difference must have: the tensor's, or its row slice's."""
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])

    def describe(self) -> str:
        return self.tensor + (f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else "")


class KeyMap:
    """LoRA module name -> :class:`Target` for one base model; names two layers claim are ``ambiguous``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.entries: dict[str, Target] = {}
        self.ambiguous: dict[str, tuple[str, str]] = {}

    def add(self, name: str, target: Target) -> None:
        old = self.entries.get(name)
        if old is not None and old != target:
            self.ambiguous[name] = (old.describe(), target.describe())
            return
        self.entries[name] = target

    def get(self, module: str) -> Target | None:
        return self.entries.get(module)

    def __len__(self) -> int:
        return len(self.entries)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def build_keymap(shapes: Mapping[str, tuple[int, ...]], family: str | None = None) -> KeyMap:
    """The key map of a base checkpoint given ``{tensor name: shape}`` (``family``: a preset name, detected
    from the names when None)."""
    if family is None:
        from comfyquant.presets.registry import detect_preset

        family = detect_preset(dict(shapes)).name
    km = KeyMap(family)
    diffusion: dict[str, str] = {}  # ComfyUI layer name (prefix stripped) -> weight tensor name
    encoders: dict[str, str] = {}  # checkpoint prefix -> encoder kind
    alone = _STANDALONE_ENCODERS.get(family)  # a text-encoder file on its own: unprefixed names are that encoder
    for name, shape in shapes.items():
        parts = split_name(name)
        if alone is not None and parts.component == NONE:
            encoders.setdefault("", alone)
            _generic(km, name, shape, shapes, parts.rest, "text_encoders.")
        elif parts.component == TEXT_ENCODER:
            encoders.setdefault(parts.prefix, fam.encoder_kind(parts.prefix))
            _generic(km, name, shape, shapes, parts.rest, "text_encoders.")
        elif parts.component in (DIFFUSION, NONE):
            _generic(km, name, shape, shapes, parts.rest, "diffusion_model.")
            if name.endswith(".weight"):
                diffusion[parts.rest[: -len(".weight")]] = name
    _diffusers(km, diffusion, shapes)
    _text_encoders(km, shapes, encoders)
    return km


_STANDALONE_ENCODERS = {"clip": "clip_l", "t5xxl": "t5xxl"}


def _bias_of(weight: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    bias = weight[: -len(".weight")] + ".bias" if weight.endswith(".weight") else None
    return bias if bias in shapes else None


def _generic(km: KeyMap, name: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]],
             rest: str, native: str) -> None:
    """Names that spell the layer itself: the full key, the key without its prefix, ComfyUI-native, kohya."""
    if not name.endswith(".weight"):  # biases, norm tables, pos_embed: targets of full ``diff`` adapters only
        target = Target(name, shape)
        for n in (name, rest, native + rest):
            km.add(n, target)
        return
    layer = rest[: -len(".weight")]
    target = Target(name, shape, bias=_bias_of(name, shapes))
    names = [name[: -len(".weight")], layer, native + layer]
    if native == "diffusion_model.":
        names += [f"model.diffusion_model.{layer}", f"lora_unet_{_flat(layer)}", f"transformer.{layer}",
                  f"lycoris_{_flat(layer)}", f"base_model.model.{layer}"]
    for n in names:
        km.add(n, target)


def _diffusers(km: KeyMap, layers: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The family's diffusers names (DiTs by rule table, ldm UNets by their block structure)."""
    alias_fn = fam.FAMILY_ALIASES.get(km.family)
    unet = any(layer.startswith("input_blocks.") for layer in layers)
    nrb = fam.unet_res_blocks(list(layers)) if unet else 0
    for layer, tensor in layers.items():
        shape = shapes[tensor]
        bias = _bias_of(tensor, shapes)
        if unet:
            d = fam.unet_diffusers_name(layer, nrb)
            for n in fam.unet_lora_names(d) if d else ():
                km.add(n, Target(tensor, shape, bias=bias))
            continue
        if alias_fn is None:
            continue
        if km.family == "flux" and layer.endswith(".linear1") and len(shape) == 2:  # ComfyUI's linear1_qkv
            km.add(f"diffusion_model.{layer}_qkv", Target(tensor, shape, (0, 3 * shape[1])))
        for a in alias_fn(layer, shape):
            target = Target(tensor, shape, a.rows, a.swap, bias)
            for n in (f"transformer.{a.name}", a.name, f"lora_transformer_{_flat(a.name)}",
                      f"lycoris_{_flat(a.name)}", f"base_model.model.{a.name}"):
                km.add(n, target)


def _text_encoders(km: KeyMap, shapes: Mapping[str, tuple[int, ...]], encoders: Mapping[str, str]) -> None:
    """kohya ``lora_te*`` and diffusers ``text_encoder(_2).`` names of CLIP-L/G/H and T5 layers."""
    kinds = set(encoders.values())
    has_l, has_g = "clip_l" in kinds or "clip_h" in kinds, "clip_g" in kinds
    for name, shape in shapes.items():
        parts = split_name(name)
        kind = encoders.get(parts.prefix) if parts.component in (TEXT_ENCODER, NONE) else None
        if kind is None or kind == "other":
            continue
        if kind == "t5xxl":
            if name.endswith(".weight"):
                layer = parts.rest[: -len(".weight")]
                for n in fam.t5_lora_names(layer, has_l, has_g):
                    km.add(n, Target(name, shape, bias=_bias_of(name, shapes)))
            continue
        for hf_layer, rows in fam.clip_hf_layer(parts.rest, shape):
            bias = _bias_of(name, shapes) or _openclip_bias(name, shapes)
            for n in fam.clip_lora_names(kind, hf_layer, has_l):
                km.add(n, Target(name, shape, rows, bias=bias))
            km.add(f"text_encoders.{kind}.transformer.{hf_layer}", Target(name, shape, rows, bias=bias))


def _openclip_bias(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if name.endswith("in_proj_weight"):
        bias = name[: -len("weight")] + "bias"
        return bias if bias in shapes else None
    return None


def unmatched_hint(modules: Iterable[str], km: KeyMap) -> str:
    """A short guess at why modules did not match: the naming scheme the LoRA uses."""
    sample = next(iter(modules), "")
    if re.match(r"lora_te\d?_", sample):
        return "text-encoder LoRA keys, but the base checkpoint holds no matching text encoder"
    if sample.startswith(("transformer.", "unet.")):
        return f"diffusers names that do not fit this {km.family} checkpoint's layers"
    return f"names that do not fit this {km.family} checkpoint's layers"
