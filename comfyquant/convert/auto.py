"""``--format auto`` in the converter: the automatic-precision plan turned into an ordinary conversion plan.

Every candidate weight (``plan.auto_candidates``) gets an exact-name rule with the format
``autoprec.plan_precision`` chose (or ``skip`` for high precision); ``build_plan`` then plans the file as for a
``--layer-config`` of those rules, so the output is an ordinary file of registry formats, loaded by stock
ComfyUI when the chosen formats allow it. Everything else (the user's explicit ``--layer-config`` rules,
other parts of a bundled checkpoint, drops) is planned exactly as without ``auto``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from comfyquant.autoprec import (
    AUTO,
    KEEP,
    AutoConfig,
    AutoPlan,
    Budget,
    CandidatePolicy,
    LayerSource,
    parse_budget,
)
from comfyquant.autoprec.plan import plan_precision
from comfyquant.calibration.stats import LayerStats
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.layer_config import LayerRule
from comfyquant.convert.plan import (
    LayerConfigLike,
    Plan,
    PlanOptions,
    auto_candidates,
    build_plan,
    load_layer_config,
    resolve_preset,
)
from comfyquant.errors import UserError
from comfyquant.io.reader import CheckpointReader


def auto_options(block_size: int) -> tuple[tuple[str, Any], ...]:
    """Layer options of every candidate: int4-rot written with ``linear_dtype`` "int8", so stock ComfyUI runs it
    W4A8 as comfyquant's runtime does and as its sensitivity was measured (its default, W4A4, rounds the
    activations to 4 bits)."""
    return (("block_size", block_size), ("linear_dtype", "int8"))


@dataclass(frozen=True)
class _AutoRules:
    """The user's explicit rules first, then one exact rule per auto-chosen weight (a ``LayerConfigLike``)."""

    user: LayerConfigLike | None
    rules: dict[str, LayerRule] = field(default_factory=dict)

    def match(self, name: str) -> LayerRule | None:
        if self.user is not None:
            r = self.user.match(name)
            if r is not None:
                return r  # type: ignore[return-value]
        return self.rules.get(name if name.endswith(".weight") else f"{name}.weight")


def _stats_source(opts: Any, reader: CheckpointReader, shapes: dict[str, tuple[int, ...]]
                  ) -> tuple[Callable[[str], LayerStats | None] | None, str | None]:
    """Where layer statistics come from: a calibration file, in-memory statistics, ``synthetic``, or None."""
    cal = opts.calibration
    if cal is None:
        return None, None
    if cal == "synthetic":
        from comfyquant.convert.optimizing import synthetic_stats

        seed = getattr(opts.optimizer, "seed", 0)
        return (lambda layer: synthetic_stats(shapes[layer][1], seed) if layer in shapes else None,
                "calibration: SYNTHETIC (standard-normal inputs): sensitivities see no real input directions")
    if isinstance(cal, str):
        from comfyquant.calibration.fileio import CalibrationFile, check_compatible

        calib = CalibrationFile(cal)
        check_compatible(calib, shapes, cal)
        return calib.get, f"calibration: {cal} ({calib.meta.get('source', 'unknown source')}; {len(calib)} layers)"
    return cal.get, "calibration: in-memory statistics"


