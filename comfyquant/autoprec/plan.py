"""The automatic-precision plan: one format per layer to meet a budget, and why.

:func:`plan_precision` measures every layer's options (``sensitivity``), weighs them by how far each layer's
error propagates (a :class:`~comfyquant.autoprec.probe.Probe` when the model has a workload, else equal
weights), solves for the budget (``solver``), and with a probe checks the whole plan on the calibration
inputs, re-solving with the measured correction when a quality floor is missed there. A quality floor is met
on a lower confidence bound of the calibration items' mean metric (``bound``), plus ``AutoConfig.margin_db``,
so its headroom grows with the items' spread and with fewer items. Callers (the converter, ``quantize_``) turn
the result into their ordinary per-layer plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from comfyquant.autoprec.bound import MeanBound, lower_bound
from comfyquant.autoprec.budget import Budget
from comfyquant.autoprec.candidates import KEEP, CandidatePolicy, layer_params
from comfyquant.autoprec.probe import Probe, item_values, measure_gains, with_margin
from comfyquant.autoprec.result import AutoPlan, LayerChoice
from comfyquant.autoprec.sensitivity import LayerSensitivity, Option, layer_sensitivity, option_bytes
from comfyquant.autoprec.solver import Frontier
from comfyquant.calibration.stats import LayerStats
from comfyquant.errors import UserError
from comfyquant.formats import get_format
from comfyquant.progress import QUIET, Progress

AUTO = "auto"


@dataclass(frozen=True)
class LayerSource:
    """A layer automatic precision chooses for: name, ``[N, K]``, stored dtype, and how to read its weight."""

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class AutoConfig:
    """``confidence``: a quality floor must hold on this one-sided lower confidence bound of the calibration
    items' mean metric (``bound.lower_bound``: headroom from their spread and number); ``margin_db``: fixed
    distortion headroom on top (what the bound cannot see: fake quantization vs the loader, inputs unlike the
    calibration's); ``rounds``: re-solves after a floor is missed on the calibration inputs; ``refine``:
    bisection steps toward a smaller plan once one meets it; ``device``: where the sensitivity math runs;
    ``resolution``: the solver's byte grid; ``progress``: where the per-layer work reports itself."""

    confidence: float = 0.95
    # 0.5 dB on top of the bound (before: 1.0 dB on the mean, no bound). The digits DiT's 10 calibration samples
    # read 0.1-1.1 dB easier than 300 samples of another seed under four uniform formats, a bias their spread
    # does not show; with 0.25 dB the psnr=50 plans read 49.8-49.9 on 30 held-out samples, with 0.5 every
    # floor of 45, 47 and 50 held on 10 and on 20 calibration samples (docs/AUTO_PRECISION.md)
    margin_db: float = 0.5
    rounds: int = 3
    refine: int = 3
    device: str | None = None
    resolution: int = 1 << 16
    progress: Progress = QUIET

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"AutoConfig.confidence must be in [0.5, 1), got {self.confidence}")
        if not 0.0 <= self.margin_db < math.inf:
            raise ValueError(f"AutoConfig.margin_db must be a finite number of dB >= 0, got {self.margin_db}")


def measure_layers(layers: Sequence[LayerSource], policy: CandidatePolicy,
                   stats_of: Callable[[str], LayerStats | None], config: AutoConfig) -> list[LayerSensitivity]:
    """Every layer's candidate options, one weight (and its statistics) in memory at a time."""
    out = []
    with config.progress.task("auto precision: layer sensitivity", len(layers), "layers") as bar:
        for src in layers:
            w = src.load()
            out.append(layer_sensitivity(src.name, w, stats_of(src.name), policy.formats_for(src.dtype),
                                         policy.layer_options, config.device))
            del w
            bar.update(1)
    return out


