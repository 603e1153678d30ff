"""Does the preset a user named with ``--model`` fit the checkpoint?

A preset's rules name the layers of one architecture. On another model they do not fail: they just keep and
quantize a different set of layers (``--model sdxl`` on a Flux file quantizes Flux's embedders and modulation,
which the flux preset keeps). So an explicit preset is checked against the file with the same signatures
auto-detection uses: on the part of the file the preset is written for (diffusion model, text encoder, LoRA)
its own signature must hold, and auto-detection must not find a family that fits that part better.
"""

from __future__ import annotations

from collections.abc import Mapping

from comfyquant.errors import UserError
from comfyquant.presets.base import Preset
from comfyquant.presets.common import Signature
from comfyquant.presets.registry import AUTO, PRESETS, best_fit, detect_preset, get_preset, split_components

# Presets that are another family's policy on the same structure (they fit whatever that family fits).
SAME_STRUCTURE: dict[str, str] = {"zimage-refiner": "zimage"}

STRICT_HELP = "make a --model preset that does not fit the file an error (exit 2) instead of a warning"


def preset_part(preset: Preset, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The prefix-stripped shapes of the part of a (possibly bundled) checkpoint ``preset`` applies to."""
    if preset.kind == "lora":
        return dict(shapes)
    main, text = split_components(shapes)
    if preset.kind == "text":
        return text or main
    return main


def preset_mismatch(preset: Preset, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """One line saying why ``preset`` does not fit the checkpoint, or None when it does.

    ``none`` and ``generic`` carry no signature (they are meant for any structure) and always fit.
    """
    if preset.detect is None or not shapes:
        return None
    part = preset_part(preset, shapes)
    fits = [preset] + ([PRESETS[SAME_STRUCTURE[preset.name]]] if preset.name in SAME_STRUCTURE else [])
    score = max((p.detect(part) for p in fits if p.detect is not None), default=0.0) if part else 0.0
    detected = detect_preset(shapes)
    # one diffusion model per file, but a bundle may hold several text encoders: each text preset that fits
    # is a valid choice there (--model clip on a Flux all-in-one converts its CLIP-L, T5 fitting better or not)
    rival = best_fit(part) if preset.kind == "diffusion" and part else None
    if score > 0 and (rival is None or rival in fits or rival.detect is None or rival.detect(part) <= score):
        return None
    other = rival if rival is not None and rival not in fits else detected
    says = (f"auto-detection says '{other.name}'" if other.name not in (preset.name, "generic")
            else "auto-detection recognizes no family")
    if score > 0:
        why = f"'{other.name}' fits it better"
    elif not part:
        why = f"it has no {preset.kind} tensors"
    else:
        why = preset.detect.why_not(part) if isinstance(preset.detect, Signature) else None
        why = why or "its key names do not match"
    return (f"--model {preset.name} does not fit this file ({why}; {says}); its rules would quantize a different "
            "set of layers")


def check_model_choice(model: str, shapes: Mapping[str, tuple[int, ...]], strict: bool) -> str | None:
    """For an explicit ``--model``: the mismatch warning (None when it fits or ``model`` is auto), or with
    ``strict`` a :class:`UserError` (exit 2)."""
    if model.strip().lower() == AUTO:
        return None
    problem = preset_mismatch(get_preset(model), shapes)
    if problem is not None and strict:
        raise UserError(f"{problem} (--strict-preset)")
    return problem
