"""``quantize_``: quantize a live model's ``nn.Linear`` layers in place (the engine behind the ComfyUI node).

Which layers: a model preset's rules (``config.model``), then ``include``/``exclude`` regexes, a filter
function and a minimum size, in that order; the first that says "keep" decides. Every linear layer appears in
the returned summary with what happened and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from comfyquant.autoprec.budget import parse_budget
from comfyquant.autoprec.candidates import KEEP
from comfyquant.autoprec.plan import AUTO
from comfyquant.errors import NonFiniteWeightError, UserError
from comfyquant.formats import FormatShapeError, get_format
from comfyquant.quant.metrics import all_finite
from comfyquant.runtime.fold import fold_input_activations
from comfyquant.runtime.layouts import layout_for_format
from comfyquant.runtime.nn import QuantLinear, check_backend
from comfyquant.runtime.tensor import Layout


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize a model.

    ``format`` is a CLI format name (``int8``, ``int8-tensor``, ``int8-rot``, ``int8-block``, ``fp8``,
    ``fp8-e5m2``). ``model`` names a preset (``flux``, ``wan``, ... or ``auto``) whose rules decide per layer.
    ``include``/``exclude`` are regexes searched in the layer name; ``filter_fn(name, linear)`` returning False
    keeps a layer in float; layers with a dimension below ``min_features`` stay float. ``backend`` pins the
    kernel backend of every quantized layer. ``block_size`` / ``rot_group`` are the int8-block tile edge and the
    int8-rot Hadamard group (None: the largest power of 4 up to 256 dividing in_features).

    ``format="auto"`` chooses each layer's format (docs/AUTO_PRECISION.md): from ``layer_formats`` (layer name ->
    format or ``keep``, e.g. ``plan_auto(...).formats()``), else by planning for ``budget`` (``"size=0.4"``,
    ``"sqnr=30"``; ``psnr``/``cosine`` with a ``probe``) with ``calibration`` statistics (anything with
    ``.get(layer) -> LayerStats``; None: weight error only) among the quantized formats for ``target_gpu``.
    The plan is ``QuantizeSummary.auto``. ``filter_fn`` is consulted when quantizing, not while planning.
    ``auto_config``: the planner's settings (an ``autoprec.AutoConfig``: a quality floor's confidence and margin,
    the device; None: its defaults).

    ``fold_activations``: an activation module right before a quantized layer in an ``nn.Sequential`` (GELU,
    SiLU) is folded into that layer (``runtime.fold``), so the GPU kernels apply it as they read x; with
    ``fold_norms`` too a norm before quantized linears, in the classes ``runtime.norms`` knows (T5's and Llama's
    RMSNorms, CLIP's LayerNorms).
    """

    format: str = "int8"
    model: str | None = None
    include: str | None = None
    exclude: str | None = None
    filter_fn: Callable[[str, nn.Linear], bool] | None = None
    min_features: int = 16
    backend: str | None = None
    block_size: int = 128
    rot_group: int | None = None
    budget: Any = None
    calibration: Any = None
    layer_formats: Mapping[str, str] | None = None
    target_gpu: str | None = None
    allow_comfyquant_formats: bool = False
    probe: Any = None
    fold_activations: bool = True
    fold_norms: bool = True
    auto_config: Any = None

    def __post_init__(self) -> None:
        if self.format == AUTO:
            if self.budget is None and self.layer_formats is None:
                raise UserError("QuantizeConfig(format='auto') needs a budget (e.g. 'size=0.4') or layer_formats")
            if self.budget is not None:
                parse_budget(self.budget)
            if self.auto_config is not None and self.budget is None:
                raise UserError("QuantizeConfig: auto_config applies to planning for a budget, not to layer_formats")
            for name in (self.layer_formats or {}).values():
                if name != KEEP and not get_format(name).is_quantized:
                    raise UserError(f"layer_formats: '{name}' is a plain cast, not a quantized format")
            self._check_regexes()
            return
        if self.budget is not None or self.layer_formats is not None or self.auto_config is not None:
            raise UserError("QuantizeConfig: budget / layer_formats / auto_config apply to format='auto' only")
        spec = get_format(self.format)
        if not spec.is_quantized:
            raise UserError(f"format '{self.format}' is a plain cast, not a quantized format; use model.to(dtype)")
        self._check_regexes()

    def _check_regexes(self) -> None:
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise UserError(f"QuantizeConfig.{name}: invalid regex {pattern!r}: {e}") from None
        if self.min_features < 1:
            raise UserError(f"QuantizeConfig.min_features must be >= 1, got {self.min_features}")


@dataclass(frozen=True)
class LayerDecision:
    """One linear layer: ``action`` is ``quantized`` or ``kept``."""

    name: str
    shape: tuple[int, int]
    action: str
    reason: str
    format: str | None = None