def plan_auto_conversion(reader: CheckpointReader, opts: Any) -> tuple[Plan, AutoPlan]:
    """The conversion plan of ``--format auto`` and the automatic-precision plan behind it (``opts`` is a
    ``ConvertOptions``). A budget no plan meets raises UserError before anything is written."""
    budget = parse_budget(opts.budget)
    config = auto_config(opts, budget)
    if opts.fallback is not None:
        raise UserError("--fallback does not apply to --format auto: each layer's format is chosen among the "
                        "candidates its shape can take")
    if opts.layers != LayerOptions():
        raise UserError("per-layer options (--rule, --exclude, --excluded-format, --keep-dtype, ...) do not combine "
                        "with --format auto yet: give rules for specific layers in a --layer-config instead")
    if opts.optimizer is not None and getattr(opts.optimizer, "smoothquant", False):
        raise UserError("--smoothquant with --format auto is not supported: the layer sensitivities are measured "
                        "on the unsmoothed weights and activations")
    shapes = {k: t.shape for k, t in reader.infos.items()}
    preset = resolve_preset(opts.model, shapes)
    if preset.kind == "lora":
        raise UserError("--format auto chooses formats for a model's layers from their effect on its output; "
                        "a LoRA file has none: convert it with a fixed --format")
    layer_config = load_layer_config(opts.layer_config)
    if layer_config is not None and getattr(layer_config, "default", None) is not None:
        raise UserError(f"--layer-config {opts.layer_config}: a catch-all default rule conflicts with --format "
                        "auto (it would choose every layer's format); keep only the rules for specific layers")
    base_opts = PlanOptions("int8", opts.model, None, opts.block_size, None)
    base = build_plan(reader.infos, base_opts, preset=preset, metadata=reader.metadata, layer_config=layer_config)
    cands = auto_candidates(reader.infos, preset=preset, layer_config=layer_config)
    fixed = sum(e.bytes_out for e in base.entries if e.name not in cands)
    layers = [LayerSource(n.removesuffix(".weight"), (int(reader.infos[n].shape[0]), int(reader.infos[n].shape[1])),
                          reader.infos[n].dtype, _loader(reader, n)) for n in cands]
    stats_of, note = _stats_source(opts, reader, {x.name: x.shape for x in layers})
    policy = CandidatePolicy(opts.target_gpu, opts.allow_comfyquant_formats, options=auto_options(opts.block_size))
    auto = plan_precision(layers, budget, policy, bytes_in=base.bytes_in, fixed_bytes=fixed, stats_of=stats_of,
                          probe=opts.probe, config=config)
    if note:
        auto.notes.insert(0, note)
    chosen = {f"{x.name}.weight": x for x in auto.layers}
    rules = {n: LayerRule(f"^{re.escape(x.name)}$", None if x.format == KEEP else x.format, x.format == KEEP,
                          dict(x.params), label=AUTO) for n, x in chosen.items()}
    plan = build_plan(reader.infos, base_opts, preset=preset, metadata=reader.metadata,
                      layer_config=_AutoRules(layer_config, rules))
    plan.format = AUTO
    for e in plan.entries:
        x = chosen.get(e.name)
        if x is not None:
            e.rule, e.reason = AUTO, f"{x.reason}; {cands[e.name]}"
    if plan.bytes_out != auto.bytes_out:  # pragma: no cover - the registry's slots are the one byte count
        raise RuntimeError(f"auto plan sizes disagree: {plan.bytes_out} planned, {auto.bytes_out} chosen")
    return plan, auto


# a quality floor's settings: AutoConfig field, its flag, what the flag takes (the range check is AutoConfig's)
_FLOOR_FLAGS = (("confidence", "--auto-confidence", "a number in [0.5, 1), e.g. 0.95"),
                ("margin_db", "--auto-margin-db", "a number of dB >= 0, e.g. 0.5"))


def auto_config(opts: Any, budget: Budget) -> AutoConfig:
    """The planner's settings from ``opts`` (a ``ConvertOptions``): ``auto_confidence`` / ``auto_margin_db``
    (None: ``AutoConfig``'s defaults), checked here so a bad value is one UserError line naming its flag."""
    floor: dict[str, float] = {}
    for key, flag, want in _FLOOR_FLAGS:
        value = getattr(opts, f"auto_{key}")
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not _in_range(key, float(value)):
            raise UserError(f"{flag} {value!r}: must be {want}")
        floor[key] = float(value)
    quality = budget.quality
    if floor and (quality is None or quality[0] not in ("psnr", "cosine")):
        flags = [flag for key, flag, _ in _FLOOR_FLAGS if key in floor]
        raise UserError(f"{' and '.join(flags)} {'apply' if len(flags) > 1 else 'applies'} to a psnr= or cosine= "
                        f"--budget only (a floor planned on the calibration items), not to --budget "
                        f"{budget.describe()}")
    return AutoConfig(device=opts.device, progress=opts.progress, **floor)


def _in_range(key: str, value: float) -> bool:
    """Whether ``AutoConfig`` takes ``value`` for its field ``key`` (its own check: NaN and infinities fail it)."""
    try:
        AutoConfig(**{key: value})
    except ValueError:
        return False
    return True


def _loader(reader: CheckpointReader, name: str) -> Callable[[], Any]:
    return lambda: reader.get(name)
