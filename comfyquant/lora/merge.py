"""Merging LoRAs into a base checkpoint's float weights while it streams through the converter.

``LoRAMerge(MergeConfig(...))`` is the converter's weight transform: ``bind(infos)`` reads the LoRA headers,
maps every module onto the base checkpoint's tensors (``keymap.py``) and checks every shape before anything is
written; the bound object then turns ``(tensor name, float32 weight)`` into the merged float32 weight, one
tensor at a time, so memory stays bounded by the largest tensor. Several LoRAs apply in the order given, each
at ``its scale x --merge-lora-scale``, times ``0.9^(i-1)`` for the i-th one unless dampening is off
(convert_to_quant's progressive dampening).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyquant.errors import UserError
from comfyquant.io.reader import TensorInfo
from comfyquant.lora.adapters import delta_shape, patch_weight, swap_halves
from comfyquant.lora.files import Adapter, LoRAFile, read_lora
from comfyquant.lora.keymap import KeyMap, Target, build_keymap, unmatched_hint

DAMPEN = 0.9
_SHOW = 5


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge and its own scale (``A.safetensors:0.8`` on the command line)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str | Path | LoraSpec) -> LoraSpec:
        """``PATH`` or ``PATH:SCALE`` (a colon followed by a number; ``C:\\...`` paths stay paths)."""
        if isinstance(text, LoraSpec):
            return text
        if isinstance(text, Path):
            return cls(text)
        m = re.fullmatch(r"(.+):([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)", text)
        if m and not Path(text).exists():
            return cls(Path(m.group(1)), float(m.group(2)))
        return cls(Path(text))


@dataclass(frozen=True)
class MergeConfig:
    """LoRAs to merge, the global scale (``--merge-lora-scale``) and whether later LoRAs are dampened."""

    loras: tuple[LoraSpec, ...]
    scale: float = 1.0
    dampen: bool = True

    def strengths(self) -> list[float]:
        """The strength each LoRA is merged with: own scale x global scale (x 0.9^(i-1) when dampening)."""
        n = len(self.loras)
        return [s.scale * self.scale * (DAMPEN ** i if self.dampen and n > 1 else 1.0)
                for i, s in enumerate(self.loras)]


@dataclass
class FileMatch:
    """How one LoRA file matched the base: module counts and the first unmatched module names."""

    path: str
    strength: float
    modules: int
    matched: int
    tensors: int
    unmatched: list[str] = field(default_factory=list)
    orphans: int = 0

    def line(self) -> str:
        s = (f"LoRA {Path(self.path).name} (strength {self.strength:g}): {self.matched} of {self.modules} modules "
             f"matched, {self.tensors} base tensors changed")
        if self.unmatched:
            more = f" (and {len(self.unmatched) - _SHOW} more)" if len(self.unmatched) > _SHOW else ""
            s += f"; {len(self.unmatched)} NOT matched: {', '.join(self.unmatched[:_SHOW])}{more}"
        if self.orphans:
            s += f"; {self.orphans} alpha/dora_scale key(s) without adapter tensors ignored"
        return s


@dataclass(frozen=True)
class Patch:
    """One adapter applied to one base tensor."""

    lora: LoRAFile
    adapter: Adapter
    strength: float
    target: Target
    bias: bool = False  # apply the adapter's diff_b to this (bias) tensor


def resolve(lora: LoRAFile, km: KeyMap, strength: float) -> tuple[list[Patch], FileMatch]:
    """Map every module of ``lora`` onto ``km``; shape mismatches and ambiguous names are errors."""
    patches: list[Patch] = []
    unmatched: list[str] = []
    for module, ad in lora.adapters.items():
        if module in km.ambiguous:
            a, b = km.ambiguous[module]
            raise UserError(f"{lora.path}: module '{module}' (key '{ad.first_key}') could mean '{a}' or '{b}' in "
                            "this base checkpoint; refusing to guess")
        target = km.get(module)
        if target is None:
            unmatched.append(module)
            continue
        if ad.kind != "bias":
            check_shape(lora, ad, target)
            patches.append(Patch(lora, ad, strength, target))
        if ad.bias_key is not None:
            patches.append(Patch(lora, ad, strength, _bias_target(lora, ad, target), bias=True))
    tensors = len({p.target.tensor for p in patches})
    match = FileMatch(str(lora.path), strength, len(lora.adapters), len(lora.adapters) - len(unmatched), tensors,
                      unmatched, len(lora.orphans))
    return patches, match


def check_shape(lora: LoRAFile, ad: Adapter, target: Target) -> None:
    """The adapter's difference must have the target's row count and element count."""
    want = target.target_shape
    rows, numel = delta_shape(ad)
    n = 1
    for d in want:
        n *= d
    if (want and rows != want[0]) or numel != n:
        raise UserError(f"{lora.path}: module '{ad.module}' (key '{ad.first_key}') makes a difference of {rows} rows "
                        f"x {numel // max(rows, 1)} but the base tensor {target.describe()} is {list(want)}: this LoRA "
                        "was made for another model")
    if ad.dora_key is not None:
        mag = lora.reader.infos[ad.dora_key].shape
        if mag and mag[0] not in (want[0], 1):
            raise UserError(f"{lora.path}: dora_scale '{ad.dora_key}' has shape {list(mag)}, which fits neither the "
                            f"rows nor the columns of {target.describe()} {list(want)}")


def _bias_target(lora: LoRAFile, ad: Adapter, target: Target) -> Target:
    if target.bias is None:
        raise UserError(f"{lora.path}: '{ad.bias_key}' changes the bias of {target.tensor}, which has no bias")
    bias_shape = (target.shape[0],)
    t = Target(target.bias, bias_shape, target.rows, target.swap)
    got = lora.reader.infos[ad.bias_key].shape  # type: ignore[index]
    if tuple(got) != t.target_shape:
        raise UserError(f"{lora.path}: '{ad.bias_key}' has shape {list(got)} but {t.describe()} is "
                        f"{list(t.target_shape)}")
    return t


class BoundMerge:
    """The merge bound to one base checkpoint: ``names`` are the tensors it changes, ``__call__`` changes one."""

    def __init__(self, patches: Sequence[Patch], matches: Sequence[FileMatch], family: str) -> None:
        self.by_tensor: dict[str, list[Patch]] = {}
        for p in patches:
            self.by_tensor.setdefault(p.target.tensor, []).append(p)
        self.names = frozenset(self.by_tensor)
        self.matches = list(matches)
        self.family = family

    @property
    def notes(self) -> list[str]:
        return [m.line() for m in self.matches]

    @property
    def warnings(self) -> list[str]:
        """The lines of LoRAs that matched only part of their modules."""
        return [m.line() for m in self.matches if m.unmatched]

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32, owned by the caller) with every patch for ``name`` applied, in LoRA order."""
        for p in self.by_tensor.get(name, ()):
            view = weight[p.target.rows[0]:p.target.rows[1]] if p.target.rows else weight
            if p.bias:
                diff = p.strength * p.lora.tensor(p.adapter.bias_key).to(view.device)  # type: ignore[arg-type]
                view += swap_halves(diff) if p.target.swap else diff
            else:
                patch_weight(view, p.adapter, p.lora, p.strength, swap_halves if p.target.swap else None)
        return weight