@dataclass
class QuantizeSummary:
    """Every linear layer the model had, with what ``quantize_`` did to it."""

    format: str
    preset: str | None = None  # the preset whose rules decided (after "auto" detection), None without one
    layers: list[LayerDecision] = field(default_factory=list)
    auto: Any = None  # the AutoPlan of format="auto" (None when layer_formats were given)
    folded: list[str] = field(default_factory=list)  # activations folded into the layer they feed

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.action == "quantized"]

    @property
    def kept(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.action == "kept"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "preset": self.preset, "layers": [dict(d.__dict__) for d in self.layers],
                "folded": list(self.folded)}

    def __str__(self) -> str:
        rules = f", preset {self.preset}" if self.preset else ""
        lines = [f"quantize_ ({self.format}{rules}): {len(self.quantized)} quantized, {len(self.kept)} kept"]
        lines += [f"  {d.action:9s} {d.name} {list(d.shape)}: {d.reason}" for d in self.layers]
        lines += [f"  folded    {f} (activation applied by the layer)" for f in self.folded]
        return "\n".join(lines)


def layout_for(config: QuantizeConfig) -> tuple[type[Layout], dict[str, Any]]:
    """The layout class and its ``quantize`` keyword arguments for ``config.format`` (from the registry)."""
    if config.format == AUTO:
        raise UserError("format 'auto' has one layout per layer: ask layout_for(QuantizeConfig(format=name)) for "
                        "each chosen format (QuantizeSummary.layers[i].format)")
    spec = get_format(config.format)
    kwargs: dict[str, Any] = {"fmt": spec.name, "backend": config.backend}
    kwargs.update(_format_options(config))
    return layout_for_format(spec), kwargs


def _format_options(config: QuantizeConfig) -> dict[str, Any]:
    """The registry layer options ``config`` sets (a format ignores the ones it does not take)."""
    opts: dict[str, Any] = {"block_size": config.block_size}
    if config.rot_group is not None:
        opts["convrot_groupsize"] = config.rot_group
    return opts


def _preset_decider(model: nn.Module, preset_name: str
                    ) -> tuple[str, Callable[[str, tuple[int, int]], tuple[bool, str]]]:
    from comfyquant.presets.base import Action
    from comfyquant.presets.registry import decide_tensor, get_preset

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    preset = get_preset(preset_name, shapes)

    def decide(name: str, shape: tuple[int, int]) -> tuple[bool, str]:
        d = decide_tensor(preset, f"{name}.weight", shape)
        return d.action is Action.QUANTIZE, f"{d.rule}: {d.reason}"

    return preset.name, decide


def _decide(config: QuantizeConfig, name: str, linear: nn.Linear,
            preset: Callable[[str, tuple[int, int]], tuple[bool, str]] | None, *, resolve: bool = True,
            use_filter: bool = True) -> tuple[bool, str]:
    shape = (linear.out_features, linear.in_features)
    reason = "linear layer"
    if preset is not None:
        ok, reason = preset(name, shape)
        if not ok:
            return False, reason
    if config.include is not None and re.search(config.include, name) is None:
        return False, f"not matched by include {config.include!r}"
    if config.exclude is not None and re.search(config.exclude, name) is not None:
        return False, f"matched exclude {config.exclude!r}"
    if use_filter and config.filter_fn is not None and not config.filter_fn(name, linear):
        return False, "filter_fn returned False"
    if min(shape) < config.min_features:
        return False, f"too small ({shape[0]}x{shape[1]}, min_features={config.min_features})"
    if not resolve:
        return True, reason
    try:
        get_format(config.format).resolve(shape, _format_options(config))
    except FormatShapeError as e:
        return False, str(e)
    return True, reason


def quantize_(model: nn.Module, config: QuantizeConfig | None = None) -> QuantizeSummary:
    """Replace the chosen ``nn.Linear`` layers of ``model`` by ``QuantLinear`` (in place); return the summary."""
    config = config or QuantizeConfig()
    if isinstance(model, nn.Linear):
        raise UserError("quantize_ replaces layers inside a model; for a bare nn.Linear use QuantLinear.from_linear")
    summary = _quantize_auto(model, config) if config.format == AUTO else _quantize_uniform(model, config)
    if config.fold_activations:
        summary.folded = fold_input_activations(model, norms=config.fold_norms)
    return summary


