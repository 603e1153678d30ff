"""The conversion plan: for every input tensor, what it becomes (quantize / cast / keep / drop) and why.

Computed from headers alone, so ``inspect`` shows exactly what ``convert`` will do and the streaming writer
knows every output tensor's name, dtype and shape before the first byte of data is read. Priority: the
``--layer-config`` rules, then command-line rules, then ``--exclude``, then the model preset, then the format
(fp16/bf16 cast instead of quantize); ``convert.choices.LayerOptions`` holds the per-layer choices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from comfyquant.convert.cast import cast_kept_tensor
from comfyquant.convert.choices import LayerOptions, misaligned
from comfyquant.convert.layer_config import LayerConfig
from comfyquant.errors import UserError
from comfyquant.formats import FormatShapeError, QuantFormat, get_format
from comfyquant.io.comfy_meta import HEADER_KEY, QUANT_SUFFIX, encoded_size, is_scaled_fp8
from comfyquant.io.reader import TensorInfo
from comfyquant.io.writer import TensorSpec
from comfyquant.presets.base import Action, Preset, is_linear_weight
from comfyquant.presets.registry import decide_tensor
from comfyquant.presets.registry import strip_prefix as registry_strip_prefix

QUANTIZE, CAST, KEEP, DROP = "quantize", "cast", "keep", "drop"
ACTIONS = (QUANTIZE, CAST, KEEP, DROP)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _quant_storage() -> set[torch.dtype]:
    """Dtypes a quantized weight is stored in (every registered format's, plus uint8 packing)."""
    from comfyquant.formats import REGISTRY

    return {f.storage_dtype for f in REGISTRY.formats() if f.is_quantized} | {torch.uint8}


class LayerRuleLike(Protocol):
    """What the planner reads from a ``--layer-config`` rule."""

    pattern: str
    format: str | None
    skip: bool


class LayerConfigLike(Protocol):
    def match(self, name: str) -> LayerRuleLike | None: ...


@dataclass(frozen=True)
class PlanOptions:
    """Everything that decides a plan besides the checkpoint itself."""

    format: str = "int8"
    model: str = "auto"
    layer_config: str | Path | None = None
    block_size: int = 128
    # where a layer goes when its shape cannot take its format: a format name, "none" (keep it in high
    # precision), or None (the format's own fallback, e.g. int8-rot -> int8, else high precision)
    fallback: str | None = None
    layers: LayerOptions = field(default_factory=LayerOptions)


@dataclass
class PlanEntry:
    """One input tensor: the action, the format (CLI name) for quantize/cast, the outputs, rule and reason."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    action: str
    rule: str
    reason: str
    format: str | None = None
    outputs: list[TensorSpec] = field(default_factory=list)
    comfy_quant: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    bytes_in: int = 0

    @property
    def layer(self) -> str:
        """The layer name (tensor name without ``.weight``)."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
            "action": self.action, "format": self.format, "rule": self.rule, "reason": self.reason,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "outputs": [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)}
                        for s in self.outputs],
        }


@dataclass
class Plan:
    """The whole conversion: entries in streaming order plus the resolved preset and format."""

    entries: list[PlanEntry]
    format: str
    preset: str
    block_size: int

    @property
    def specs(self) -> list[TensorSpec]:
        """All output tensors in write order."""
        return [s for e in self.entries for s in e.outputs]

    @property
    def bytes_in(self) -> int:
        return sum(e.bytes_in for e in self.entries)

    @property
    def bytes_out(self) -> int:
        return sum(e.bytes_out for e in self.entries)

    def counts(self) -> dict[str, int]:
        c = Counter(e.action for e in self.entries)
        return {a: c.get(a, 0) for a in ACTIONS}


def resolve_preset(model: str, shapes: Mapping[str, tuple[int, ...]]) -> Preset:
    """The preset named by ``--model`` (``auto``: detected from key names and shapes)."""
    from comfyquant.presets import registry

    if model == "auto":
        return registry.detect_preset(dict(shapes))
    return registry.get_preset(model)


def strip_prefix(name: str) -> str:
    """The tensor name with a known checkpoint prefix removed (``model.diffusion_model.`` ...)."""
    return registry_strip_prefix(name)[1]


def load_layer_config(path: str | Path | None) -> LayerConfigLike | None:
    """Parse ``--layer-config`` (None when not given)."""
    if path is None:
        return None
    return LayerConfig.load(path)