def plan_precision(layers: Sequence[LayerSource], budget: Budget, policy: CandidatePolicy, *, bytes_in: int,
                   fixed_bytes: int, stats_of: Callable[[str], LayerStats | None] | None = None,
                   probe: Probe | None = None, config: AutoConfig | None = None) -> AutoPlan:
    """Choose a format for every layer of ``layers`` so that the output meets ``budget``.

    ``bytes_in`` is the whole input's size and ``fixed_bytes`` what the rest of the output takes. Statistics
    come from ``stats_of`` (a calibration), else from the probe's reference run, else none (weight error
    only). A budget no plan meets raises UserError naming the closest achievable value (before anything is
    written).
    """
    config = config or AutoConfig()
    quality = budget.quality
    if quality is not None and quality[0] in ("psnr", "cosine"):
        if probe is None:
            raise UserError(f"--budget {quality[0]}=... needs a workload to measure it on (comfyquant has the "
                            "digits DiT for psnr and MiniLM for cosine); use sqnr=DB (every layer's output SQNR) "
                            "or a size budget for other models")
        if probe.metric != quality[0]:
            raise UserError(f"the {probe.name} workload measures {probe.metric}, not {quality[0]}: "
                            f"use --budget {probe.metric}=...")
    if not layers:
        raise UserError("--format auto: the model has no linear layer to choose a format for")
    _check_size_floor(layers, budget, policy, bytes_in, fixed_bytes)
    notes: list[str] = []
    if stats_of is None and probe is not None:
        stats = probe.statistics()
        stats_of = stats.get
        notes.append(f"calibration: a short run of the {probe.name} workload on its calibration inputs")
    if stats_of is None:
        stats_of = _no_stats
        notes.append("no calibration statistics: errors are weight errors only (activation rounding and the "
                     "inputs' directions not seen); give --calibration FILE for better choices")
    sens = measure_layers(layers, policy, stats_of, config)
    weight_only = [s.name for s in sens if not s.basis.startswith("calibration")]
    if weight_only and stats_of is not _no_stats:
        notes.append(f"{len(weight_only)} layer(s) without calibration statistics, planned on weight error: "
                     + ", ".join(weight_only[:5]) + (" ..." if len(weight_only) > 5 else ""))
    gains = None
    if probe is not None:
        with config.progress.task(f"auto precision: {probe.name} probes", len(sens), "layers") as bar:
            gains = measure_gains(probe, sens, bar)
    plan = AutoPlan(budget, policy.describe(), [], bytes_in, fixed_bytes, probe.metric if probe else None,
                    notes=notes)
    choice = _solve(sens, gains, budget, plan, probe, config)
    _fill_plan(plan, sens, gains, choice)
    if probe is not None:
        _verify(plan, sens, gains, choice, budget, probe, config)
    return plan


def _no_stats(name: str) -> LayerStats | None:
    return None


def smallest_bytes(src: LayerSource, policy: CandidatePolicy) -> int:
    """The fewest bytes any candidate stores this layer in (from shapes alone)."""
    best = src.nbytes
    for fmt in policy.formats_for(src.dtype):
        params = layer_params(fmt, src.shape, policy.layer_options)
        if params is not None:
            best = min(best, option_bytes(fmt, src.shape, params))
    return best


def _check_size_floor(layers: Sequence[LayerSource], budget: Budget, policy: CandidatePolicy, bytes_in: int,
                      fixed_bytes: int) -> None:
    """Refuse a size below the smallest plan before any weight is read."""
    if budget.size is None:
        return
    smallest = fixed_bytes + sum(smallest_bytes(x, policy) for x in layers)
    if smallest > budget.size * bytes_in:
        raise UserError(f"--budget size={budget.size:g} is below what this model allows: the smallest output is "
                        f"{smallest / bytes_in:.4f} of the input (every layer in its smallest candidate of "
                        f"{policy.describe()}; {fixed_bytes} bytes of other tensors kept as they are)")


def _vectors(sens: Sequence[LayerSensitivity], gains: list[torch.Tensor] | None) -> list[list[torch.Tensor]]:
    """Per layer and option, the predicted per-item distortion (probe) or the relative error (no probe)."""
    if gains is None:
        return [[torch.tensor([o.err], dtype=torch.float64) for o in s.options] for s in sens]
    return [[g * o.err for o in s.options] for s, g in zip(sens, gains, strict=True)]


def _predict(vecs: list[list[torch.Tensor]], choice: Sequence[int]) -> torch.Tensor:
    return torch.stack([v[j] for v, j in zip(vecs, choice, strict=True)]).sum(0)