def _quantize_uniform(model: nn.Module, config: QuantizeConfig) -> QuantizeSummary:
    layout, kwargs = layout_for(config)
    check_backend(layout, config.backend)
    preset_name, preset = _preset_decider(model, config.model) if config.model else (None, None)
    summary = QuantizeSummary(config.format, preset_name)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and n]
    for name, mod in targets:
        if isinstance(mod, QuantLinear):
            summary.layers.append(LayerDecision(name, (mod.out_features, mod.in_features), "kept",
                                                f"already quantized ({mod.qweight.layout_name})"))
            continue
        shape = (mod.out_features, mod.in_features)
        ok, reason = _decide(config, name, mod, preset)
        if not ok:
            summary.layers.append(LayerDecision(name, shape, "kept", reason))
            continue
        if not all_finite(mod.weight.detach()):
            raise NonFiniteWeightError(f"layer {name}: weight holds NaN or Inf values")
        q = QuantLinear.from_linear(mod, layout, **kwargs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        summary.layers.append(LayerDecision(name, shape, "quantized", reason, layout.name))
    return summary


# ---- format="auto" --------------------------------------------------------------------------------------------
def _auto_scope(model: nn.Module, config: QuantizeConfig) -> tuple[list[tuple[str, nn.Linear]], list[LayerDecision]]:
    """Linear layers automatic precision chooses for (include / exclude / size; preset keeps are candidates
    too), and the ones it leaves alone with the reason."""
    scope, kept = [], []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, nn.Linear | QuantLinear):
            continue
        shape = (mod.out_features, mod.in_features)
        if isinstance(mod, QuantLinear):
            kept.append(LayerDecision(name, shape, "kept", f"already quantized ({mod.qweight.layout_name})"))
            continue
        ok, reason = _decide(config, name, mod, None, resolve=False, use_filter=False)
        if ok:
            scope.append((name, mod))
        else:
            kept.append(LayerDecision(name, shape, "kept", reason))
    return scope, kept


def plan_auto(model: nn.Module, config: QuantizeConfig) -> Any:
    """The automatic-precision plan (``autoprec.AutoPlan``) of ``model``'s linear layers for ``config.budget``:
    candidates are the quantized formats of the registry (casts are not: the model keeps one dtype); the size
    counts the model's whole state dict."""
    from comfyquant.autoprec import AutoConfig, CandidatePolicy, LayerSource, plan_precision
    from comfyquant.formats import REGISTRY

    scope, _ = _auto_scope(model, config)
    base = CandidatePolicy(config.target_gpu, config.allow_comfyquant_formats)
    names = tuple(f.name for f in REGISTRY.formats() if f.is_quantized and base.eligible(f))
    policy = CandidatePolicy(config.target_gpu, config.allow_comfyquant_formats, names,
                             tuple(_format_options(config).items()))
    layers = [LayerSource(n, (m.out_features, m.in_features), m.weight.dtype, _weight_of(m)) for n, m in scope]
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fixed = total - sum(x.nbytes for x in layers)
    stats_of = config.calibration.get if config.calibration is not None else None
    return plan_precision(layers, parse_budget(config.budget), policy, bytes_in=total, fixed_bytes=fixed,
                          stats_of=stats_of, probe=config.probe,
                          config=config.auto_config if config.auto_config is not None else AutoConfig())


def _weight_of(mod: nn.Linear) -> Callable[[], Any]:
    return lambda: mod.weight.detach()


def _quantize_auto(model: nn.Module, config: QuantizeConfig) -> QuantizeSummary:
    """One pass over the model with each layer's chosen format (``layer_formats``, or a plan for the budget)."""
    plan = None
    formats = dict(config.layer_formats) if config.layer_formats is not None else None
    if formats is None:
        plan = plan_auto(model, config)
        formats = plan.formats()
    reasons = {x.name: x.reason for x in plan.layers} if plan is not None else {}
    scope, kept = _auto_scope(model, config)
    summary = QuantizeSummary(AUTO, None, list(kept), plan)
    for name, mod in scope:
        shape = (mod.out_features, mod.in_features)
        fmt = formats.get(name)
        if fmt is None or fmt == KEEP:
            why = reasons.get(name, "not in layer_formats") if fmt is None else reasons.get(name, "layer_formats: keep")
            summary.layers.append(LayerDecision(name, shape, "kept", why))
            continue
        if config.filter_fn is not None and not config.filter_fn(name, mod):
            summary.layers.append(LayerDecision(name, shape, "kept", "filter_fn returned False"))
            continue
        if not all_finite(mod.weight.detach()):
            raise NonFiniteWeightError(f"layer {name}: weight holds NaN or Inf values")
        layer_cfg = QuantizeConfig(format=fmt, backend=config.backend, block_size=config.block_size,
                                   rot_group=config.rot_group)
        layout, kwargs = layout_for(layer_cfg)
        q = QuantLinear.from_linear(mod, layout, **kwargs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        summary.layers.append(LayerDecision(name, shape, "quantized", reasons.get(name, "layer_formats"), fmt))
    return summary
