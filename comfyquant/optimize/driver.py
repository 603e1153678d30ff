"""The per-layer entry point: ``optimize(layer, w, fmt, params, stats, config)`` -> stored tensors.

Pure with respect to the outside world: one weight and its statistics in, the format's stored tensors out
(on-grid weight + scales, ``input_scale`` for FP8 with activation calibration), a bias delta for bias
correction, and notes for the report. A method that cannot help (no statistics for the layer, a Hessian
singular even with damping, a diverging learned rounding, a result worse than RTN on the calibration data)
falls back to round-to-nearest and says why in ``notes``. Weights or statistics with NaN/Inf raise
:class:`NonFiniteError` (a :class:`LayerFallback`): the caller keeps that layer in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.calibration.stats import LayerStats
from comfyquant.formats import QuantFormat, get_format
from comfyquant.formats.base import LayerGrid
from comfyquant.optimize.config import OptimizerConfig
from comfyquant.optimize.gptq import act_order_perm, gptq_round
from comfyquant.optimize.hessian import (
    LayerFallback,
    NonFiniteError,
    SingularHessianError,
    damped_inverse_factor,
    normalized,
    output_error,
)
from comfyquant.optimize.learned import learned_round
from comfyquant.optimize.quip import ldlq, quip_folded


@dataclass
class OptimizedLayer:
    """One layer's result: stored tensors by suffix, what ran, and the proxy output errors (``tr(E H E^T)/N``
    on the normalized calibration Hessian) of RTN and of the result."""

    tensors: dict[str, torch.Tensor]
    method: str
    notes: list[str] = field(default_factory=list)
    bias_delta: torch.Tensor | None = None
    error_rtn: float | None = None
    error: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gain_db(self) -> float | None:
        """How much the optimizer lowered the calibration output error vs RTN (dB; positive = better)."""
        import math

        if not self.error_rtn or not self.error:
            return None
        return 10 * math.log10(self.error_rtn / self.error)


def _method(cfg: OptimizerConfig, fmt: QuantFormat) -> str:
    if cfg.method == "quip":
        storage = cfg.quip_storage if cfg.quip_storage != "auto" else ("convrot" if fmt.rotated else "folded")
        if storage == "convrot" and not fmt.rotated:
            raise LayerFallback(f"QuIP convrot storage needs a rotated format, {fmt.name} is not")
        return f"quip-{storage}"
    return cfg.method


def _round(method: str, w_t: torch.Tensor, h_t: torch.Tensor, grid: LayerGrid, fmt: QuantFormat,
           params: dict[str, Any], cfg: OptimizerConfig) -> tuple[torch.Tensor, LayerGrid, dict[str, Any]]:
    if method == "gptq":
        perm = act_order_perm(h_t) if cfg.act_order else None
        hp = h_t[perm][:, perm] if perm is not None else h_t
        u, used = damped_inverse_factor(hp, cfg.damp, cfg.damp_retries)
        return gptq_round(w_t, u, grid, block=cfg.block, perm=perm), grid, {"damp": used}
    if method == "learned":
        q, info = learned_round(w_t, h_t, grid, cfg.learned, seed=cfg.seed)
        return q, grid, info
    if method == "quip-convrot":
        q, g = ldlq(w_t, h_t, fmt, params, damp=cfg.damp, retries=cfg.damp_retries, block=cfg.block)
        return q, g, {}
    if method == "quip-folded":
        q, g = quip_folded(w_t, h_t, fmt, params, damp=cfg.damp, retries=cfg.damp_retries, block=cfg.block,
                           seed=cfg.seed)
        return q, g, {}
    raise ValueError(method)


def input_scale(stats: LayerStats, fmt: QuantFormat, percentile: float | None) -> torch.Tensor:
    """Static activation scale: the calibrated |x| (max over channels of the per-channel percentile, or
    absmax) over the format's largest value, fp32 scalar."""
    amax = stats.absmax if percentile is None or percentile >= 100 else stats.percentile(percentile)
    top = float(amax.max())
    grid_max = float(getattr(getattr(fmt, "element_grid", None), "max", 1.0))
    return torch.tensor(top / grid_max if top > 0 else 1.0, dtype=torch.float32)


def optimize(layer: str, w: torch.Tensor, fmt: str | QuantFormat, params: dict[str, Any],
             stats: LayerStats | None, config: OptimizerConfig, lora_a: torch.Tensor | None = None
             ) -> OptimizedLayer:
    """Quantize one ``[N, K]`` weight to ``fmt`` with ``config.method``; see the module docstring."""
    spec = get_format(fmt)
    dev = torch.device(config.device) if config.device else w.device
    w32 = w.to(device=dev, dtype=torch.float32)
    if not torch.isfinite(w32).all():
        raise NonFiniteError(f"{layer}: weight holds NaN/Inf")
    notes: list[str] = []
    w_t = spec.transform(w32, params)
    grid = spec.grid(w_t, params)
    rtn = grid.fake_quant(w_t).float()
    method = _method(config, spec)
    usable = stats is not None and stats.count > 0
    if stats is not None and not (torch.isfinite(stats.hessian).all() and torch.isfinite(stats.absmax).all()):
        raise NonFiniteError(f"{layer}: calibration statistics hold NaN/Inf")
    h_t = None
    if usable:
        h_t = spec.transform_hessian(normalized(stats.hessian_mean().to(dev), lora_a, config.lora_strength), params)
    q, used_grid, info, ran = rtn, grid, {}, "rtn"
    if method != "rtn":
        if h_t is None:
            notes.append(f"{method}: no calibration statistics for this layer; RTN used")
        else:
            try:
                q, used_grid, info = _round(method, w_t, h_t, grid, spec, params, config)
                ran = method
            except (SingularHessianError, NonFiniteError) as e:
                notes.append(f"{method}: {e.reason}; RTN used")
    err_rtn = output_error(w_t, rtn, h_t) if h_t is not None else None
    err = output_error(w_t, q, h_t) if h_t is not None else None
    if ran != "rtn" and err is not None and err_rtn is not None and err > err_rtn:
        notes.append(f"{ran} did not beat RTN on the calibration data ({err:.3g} vs {err_rtn:.3g}); RTN kept")
        q, used_grid, ran, err = rtn, grid, "rtn", err_rtn
    if not torch.isfinite(q).all():
        raise NonFiniteError(f"{layer}: {ran} produced NaN/Inf")
    tensors = dict(used_grid.encode(q))
    if params.get("input_scale"):
        if usable:
            tensors["input_scale"] = input_scale(stats, spec, config.input_scale_percentile)
        else:
            tensors["input_scale"] = torch.tensor(1.0, dtype=torch.float32)
            notes.append("input_scale: no calibration statistics for this layer; 1.0 written")
    out = OptimizedLayer(tensors, ran, notes, None, err_rtn, err, info)
    if config.bias_correction:
        if usable:
            w_deq = spec.dequantize(tensors, params, torch.float64)
            out.bias_delta = ((w32.double() - w_deq) @ stats.mean().to(dev)).float()
        else:
            notes.append("bias correction: no calibration statistics for this layer")
    return out