def _solve(sens: list[LayerSensitivity], gains: list[torch.Tensor] | None, budget: Budget, plan: AutoPlan,
           probe: Probe | None, config: AutoConfig) -> list[int]:
    quality = budget.quality
    nbytes = [[o.nbytes for o in s.options] for s in sens]
    cap = None if budget.size is None else math.floor(budget.size * plan.bytes_in) - plan.fixed_bytes
    if quality is not None and quality[0] == "sqnr":
        choice = _per_layer_floor(sens, quality[1])
        _check_cap(plan, sens, choice, cap, f"sqnr >= {quality[1]:g} dB on every layer")
        return choice
    vecs = _vectors(sens, gains)
    cost = [[float(v.mean()) for v in vs] for vs in vecs]
    frontier = Frontier(nbytes, cost, config.resolution)
    if quality is None:
        assert cap is not None
        choice = frontier.plan(cap)
        if choice is None:
            smallest = (frontier.min_bytes + plan.fixed_bytes) / plan.bytes_in
            raise UserError(f"--budget size={budget.size:g} is below what this model allows: the smallest output "
                            f"is {smallest:.4f} of the input (every chosen layer in its smallest candidate: "
                            f"{plan.candidates}; {plan.fixed_bytes} bytes of other tensors kept as they are)")
        return choice
    assert probe is not None
    floor = with_margin(quality[0], quality[1], config.margin_db)
    choice = frontier.smallest_meeting(lambda c: _bound(probe, _predict(vecs, c), config).lower >= floor)
    if choice is None:  # not even everything kept: cannot happen with exact keeps, kept for safety
        best = _bound(probe, _predict(vecs, frontier.plan(frontier.max_bytes) or frontier.smallest()), config)
        raise UserError(f"--budget {quality[0]}={quality[1]:g}: no plan reaches it ({_how(config)}); the best "
                        f"predicted is {best.mean:.6g}, bound {best.lower:.6g}")
    if cap is not None and frontier.total_bytes(choice) > cap:
        within = frontier.plan(cap)
        need = (frontier.total_bytes(choice) + plan.fixed_bytes) / plan.bytes_in
        reach = None if within is None else _bound(probe, _predict(vecs, within), config)
        got = "no plan fits" if reach is None else \
            f"the best plan within it reaches {quality[0]} {reach.mean:.6g} (predicted; bound {reach.lower:.6g})"
        raise UserError(f"--budget {budget.describe()}: no plan of size <= {budget.size:g} meets "
                        f"{quality[0]} >= {quality[1]:g} ({_how(config)}): {got}; "
                        f"{quality[0]} {quality[1]:g} needs size {need:.4f}")
    return choice


def _bound(probe: Probe, d: torch.Tensor, config: AutoConfig) -> MeanBound:
    """The lower confidence bound of the metric's mean from per-item distortions ``d``."""
    return lower_bound(item_values(probe, d), config.confidence)


def _how(config: AutoConfig) -> str:
    return (f"planned on its {config.confidence * 100:g}% lower confidence bound over the calibration items, with "
            f"{config.margin_db:g} dB margin")


def _per_layer_floor(sens: list[LayerSensitivity], floor_db: float) -> list[int]:
    """The smallest option of every layer whose output SQNR meets ``floor_db`` (keep always does)."""
    limit = 10.0 ** (-floor_db / 10.0)
    out = []
    for s in sens:
        ok = [(o.nbytes, o.err, j) for j, o in enumerate(s.options) if o.err <= limit]
        out.append(min(ok)[2])
    return out


def _check_cap(plan: AutoPlan, sens: list[LayerSensitivity], choice: list[int], cap: int | None, what: str) -> None:
    if cap is None:
        return
    used = sum(s.options[j].nbytes for s, j in zip(sens, choice, strict=True))
    if used > cap:
        need = (used + plan.fixed_bytes) / plan.bytes_in
        raise UserError(f"--budget {plan.budget.describe()}: {what} needs size {need:.4f}, more than "
                        f"size={plan.budget.size:g}")


def _fill_plan(plan: AutoPlan, sens: list[LayerSensitivity], gains: list[torch.Tensor] | None,
               choice: list[int]) -> None:
    plan.layers = []
    for i, (s, j) in enumerate(zip(sens, choice, strict=True)):
        o = s.options[j]
        g = float(gains[i].mean()) if gains is not None else None
        plan.layers.append(LayerChoice(s.name, s.shape, o.format, dict(o.params), o.nbytes, s.bytes_in,
                                       o.weight_err, o.act_err, g, s.basis, _reason(s, o, g)))
    plan.predicted = _predicted(plan)


def _reason(s: LayerSensitivity, o: Option, gain: float | None) -> str:
    share = o.nbytes / s.bytes_in if s.bytes_in else 1.0
    what = "kept in high precision" if o.format == KEEP else o.format
    err = "exact" if o.err <= 0 else f"output SQNR {o.sqnr_db:.1f} dB"
    if o.format != KEEP and o.act_err > 0:
        err += f" (weights {_db(o.weight_err)}, activations {_db(o.act_err)})"
    others = ", ".join(f"{x.format} {_db(x.err)}" for x in s.options if x is not o and x.format != KEEP)
    g = "" if gain is None else f"; propagation gain {gain:.3g}"
    return f"{what}, {err}, {share:.0%} of its bytes{g}; other candidates: {others or 'none'}"


def _db(e: float) -> str:
    return "exact" if e <= 0 else f"{-10 * math.log10(e):.1f} dB"


def _predicted(plan: AutoPlan) -> dict[str, Any]:
    sq = [x.sqnr_db for x in plan.layers]
    finite = [v for v in sq if math.isfinite(v)]
    out: dict[str, Any] = {"size": round(plan.size_ratio, 6)}
    if finite:
        out["layer_output_sqnr_db_min"] = round(min(finite), 3)
        out["layer_output_sqnr_db_mean"] = round(sum(finite) / len(finite), 3)
    return out


