"""Model presets: which layers of each model family are quantized, kept in high precision, or dropped, and why."""

from comfyquant.presets.base import Action, Decision, Preset, Rule

__all__ = ["Action", "Decision", "Preset", "Rule"]
