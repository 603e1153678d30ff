"""The converter's side of the rounding optimizers: calibration, SmoothQuant rewrites, bias correction.

:func:`make_hooks` is called once per conversion (after the plan) and returns ``None`` for plain RTN.
The streamer then calls ``hooks.rewrite(name, tensor)`` on every tensor it reads (SmoothQuant's folded
scales, bias correction) and ``hooks.quantize(entry, x)`` on every weight it quantizes; both are per
layer, so a layer's failure stays that layer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.calibration.fileio import CalibrationFile, check_compatible
from comfyquant.calibration.stats import LayerStats
from comfyquant.convert.plan import QUANTIZE, Plan, PlanEntry
from comfyquant.errors import UserError
from comfyquant.formats import get_format
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import TensorSpec
from comfyquant.optimize.config import OptimizerConfig
from comfyquant.optimize.driver import OptimizedLayer, optimize
from comfyquant.optimize.hessian import LayerFallback
from comfyquant.optimize.smoothquant import SmoothPlan, plan_smoothing

SYNTHETIC = "synthetic"
SYNTHETIC_ROWS = 256


def synthetic_stats(k: int, seed: int, reservoir: int = 64) -> LayerStats:
    """Statistics of standard-normal inputs: what a calibration without a model to run can offer (the
    Hessian is about the identity, so GPTQ and learned rounding reduce to near-RTN)."""
    gen = torch.Generator().manual_seed(seed)
    s = LayerStats.empty(k, reservoir)
    s.update(torch.randn(SYNTHETIC_ROWS, k, generator=gen), gen)
    return s


@dataclass
class OptimizeHooks:
    """Per-conversion state: where statistics come from, the smoothing plan, cached bias-corrected layers."""

    reader: CheckpointReader
    config: OptimizerConfig
    stats_of: Callable[[str], LayerStats | None]
    entries: dict[str, PlanEntry]
    smooth: SmoothPlan | None = None
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layer_notes: dict[str, list[str]] = field(default_factory=dict)
    results: dict[str, OptimizedLayer] = field(default_factory=dict)
    _cached: dict[str, OptimizedLayer] = field(default_factory=dict)

    def rewrite(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The tensor as the optimized checkpoint stores it before quantization (smoothing, bias correction)."""
        if self.smooth is not None:
            t = self.smooth.rewrite(name, t)
        layer = name.removesuffix(".bias")
        if name.endswith(".bias") and self.config.bias_correction and f"{layer}.weight" in self.entries:
            try:
                res = self._run(self.entries[f"{layer}.weight"])
            except LayerFallback:
                return t  # the weight stays in high precision; its own entry reports why
            if res.bias_delta is not None:
                t = (t.double() + res.bias_delta.to(device=t.device, dtype=torch.float64)).to(t.dtype)
        return t

    def quantize(self, entry: PlanEntry, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of one planned weight (``x`` already rewritten)."""
        res = self._cached.pop(entry.name, None) or self._optimize(entry, x)
        return res.tensors

    def _run(self, entry: PlanEntry) -> OptimizedLayer:
        if entry.name not in self._cached:
            x = self.rewrite(entry.name, self.reader.get(entry.name))
            self._cached[entry.name] = self._optimize(entry, x)
        return self._cached[entry.name]

    def _optimize(self, entry: PlanEntry, x: torch.Tensor) -> OptimizedLayer:
        layer = entry.layer
        stats = self.stats_of(layer)
        if self.smooth is not None:
            stats = self.smooth.stats_for(layer, stats)
        res = optimize(layer, x, entry.format or "int8", dict(entry.params), stats, self.config,
                       self.lora.get(layer))
        if self.config.bias_correction and res.bias_delta is not None and f"{layer}.bias" not in self.reader.infos:
            res.notes.append("bias correction: the layer has no bias to move the mean error into")
        self.results[layer] = res
        if res.notes:
            self.layer_notes[layer] = res.notes
        return res


def add_input_scales(plan: Plan) -> int:
    """Plan a static ``input_scale`` for every layer whose format stores one (FP8, activation calibration):
    the format's ``input_scale`` option, its slots re-read from the registry; returns how many."""
    n = 0
    for e in plan.entries:
        if e.action != QUANTIZE or e.params.get("input_scale"):
            continue
        fmt = get_format(e.format or "int8")
        shape = (e.shape[0], e.shape[1])
        params = {**e.params, **fmt.resolve(shape, {**e.params, "input_scale": True})}
        slots = fmt.slots(shape, params)
        if not any(s.suffix == "input_scale" for s in slots):
            continue
        e.params = params
        cq = [s for s in e.outputs if s.name == f"{e.layer}.comfy_quant"]
        e.outputs = [TensorSpec(f"{e.layer}.{s.suffix}", s.dtype, s.shape) for s in slots] + cq
        n += 1
    return n


def make_hooks(reader: CheckpointReader, plan: Plan, config: OptimizerConfig | None,
               calibration: Any, calibration_lora: str | None = None, calibration_used: bool = False
               ) -> OptimizeHooks | None:
    """The optimizer hooks of one conversion, or None when nothing but RTN is asked for. ``calibration`` is a
    file path, ``"synthetic"``, or an in-memory source with ``.get(layer) -> LayerStats | None``;
    ``calibration_used``: something else (``--format auto``) reads it, so RTN with it is no mistake."""
    if config is None or (not config.needs_calibration and calibration_lora is None):
        if calibration is not None and not calibration_used:
            raise UserError("--calibration is given but nothing uses it: add --optimizer gptq|learned|quip, "
                            "--smoothquant, --bias-correction or --actcal")
        return None
    quant = {e.layer: e for e in plan.entries if e.action == QUANTIZE}
    shapes = {layer: e.shape for layer, e in quant.items()}
    notes: list[str] = []
    if calibration is None:
        raise UserError(f"--optimizer {config.method} (and --smoothquant / --bias-correction / --actcal) needs "
                        "--calibration FILE from `comfyquant calibrate`, or --calibration synthetic")
    if calibration == SYNTHETIC:
        notes.append("calibration: SYNTHETIC (standard-normal inputs, no model was run): the Hessians are about "
                     "the identity, so the optimizers can do little better than RTN")
        cache: dict[str, LayerStats] = {}

        def stats_of(layer: str) -> LayerStats | None:
            if layer not in shapes:
                return None
            if layer not in cache:
                cache.clear()
                cache[layer] = synthetic_stats(shapes[layer][1], config.seed)
            return cache[layer]
    elif not isinstance(calibration, str):  # an in-memory source: CalibrationStats, or anything with .get(layer)
        src = calibration
        notes.append(f"calibration: in-memory statistics ({getattr(src, 'meta', {}).get('source', 'unknown source')})")

        def stats_of(layer: str) -> LayerStats | None:
            return src.get(layer)
    else:
        calib = CalibrationFile(calibration)
        check_compatible(calib, shapes, calibration)
        src = calib.meta.get("source", "unknown source")
        missing = [n for n in shapes if n not in calib]
        notes.append(f"calibration: {calibration} ({src}; {len(calib)} layers)"
                     + (f"; {len(missing)} quantized layer(s) without statistics use RTN" if missing else ""))

        def stats_of(layer: str) -> LayerStats | None:
            return calib.layer(layer) if layer in calib else None
    if config.input_scale_percentile is not None:
        n = add_input_scales(plan)
        notes.append(f"activation calibration: static input_scale for {n} FP8 layer(s) from the "
                     f"{config.input_scale_percentile:g}th percentile of |x|")
    hooks = OptimizeHooks(reader, config, stats_of, {e.name: e for e in quant.values()}, notes=notes)
    if config.smoothquant:
        def act(layer: str) -> torch.Tensor | None:
            s = stats_of(layer)
            return s.absmax if s is not None and s.count > 0 else None

        def wabs(layer: str) -> torch.Tensor:
            return reader.get(f"{layer}.weight").float().abs().amax(0)

        hooks.smooth = plan_smoothing(list(quant), {k: t.shape for k, t in reader.infos.items()}, act, wabs,
                                      config.alpha)
        notes.append(f"SmoothQuant (alpha {config.alpha:g}): {sum(len(g.targets) for g in hooks.smooth.groups)} "
                     f"layer(s) smoothed into {len(hooks.smooth.groups)} producer op(s); "
                     f"{len(hooks.smooth.refused)} refused (reasons per layer in the report)")
        for layer, why in hooks.smooth.refused.items():
            hooks.layer_notes.setdefault(layer, []).append(why)
    if calibration_lora is not None:
        from comfyquant.optimize.lora_dirs import describe, lora_down_matrices

        found, unmatched = lora_down_matrices(calibration_lora, {k: v[1] for k, v in shapes.items()})
        hooks.lora = found
        notes.append(describe(found, unmatched))
    return hooks
