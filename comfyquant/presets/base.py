"""The preset data model: ordered regex rules, first match wins, each with a human-readable reason.

A preset never quantizes anything but 2-D ``.weight`` tensors of linear layers unless a rule says so; the
planner applies the rules to tensor *names with any known prefix stripped* (``model.diffusion_model.``,
``text_encoders.t5xxl.transformer.`` ...), see :func:`Preset.decide`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class Action(str, Enum):
    """What happens to one tensor."""

    QUANTIZE = "quantize"  # quantize (2-D linear weights only)
    KEEP = "keep"          # copy unchanged, in its original dtype (high precision)
    DROP = "drop"          # leave out of the output (e.g. the T5 decoder)


@dataclass(frozen=True)
class Rule:
    """``pattern`` is a regex searched (``re.search``) in the stripped tensor name."""

    pattern: str
    action: Action
    reason: str

    def __post_init__(self) -> None:
        re.compile(self.pattern)

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Decision:
    """The outcome for one tensor and the rule that decided it (``rule`` is a short label for reports)."""

    action: Action
    rule: str
    reason: str


@dataclass(frozen=True)
class Preset:
    """A named model family.

    ``rules`` apply in order to the stripped names of 2-D weights; tensors no rule matches fall to the default
    (2-D ``*.weight`` of a linear layer -> quantize; everything else -> keep). ``detect`` scores how well a
    ``{name: shape}`` mapping fits this family (0 = not this model). ``prefixes`` lists key prefixes this
    family's checkpoints carry. ``kind`` says which part of a bundled checkpoint the rules are written for
    (``"diffusion"``, ``"text"``, ``"lora"`` or ``"any"``); tensors of the other parts are kept unchanged.
    """

    name: str
    description: str
    rules: tuple[Rule, ...] = ()
    detect: Callable[[Mapping[str, tuple[int, ...]]], float] | None = None
    prefixes: tuple[str, ...] = ()
    structure_source: str = ""  # where the exclusions come from (model code, paper) or "guessed"
    aliases: tuple[str, ...] = field(default_factory=tuple)
    kind: str = "diffusion"

    def decide(self, name: str, shape: Sequence[int]) -> Decision:
        """Apply the rules to one (already prefix-stripped) tensor name."""
        for rule in self.rules:
            if rule.matches(name):
                if rule.action is Action.QUANTIZE and not is_linear_weight(name, shape):
                    continue
                return Decision(rule.action, f"{self.name}:{rule.pattern}", rule.reason)
        if is_linear_weight(name, shape):
            return Decision(Action.QUANTIZE, "default", "2-D linear weight")
        return Decision(Action.KEEP, "default", _keep_reason(name, shape))


# Lookup tables of nn.Embedding modules in text encoders (BERT, T5, CLIP, Llama-style): 2-D ``.weight``
# tensors that are indexed, not multiplied, so int8 W8A8 gains nothing there and ComfyUI's Linear cannot load them.
EMBEDDING_TABLE = re.compile(
    r"(?:^|\.)(?:word_embeddings|position_embeddings|token_type_embeddings|embed_tokens|tok_embeddings|"
    r"token_embedding|position_embedding|relative_attention_bias|wte|wpe|shared)\.weight$"
)


def is_embedding_table(name: str) -> bool:
    """True for the weight of a known embedding lookup table (``embed_tokens.weight``, ``shared.weight`` ...)."""
    return EMBEDDING_TABLE.search(name) is not None


def is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    """A 2-D tensor named ``*.weight`` with both dims >= 16 (smaller ones gain nothing and hurt accuracy),
    excluding embedding lookup tables."""
    return (name.endswith(".weight") and len(shape) == 2 and min(shape) >= 16
            and not is_embedding_table(name))


def _keep_reason(name: str, shape: Sequence[int]) -> str:
    if name.endswith(".bias"):
        return "bias stays in high precision"
    if is_embedding_table(name):
        return "embedding lookup table (indexed, not a matrix product)"
    if len(shape) == 2 and name.endswith(".weight"):
        return f"too small to quantize ({shape[0]}x{shape[1]})"
    if len(shape) > 2:
        return f"{len(shape)}-D (convolution) weight"
    if len(shape) == 1:
        return "1-D tensor (norm scale, bias or embedding parameter)"
    if len(shape) == 0:
        return "scalar"
    return "not a linear weight"
