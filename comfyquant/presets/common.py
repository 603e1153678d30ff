"""Building blocks shared by the family modules: rule shorthands, shared rules and detection signatures."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from comfyquant.presets.base import Action, Rule

COMFY_TREE = "ComfyUI 0.30.0 comfy/"  # prefix of every structure_source that was read from the model code


def keep(pattern: str, reason: str) -> Rule:
    """A rule that keeps matching tensors in their original (high) precision."""
    return Rule(pattern, Action.KEEP, reason)


def quant(pattern: str, reason: str) -> Rule:
    """A rule that quantizes matching 2-D linear weights (other matches fall through to later rules)."""
    return Rule(pattern, Action.QUANTIZE, reason)


def drop(pattern: str, reason: str) -> Rule:
    """A rule that leaves matching tensors out of the output."""
    return Rule(pattern, Action.DROP, reason)


# Normalization parameters are 1-D and already kept by the default; naming them gives the report a reason.
NORM_RULE = keep(
    r"(^|\.)\w*(norm|ln_[qk]|layernorm)\w*\.(weight|scale|bias)$",
    "normalization parameter: tiny, and the activations' scale depends on it exactly",
)

# nn.Embedding tables are 2-D ``.weight`` tensors but are gathered, not multiplied: ComfyUI's quantized
# ops cover Linear layers, and quantizing a lookup table only loses precision.
EMBEDDING_RULE = keep(
    r"(^|\.)(embed_tokens|shared|token_embedding|position_embedding|relative_attention_bias|wte|wpe|"
    r"cond_type_embedding|addition_t_embedding|class_embedding)\.weight$",
    "embedding table (a lookup, not a matmul): kept",
)

BIAS_RULE = keep(r"\.bias$", "bias stays in high precision")


@dataclass(frozen=True)
class Signature:
    """Scores a ``{stripped name: shape}`` mapping against one family's key names and shapes.

    Every ``required`` regex must match some name and no ``forbidden`` one may; ``ndims`` maps a regex to
    the number of dimensions the first tensor it matches must have (e.g. a Conv3d patch embedder is 5-D).
    The score is 0 when anything fails, else the number of facts checked, so the more specific family wins.
    """

    required: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    ndims: tuple[tuple[str, int], ...] = ()
    bonus: tuple[str, ...] = ()

    def __call__(self, shapes: Mapping[str, tuple[int, ...]]) -> float:
        names = list(shapes)
        score = 0.0
        for pattern in self.required:
            if not _any_match(pattern, names):
                return 0.0
            score += 1.0
        for pattern in self.forbidden:
            if _any_match(pattern, names):
                return 0.0
        for pattern, ndim in self.ndims:
            hit = next((n for n in names if re.search(pattern, n)), None)
            if hit is None or len(shapes[hit]) != ndim:
                return 0.0
            score += 1.0
        score += 0.25 * sum(_any_match(p, names) for p in self.bonus)
        return score

    def why_not(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """The first fact that fails (what the file lacks or has too many of), or None when the score is > 0."""
        names = list(shapes)
        for pattern in self.required:
            if not _any_match(pattern, names):
                return f"it has no '{readable(pattern)}'"
        for pattern in self.forbidden:
            if _any_match(pattern, names):
                return f"it has '{readable(pattern)}'"
        for pattern, ndim in self.ndims:
            hit = next((n for n in names if re.search(pattern, n)), None)
            if hit is None:
                return f"it has no '{readable(pattern)}'"
            if len(shapes[hit]) != ndim:
                return f"'{hit}' is {len(shapes[hit])}-D, not {ndim}-D"
        return None


def readable(pattern: str) -> str:
    """A key regex as a user reads it: ``^img_in\\.weight$`` -> ``img_in.weight``."""
    return pattern.removeprefix("^").removesuffix("$").replace("(^|\\.)", "").replace("\\.", ".")


def _any_match(pattern: str, names: list[str]) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(n) for n in names)