def _verify(plan: AutoPlan, sens: list[LayerSensitivity], gains: list[torch.Tensor] | None, choice: list[int],
            budget: Budget, probe: Probe, config: AutoConfig) -> None:
    """Measure the whole plan on the calibration inputs (every chosen layer fake-quantized at once).

    The floor is on the measured items' lower confidence bound (as the solve's was on the predicted items').
    A quality floor missed there means the layers' errors did not add up as predicted (they can add
    coherently): the gains are multiplied by the measured / predicted ratio per item and the plan re-solved,
    up to ``config.rounds`` times; once a plan meets the floor, ``config.refine`` bisection steps between the
    last failing and the first passing correction look for a smaller plan that still meets it."""
    assert gains is not None
    quality = budget.quality
    floor = None if quality is None or quality[0] == "sqnr" else with_margin(quality[0], quality[1],
                                                                           config.margin_db)

    def meets(meas: torch.Tensor) -> bool:
        return floor is None or _bound(probe, meas, config).lower >= floor

    def run(corr: torch.Tensor, fixed: list[int] | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        g = [x * corr for x in gains]
        c = fixed if fixed is not None else _solve(sens, g, budget, plan, probe, config)
        pred = _predict(_vectors(sens, g), c)
        meas = probe.distortion(_assignment(sens, c)).double()
        size = (plan.fixed_bytes + sum(x.options[j].nbytes for x, j in zip(sens, c, strict=True))) / plan.bytes_in
        plan.rounds.append({"round": len(plan.rounds), "size": round(size, 6),
                            f"{probe.metric}_predicted": probe.quality(pred),
                            f"{probe.metric}_measured": probe.quality(meas),
                            f"{probe.metric}_measured_bound": _bound(probe, meas, config).lower})
        return c, pred, meas

    def finish(c: list[int], corr: torch.Tensor, pred: torch.Tensor, meas: torch.Tensor) -> None:
        _fill_plan(plan, sens, [x * corr for x in gains], c)
        plan.predicted[probe.metric] = probe.quality(pred)
        plan.measured = {probe.metric: probe.quality(meas), "items": int(meas.numel())}
        if floor is not None and quality is not None:
            plan.floor = _floor_report(quality, floor, config, _bound(probe, pred, config),
                                       _bound(probe, meas, config))

    corr = torch.ones_like(gains[0])
    c, pred, meas = run(corr, choice)
    if meets(meas):
        finish(c, corr, pred, meas)
        return
    failing = corr
    best = None
    for _ in range(config.rounds):
        corr = corr * torch.where(pred > 0, meas / pred.clamp_min(1e-300), torch.ones_like(pred)).clamp_min(1.0)
        c, pred, meas = run(corr)
        if meets(meas):
            best = (c, corr, pred, meas)
            break
        failing = corr
    if best is None:
        finish(c, corr, pred, meas)
        plan.notes.append(f"{probe.metric} on the calibration inputs {probe.quality(meas):.6g} (lower bound "
                          f"{_bound(probe, meas, config).lower:.6g}) stays below the planned floor {floor:.6g} "
                          f"after {config.rounds} corrections")
        return
    passing = best[1]
    for _ in range(config.refine):
        mid = ((failing.log() + passing.log()) / 2).exp()
        c, pred, meas = run(mid)
        if meets(meas):
            passing = mid
            if _bytes(sens, c) < _bytes(sens, best[0]):
                best = (c, mid, pred, meas)
        else:
            failing = mid
    finish(*best)


def _floor_report(quality: tuple[str, float], floor: float, config: AutoConfig, pred: MeanBound,
                  meas: MeanBound) -> dict[str, Any]:
    """What a quality floor was planned on: target, margin, confidence, items, and both bounds."""
    return {"metric": quality[0], "target": quality[1], "margin_db": config.margin_db, "floor": floor,
            "confidence": config.confidence, "items": meas.n, "t": meas.t,
            "predicted_mean": pred.mean, "predicted_sd": pred.sd, "predicted_bound": pred.lower,
            "measured_mean": meas.mean, "measured_sd": meas.sd, "measured_bound": meas.lower}


def _bytes(sens: Sequence[LayerSensitivity], choice: Sequence[int]) -> int:
    return sum(s.options[j].nbytes for s, j in zip(sens, choice, strict=True))


def _assignment(sens: Iterable[LayerSensitivity], choice: Sequence[int]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for s, j in zip(sens, choice, strict=True):
        o = s.options[j]
        if o.format != KEEP:
            out[s.name] = (get_format(o.format), o.params)
    return out
