"""All presets by name, auto-detection from key names and shapes, and per-tensor decisions on full checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from comfyquant.errors import UserError
from comfyquant.presets.base import Action, Decision, Preset
from comfyquant.presets.flux import CHROMA, FLUX, FLUX2
from comfyquant.presets.image import QWEN_IMAGE, SD3, SDXL, ZIMAGE, ZIMAGE_REFINER
from comfyquant.presets.lora import GENERIC, LORA, NONE
from comfyquant.presets.prefixes import DIFFUSION, TEXT_ENCODER, VAE, split_name, strip_prefix
from comfyquant.presets.text import CLIP, LLM_TE, T5XXL
from comfyquant.presets.video import HUNYUAN, LTXV, WAN

AUTO = "auto"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (FLUX, FLUX2, CHROMA, SD3, SDXL, WAN, HUNYUAN, QWEN_IMAGE, ZIMAGE, ZIMAGE_REFINER, LTXV,
              T5XXL, CLIP, LLM_TE, LORA, NONE, GENERIC)
}

_ALIASES: dict[str, str] = {alias: p.name for p in PRESETS.values() for alias in p.aliases}

# Choices for ``--model``: detection first, then every preset.
MODEL_CHOICES: tuple[str, ...] = (AUTO, *PRESETS)

_DIFFUSION_FAMILIES = tuple(p for p in PRESETS.values() if p.kind == "diffusion")
_TEXT_FAMILIES = tuple(p for p in PRESETS.values() if p.kind == "text")

__all__ = [
    "AUTO",
    "MODEL_CHOICES",
    "PRESETS",
    "decide_tensor",
    "describe_presets",
    "detect_preset",
    "get_preset",
    "strip_prefix",
]


def get_preset(name: str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Preset:
    """The preset called ``name`` (or an alias); ``"auto"`` detects it from ``shapes``."""
    key = name.strip().lower()
    if key == AUTO:
        if shapes is None:
            raise ValueError("get_preset('auto') needs the checkpoint's {name: shape} mapping")
        return detect_preset(shapes)
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_CHOICES)}")
    return PRESETS[key]


def detect_preset(shapes: Mapping[str, tuple[int, ...]]) -> Preset:
    """Pick the family whose key names and shapes fit best; ``GENERIC`` when none fits (detection failed).

    LoRA files win outright (their keys embed a base model's names). Otherwise the diffusion model's tensors
    decide; a file holding only text encoders (by prefix or by structure) gets a text-encoder preset.
    """
    if not shapes:
        return GENERIC
    if LORA.detect is not None and LORA.detect(shapes) > 0:
        return LORA
    main, text = split_components(shapes)
    best = _best(_DIFFUSION_FAMILIES + _TEXT_FAMILIES, main)
    if best is None:
        best = _best(_TEXT_FAMILIES, text)
    return best if best is not None else GENERIC


def split_components(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]],
                                                                     dict[str, tuple[int, ...]]]:
    """``(main, text)``: prefix-stripped shapes of the text encoders and of everything else but the VAE."""
    main: dict[str, tuple[int, ...]] = {}
    text: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = split_name(name)
        if parts.component == VAE:
            continue
        target = text if parts.component == TEXT_ENCODER else main
        target[parts.rest] = tuple(shape)
    return main, text


def best_fit(shapes: Mapping[str, tuple[int, ...]]) -> Preset | None:
    """The best-scoring diffusion or text family for already stripped ``shapes`` (None: nothing fits)."""
    return _best(_DIFFUSION_FAMILIES + _TEXT_FAMILIES, shapes)


def _best(candidates: Sequence[Preset], shapes: Mapping[str, tuple[int, ...]]) -> Preset | None:
    if not shapes:
        return None
    scored = [(p.detect(shapes), i, p) for i, p in enumerate(candidates) if p.detect is not None]
    scored = [s for s in scored if s[0] > 0]
    if not scored:
        return None
    return max(scored, key=lambda s: (s[0], -s[1]))[2]


def decide_tensor(preset: Preset, name: str, shape: Sequence[int]) -> Decision:
    """The decision for one full checkpoint key: prefix stripped, VAE and other bundled parts kept.

    The VAE (``first_stage_model.``, ``vae.``) is never quantized. A preset's rules are written for one part
    of a bundled checkpoint (its ``kind``); tensors of the other parts (e.g. CLIP inside a full SDXL file
    under ``--model sdxl``) are copied unchanged so that the checkpoint still loads as before.
    """
    parts = split_name(name)
    if parts.component == VAE:
        return Decision(Action.KEEP, "prefix:vae", f"VAE tensor ({parts.prefix}): never quantized")
    if preset.kind == "diffusion" and parts.component == TEXT_ENCODER:
        return Decision(Action.KEEP, "prefix:text-encoder",
                        f"text encoder bundled in the checkpoint ({parts.prefix}): kept; convert it on its own "
                        "with --model t5xxl/clip/llm-te")
    if preset.kind == "text" and parts.component == DIFFUSION:
        return Decision(Action.KEEP, "prefix:diffusion-model",
                        f"diffusion model tensor ({parts.prefix}) under a text-encoder preset: kept")
    return preset.decide(parts.rest, tuple(shape))


def describe_presets() -> str:
    """One line per ``--model`` choice, for ``--help`` and the docs."""
    width = max(len(n) for n in MODEL_CHOICES)
    lines = [f"{AUTO:<{width}}  detect the family from key names and shapes (falls back to 'generic')"]
    for preset in PRESETS.values():
        guessed = " [partly guessed]" if "guessed" in preset.structure_source else ""
        lines.append(f"{preset.name:<{width}}  {preset.description}{guessed}")
    return "\n".join(lines)
