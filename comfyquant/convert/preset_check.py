"""The ``--model`` fit check for commands that only read a checkpoint's header (inspect, template)."""

from __future__ import annotations

from pathlib import Path

from comfyquant.io.reader import CheckpointReader
from comfyquant.presets.fit import check_model_choice
from comfyquant.presets.registry import AUTO
from comfyquant.progress import Progress


def preset_warning(input: str | Path, model: str, strict: bool, progress: Progress) -> str | None:
    """The warning for an explicit ``model`` that does not fit ``input`` (printed through ``progress``), None
    when it fits or is auto; with ``strict`` a UserError instead."""
    if model.strip().lower() == AUTO:
        return None
    warning = check_model_choice(model, CheckpointReader(input).shapes(), strict)
    if warning is not None:
        progress.warn(warning)
    return warning