class LoRAMerge:
    """The converter's weight transform for ``--merge-lora``: see the module docstring."""

    def __init__(self, config: MergeConfig) -> None:
        if not config.loras:
            raise UserError("no LoRA to merge")
        self.config = config

    def bind(self, infos: Mapping[str, TensorInfo], base: str = "the base checkpoint") -> BoundMerge:
        """Read the LoRAs and map them onto ``infos``; every mismatch is a UserError before anything is written."""
        km = build_keymap({k: t.shape for k, t in infos.items()})
        return bind_loras([read_lora(s.path) for s in self.config.loras], self.config.strengths(), km, base)


def bind_loras(loras: Sequence[LoRAFile], strengths: Sequence[float], km: KeyMap, base: str) -> BoundMerge:
    """Resolve several parsed LoRAs against one key map; a LoRA that matches nothing is an error."""
    patches: list[Patch] = []
    matches: list[FileMatch] = []
    for lora, strength in zip(loras, strengths, strict=True):
        ps, match = resolve(lora, km, strength)
        if match.matched == 0:
            first = match.unmatched[0] if match.unmatched else "(none)"
            raise UserError(f"{lora.path}: none of its {match.modules} modules matches a layer of {base} "
                            f"({km.family}); first key '{lora.adapters[first].first_key}': "
                            f"{unmatched_hint(match.unmatched, km)}")
        patches += ps
        matches.append(match)
    return BoundMerge(patches, matches, km.family)
