"""Per-layer choices of a conversion besides the format, the preset and the layer-config file.

Command-line rules (``--rule``), exclusions (``--exclude``) and what excluded layers become
(``--excluded-format``), the dtype of everything stored unquantized (``--keep-dtype``), format options for every
quantized layer (``--full-precision-matrix-mult``, ``--convrot-group-size``, ``--input-scale``) and the alignment
heuristic (``--align``). The planner asks :class:`LayerOptions` about each tensor; see docs/LAYER_CONFIG.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from comfyquant.convert.layer_config import LayerRule
from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY, get_format


@dataclass(frozen=True)
class LayerOptions:
    """Frozen per-layer choices, validated by :meth:`validate` before any tensor is read.

    Priority of the planner: layer-config rules, then ``rules``, then the preset's drops, then ``exclude``,
    then the layer config's ``default``, then the preset. ``excluded`` (a rule's format and options) is what
    excluded layers become: those matching ``exclude`` and the linear layers the preset keeps in high
    precision by one of its rules; None keeps them. ``keep_dtype`` (a cast format: fp16 or bf16) is the dtype
    of every floating tensor stored unquantized, except tensors matching ``preserve_dtype``.
    """

    rules: tuple[LayerRule, ...] = ()
    exclude: tuple[str, ...] = ()
    excluded: LayerRule | None = None
    keep_dtype: str | None = None
    preserve_dtype: tuple[str, ...] = ()
    full_precision_matrix_mult: bool = False
    convrot_groupsize: int | None = None
    input_scale: bool = False
    align: int | None = None

    def validate(self) -> None:
        """UserError for bad regexes, a non-cast ``keep_dtype``, a bad group size or alignment."""
        for flag, patterns in (("--exclude", self.exclude), ("--preserve-dtype", self.preserve_dtype)):
            for p in patterns:
                _compile(p, flag)
        if self.keep_dtype is not None:
            fmt = get_format(self.keep_dtype)
            if fmt.is_quantized:
                casts = [f.name for f in REGISTRY.formats() if not f.is_quantized]
                raise UserError(f"--keep-dtype takes a plain float dtype ({', '.join(casts)}), not {fmt.name}")
        g = self.convrot_groupsize
        if g is not None and (g < 16 or g & (g - 1) or (g.bit_length() - 1) % 2):
            raise UserError(f"--convrot-group-size must be a power of 4 >= 16 (16, 64, 256, 1024), got {g}: the "
                            "rotation ComfyUI applies to activations is built from 4x4 Hadamard blocks")
        if self.align is not None and self.align < 0:
            raise UserError(f"--align must be a non-negative integer, got {self.align}")
        if self.excluded is not None and self.excluded.skip:
            raise UserError("--excluded-format: 'skip' is what excluded layers get without it; give a format")

    def format_options(self, block_size: int) -> dict[str, Any]:
        """Options every quantized layer's format receives (a rule's own options override them)."""
        opts: dict[str, Any] = {"block_size": block_size}
        if self.full_precision_matrix_mult:
            opts["full_precision_matrix_mult"] = True
        if self.convrot_groupsize is not None:
            opts["convrot_groupsize"] = self.convrot_groupsize
        if self.input_scale:
            opts["input_scale"] = True
        return opts

    def rule_for(self, names: Iterable[str]) -> LayerRule | None:
        """The first command-line rule whose pattern is found in any of ``names``."""
        names = list(names)
        return next((r for r in self.rules if any(r.search(n) for n in names)), None)

    def excluded_by(self, names: Iterable[str]) -> str | None:
        """The ``exclude`` pattern found in any of ``names`` (None when none is)."""
        names = list(names)
        return next((p for p in self.exclude if any(_compile(p, "--exclude").search(n) for n in names)), None)

    def preserves(self, name: str) -> bool:
        """True when ``name`` matches ``preserve_dtype`` (kept in its own dtype under ``keep_dtype``)."""
        return any(_compile(p, "--preserve-dtype").search(name) for p in self.preserve_dtype)


def misaligned(shape: tuple[int, ...], align: int | None) -> str | None:
    """Why a ``[N, K]`` weight fails the alignment heuristic (a dimension below or not a multiple of
    ``align``), or None. Quantized GEMM kernels run such shapes slowly or pad them."""
    if not align:
        return None
    bad = [d for d in shape if d < align or d % align]
    if not bad:
        return None
    return f"{shape[0]}x{shape[1]} is not a multiple of {align} (--align)"


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag}: invalid regex {pattern!r} ({e})") from None