def check_not_quantized(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> None:
    """Refuse inputs that already hold quantized weights: converting them again would lose precision."""
    names = set(infos)
    why = None
    cq = next((n for n in infos if n.endswith(QUANT_SUFFIX)), None)
    if cq:
        why = f"it has per-layer quantization metadata ('{cq}')"
    elif HEADER_KEY in metadata:
        why = f"its header has '{HEADER_KEY}'"
    elif is_scaled_fp8(names):
        why = "it is a scaled_fp8 checkpoint"
    else:
        storage = _quant_storage()
        for n, t in infos.items():
            if n.endswith(".weight") and t.dtype in storage:
                base = n[: -len(".weight")]
                if f"{base}.weight_scale" in names or f"{base}.scale_weight" in names:
                    why = f"'{n}' is stored as {str(t.dtype).removeprefix('torch.')} with a scale"
                    break
    if why:
        raise UserError(f"the input is already quantized ({why}); use `comfyquant edit` to change its metadata, "
                        "or convert the original float checkpoint")


def _quant_entry(entry: PlanEntry, fmt: QuantFormat, options: Mapping[str, Any], fallback: str | None) -> None:
    """Fill format, params, outputs and comfy_quant of a quantized 2-D weight from the format registry.

    A shape the format cannot take goes to ``fallback`` (a format name; "none" keeps the layer), or, when none
    is given, to the format's own fallback (int8-rot -> int8), else stays in high precision; the reason is kept.
    """
    shape = (entry.shape[0], entry.shape[1])
    tried: list[str] = []
    while True:
        try:
            params = fmt.resolve(shape, options)
            break
        except FormatShapeError as e:
            tried.append(fmt.name)
            nxt = fallback if fallback is not None else fmt.fallback
            if nxt in (None, "none") or nxt in tried:
                entry.action, entry.reason = KEEP, f"{entry.reason}; {e}, so kept in high precision"
                entry.outputs = [TensorSpec(entry.name, entry.dtype, entry.shape)]
                return
            entry.reason += f"; {e}, so stored as {nxt}"
            fmt = get_format(nxt)
    entry.format, entry.params = fmt.name, params
    if not fmt.is_quantized:
        entry.action = CAST
        entry.outputs = [TensorSpec(entry.name, s.dtype, s.shape) for s in fmt.slots(shape, params)]
        return
    entry.comfy_quant = fmt.comfy_quant(params)
    entry.outputs = [TensorSpec(f"{entry.layer}.{s.suffix}", s.dtype, s.shape) for s in fmt.slots(shape, params)]
    entry.outputs.append(TensorSpec(f"{entry.layer}{QUANT_SUFFIX}", torch.uint8, (encoded_size(entry.comfy_quant),)))


@dataclass(frozen=True)
class _Choice:
    action: str
    format: str | None
    rule: str
    reason: str
    options: Mapping[str, Any] = field(default_factory=dict)


def _decide(name: str, info: TensorInfo, stripped: str, preset: Preset,
            layer_config: LayerConfigLike | None, fmt_name: str, layers: LayerOptions) -> _Choice:
    """The decision for one tensor before format-specific adjustments.

    An explicit ``--layer-config`` rule wins over everything, then a command-line rule, then the preset's
    drops, then ``--exclude``; the layer config's catch-all ``default`` only replaces the format of weights the
    preset quantizes (so preset keeps and drops still hold). Excluded linear layers (``--exclude`` and the
    preset's high-precision rules) become ``layers.excluded`` when it is set.
    """
    linear = name.endswith(".weight") and len(info.shape) == 2 and min(info.shape) > 0
    d = decide_tensor(preset, name, info.shape)
    if d.rule.startswith("prefix:"):  # VAE, or a bundled part the preset does not cover: always kept
        return _Choice(KEEP, None, d.rule, d.reason)
    quantizable = is_linear_weight(stripped, info.shape)
    preset_quant = d.action is Action.QUANTIZE and quantizable
    rule = layer_config.match(name) if layer_config is not None else None
    default = getattr(layer_config, "default", None)
    names = tuple(dict.fromkeys(n for full in (name, stripped)  # with and without .weight and the prefix
                                for n in (full, full[: -len(".weight")] if full.endswith(".weight") else full)))
    if linear and rule is not None and rule is not default:
        return _from_rule(rule, "layer-config", fmt_name)
    cli_rule = layers.rule_for(names) if linear else None
    if cli_rule is not None:
        return _from_rule(cli_rule, "rule", fmt_name)
    if d.action is Action.DROP:
        return _Choice(DROP, None, d.rule, d.reason)
    pattern = layers.excluded_by(names) if quantizable else None
    if pattern is not None:
        return _excluded(layers, f"exclude:{pattern}", "excluded by --exclude")
    if linear and rule is not None and preset_quant:
        return _from_rule(rule, "layer-config", fmt_name)
    if preset_quant:
        return _Choice(QUANTIZE, fmt_name, d.rule, d.reason)
    if quantizable and d.rule != "default":  # kept in high precision by one of the preset's rules
        return _excluded(layers, d.rule, d.reason)
    return _Choice(KEEP, None, d.rule, d.reason)


def _from_rule(rule: LayerRuleLike, kind: str, fmt_name: str) -> _Choice:
    label, flag = f"{kind}:{rule.pattern}", f"--{kind}"
    if rule.skip:
        return _Choice(KEEP, None, label, f"skipped by {flag}")
    return _Choice(QUANTIZE, rule.format or fmt_name, label, f"format chosen by {flag}",
                   getattr(rule, "options", {}) or {})


def _excluded(layers: LayerOptions, label: str, reason: str) -> _Choice:
    """An excluded linear layer: kept, or stored as ``layers.excluded`` (``--excluded-format``)."""
    ex = layers.excluded
    if ex is None or ex.format is None:
        return _Choice(KEEP, None, label, reason)
    return _Choice(QUANTIZE, ex.format, label, f"{reason}; stored as {ex.format} (--excluded-format)",
                   dict(ex.options))


def _kept_dtype(fmt_name: str, layers: LayerOptions) -> str | None:
    """The cast format of everything stored unquantized: a cast ``--format`` casts the whole file, else
    ``--keep-dtype``; None keeps each tensor's own dtype."""
    fmt = get_format(fmt_name)
    if fmt.is_quantized:
        return layers.keep_dtype
    if layers.keep_dtype is not None and get_format(layers.keep_dtype) is not fmt:
        raise UserError(f"--format {fmt.name} stores every floating tensor as {fmt.name}; --keep-dtype "
                        f"{layers.keep_dtype} contradicts it")
    return fmt.name
def auto_candidates(infos: Mapping[str, TensorInfo], *, preset: Preset,
                    layer_config: LayerConfigLike | None = None) -> dict[str, str]:
    """The weights ``--format auto`` chooses a format for -> what the preset says about them.

    Every 2-D float linear weight (``is_linear_weight``), including those a preset keeps in high precision by
    its structural rules: automatic precision measures instead of assuming. Left as they are: explicit
    ``--layer-config`` rules, prefix rules (other parts of a bundled checkpoint, the VAE), drops, embedding
    tables and weights too small to quantize.
    """
    out: dict[str, str] = {}
    for name, info in infos.items():
        stripped = strip_prefix(name)
        if info.dtype not in _FLOAT_DTYPES or not is_linear_weight(stripped, info.shape):
            continue
        c = _decide(name, info, stripped, preset, layer_config, "int8", LayerOptions())
        if c.action == DROP or c.rule.startswith(("prefix:", "layer-config:")):
            continue
        out[name] = f"the preset would {'quantize' if c.action == QUANTIZE else 'keep'} it ({c.rule}: {c.reason})"
    return out


def build_plan(infos: Mapping[str, TensorInfo], options: PlanOptions, *, preset: Preset | None = None,
               metadata: Mapping[str, str] | None = None, layer_config: LayerConfigLike | None = None,
               overrides: Mapping[str, str] | None = None) -> Plan:
    """Plan a conversion from headers alone.

    ``preset``/``layer_config`` default to those named by ``options``; ``overrides`` maps tensor names that
    must stay in high precision to the reason (found while streaming, e.g. NaN weights under ``--force``).
    """
    get_format(options.format)  # unknown format -> UserError before anything else
    if options.fallback not in (None, "none"):
        get_format(options.fallback)
    if options.block_size < 1:
        raise UserError(f"--block-size must be a positive integer, got {options.block_size}")
    layers = options.layers
    layers.validate()
    cast_to = _kept_dtype(options.format, layers)
    check_not_quantized(infos, metadata or {})
    if preset is None:
        preset = resolve_preset(options.model, {k: t.shape for k, t in infos.items()})
    if layer_config is None:
        layer_config = load_layer_config(options.layer_config)
    overrides = overrides or {}
    storage = _quant_storage()
    entries: list[PlanEntry] = []
    for name, info in infos.items():
        c = _decide(name, info, strip_prefix(name), preset, layer_config, options.format, layers)
        e = PlanEntry(name, info.dtype, info.shape, c.action, c.rule, c.reason, bytes_in=info.nbytes)
        if c.action == QUANTIZE and info.dtype not in _FLOAT_DTYPES:
            dt = str(info.dtype).removeprefix("torch.")
            e.action, e.reason = KEEP, (f"already stored as {dt} (no scale): copied as is"
                                        if info.dtype in storage else f"{dt} tensor, not a float weight")
        if e.action == QUANTIZE and name in overrides:
            e.action, e.rule, e.reason = KEEP, "forced", overrides[name]
        if e.action == QUANTIZE:
            opts = {**layers.format_options(options.block_size), **c.options}
            why = misaligned(info.shape, opts.pop("align", layers.align))
            if why is not None:
                e.action, e.reason = KEEP, f"{e.reason}; {why}, so kept in high precision"
            else:
                _quant_entry(e, get_format(c.format or options.format), opts, options.fallback)
        if e.action == KEEP:
            e.outputs = [TensorSpec(name, info.dtype, info.shape)]
            if name in overrides:  # --force keeps it as it is (NaN/Inf, beyond the float16 range)
                e.rule, e.reason = "forced", overrides[name]
            elif cast_to is not None and not layers.preserves(name):
                cast_kept_tensor(e, cast_to)
        entries.append(e)
    _check_collisions(entries)
    return Plan(entries, options.format, preset.name, options.block_size)


def _check_collisions(entries: list[PlanEntry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        for s in e.outputs:
            if s.name in seen:
                raise UserError(f"output tensor '{s.name}' would be written twice (from '{seen[s.name]}' and "
                                f"'{e.name}'); the input already has a tensor with that name")
            seen[s.name] = e.name
