"""Automatic precision, the pure parts: budgets, candidates from the registry, layer sensitivity against float64
references and the runtime's own kernels, the knapsack solver against brute force, the confidence bound quality
floors are planned on, and the planner."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest
import torch

from comfyquant.autoprec import (
    KEEP,
    AutoConfig,
    Budget,
    CandidatePolicy,
    Frontier,
    LayerSource,
    layer_sensitivity,
    parse_budget,
    plan_precision,
)
from comfyquant.autoprec.bound import lower_bound, t_quantile, t_two_sided
from comfyquant.autoprec.probe import cosine_of, item_values, psnr_of, with_margin
from comfyquant.autoprec.sensitivity import option_bytes
from comfyquant.calibration.stats import LayerStats
from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY, AffineFormat, get_format, quantize_weight
from comfyquant.io.comfy_meta import encoded_size
from comfyquant.runtime.kernels.dispatch import quant_linear


# ---- budgets --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "want"), [
    ("size=0.40", Budget(size=0.4)), ("size=40%", Budget(size=0.4)), ("psnr=45", Budget(psnr=45.0)),
    ("cosine=0.999", Budget(cosine=0.999)), ("sqnr=30", Budget(sqnr=30.0)),
    (" size=0.5 , PSNR=45 ", Budget(size=0.5, psnr=45.0)),
])
def test_budget_parses(text: str, want: Budget) -> None:
    assert parse_budget(text) == want
    assert parse_budget(parse_budget(text).describe()) == want


@pytest.mark.parametrize(("text", "needle"), [
    ("", "--budget is required"), ("size", "KIND=VALUE"), ("bytes=3", "KIND=VALUE"), ("size=abc", "not a number"),
    ("size=0", "> 0"), ("size=-1", "> 0"), ("cosine=1.5", "(0, 1]"), ("psnr=45,cosine=0.99", "one quality floor"),
    ("size=0.4,size=0.5", "given twice"), ("psnr=nan", "dB > 0"),
])
def test_budget_refuses(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=None) as e:
        parse_budget(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- candidates ----------------------------------------------------------------------------------------------
class _BlackwellOnly(AffineFormat):
    name = "test-bw-only"
    comfy_format = "test_bw_only"
    min_gpu = "blackwell"


def test_candidates_come_from_the_registry() -> None:
    bf16 = CandidatePolicy().formats_for(torch.bfloat16)
    stock = [f.name for f in REGISTRY.formats() if f.is_quantized and f.stock_comfy and f.min_gpu is None]
    assert [f.name for f in bf16] == stock  # no cast is narrower than bf16
    fp32 = [f.name for f in CandidatePolicy().formats_for(torch.float32)]
    assert fp32 == [*stock, "fp16", "bf16"]
    assert "int8-block" not in fp32
    assert "int4-rot" in fp32 and "nvfp4" not in fp32 and "mxfp8" not in fp32  # min_gpu "blackwell"
    assert {"nvfp4", "mxfp8"} <= {f.name for f in CandidatePolicy(target_gpu="blackwell").formats_for(torch.bfloat16)}
    assert "int8-block" in [f.name for f in CandidatePolicy(allow_comfyquant_formats=True).formats_for(torch.float32)]
    fmt = _BlackwellOnly()
    assert not CandidatePolicy().eligible(fmt)
    assert not CandidatePolicy(target_gpu="hopper").eligible(fmt)
    assert CandidatePolicy(target_gpu="blackwell").eligible(fmt)
    assert CandidatePolicy(formats=("int8", KEEP)).names() == ["int8", KEEP]
    with pytest.raises(UserError, match="--target-gpu"):
        CandidatePolicy(target_gpu="volta")


# ---- sensitivity ---------------------------------------------------------------------------------------------
def _stats(x: torch.Tensor, reservoir: int) -> LayerStats:
    s = LayerStats.empty(x.shape[1], reservoir)
    s.update(x, torch.Generator().manual_seed(0))
    return s


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=gen) * 0.05
    x = torch.randn(96, 64, generator=gen)
    x[:, 3] *= 20.0  # an outlier channel, as real activations have
    return w, x


def test_weight_error_is_the_exact_output_error(layer: tuple[torch.Tensor, torch.Tensor]) -> None:
    w, x = layer
    formats = CandidatePolicy().formats_for(torch.float32)
    sens = layer_sensitivity("l", w, _stats(x, 128), formats)
    assert sens.basis == "calibration"
    xd, wd = x.double(), w.double()
    power = float((xd @ wd.T).square().sum())
    for opt in sens.options:
        if opt.format == KEEP:
            assert opt.err == 0 and opt.nbytes == w.numel() * 4
            continue
        fmt = get_format(opt.format)
        deq = fmt.dequantize(fmt.quantize(w, opt.params), opt.params, torch.float64)
        want = float((xd @ (wd - deq).T).square().sum()) / power
        assert opt.weight_err == pytest.approx(want, rel=1e-9)
        if fmt.rotated:  # the same number in the format's basis: tr(E_t R^T H R E_t^T)
            h_t = fmt.transform_hessian(xd.T @ xd, opt.params)
            e_t = fmt.transform(wd, opt.params) - fmt.transform(deq, opt.params)
            assert float(((e_t @ h_t) * e_t).sum()) / power == pytest.approx(want, rel=1e-6)


def _kernel(fmt: Any, x: torch.Tensor, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    """The runtime's own kernel for the stored tensors: the CPU path, or for Blackwell-only formats the
    emulation of their native block-scaled GEMM (activations quantized as on SM >= 10)."""
    if fmt.min_gpu == "blackwell":
        from comfyquant.runtime.kernels import blockscaled

        ops = (blockscaled.nvfp4_operands(x, tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"])
               if fmt.name == "nvfp4" else blockscaled.mxfp8_operands(x, tensors["weight"], tensors["weight_scale"]))
        return blockscaled.emulate_scaled_mm(ops).float()
    scales, opts = fmt.kernel_args(tensors, params)
    return quant_linear(x, fmt.kernel_kind, tensors["weight"], scales, None, opts=opts, out_dtype=torch.float32)


@pytest.mark.cpu_int8
def test_activation_error_matches_the_runtime_kernels(layer: tuple[torch.Tensor, torch.Tensor]) -> None:
    """weight + activation error ~ the output error of the runtime's own kernels, for every candidate."""
    w, x = layer
    policy = CandidatePolicy(target_gpu="blackwell", allow_comfyquant_formats=True)
    sens = layer_sensitivity("l", w, _stats(x, 128), policy.formats_for(torch.float32), {"block_size": 16})
    ref = x.double() @ w.double().T
    checked = 0
    for opt in sens.options:
        fmt = get_format(opt.format) if opt.format != KEEP else None
        if fmt is None or not fmt.is_quantized or fmt.name.startswith("test-"):
            continue
        t = quantize_weight(w, fmt, **opt.params).tensors
        y = _kernel(fmt, x, t, dict(opt.params))
        got = float((y.double() - ref).square().sum() / ref.square().sum())
        assert opt.act_err > 0, fmt.name
        assert got == pytest.approx(opt.err, rel=0.25), fmt.name  # the two errors' cross terms are small
        checked += 1
    assert checked >= 8


@pytest.mark.cpu_int8
def test_quantize_input_is_the_kernels_activation_rounding() -> None:
    """For every registered format, fake-quantized activations times the stored weight equal the runtime's
    kernel (``_kernel``) to float rounding: the activation model automatic precision charges is the real one."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 64, generator=gen) * 4, torch.randn(16, 64, generator=gen)
    checked = 0
    for fmt in REGISTRY.formats():
        if not fmt.is_quantized or fmt.name.startswith("test-"):
            continue
        params = fmt.resolve((16, 64), {"block_size": 16})
        t = fmt.quantize(w, params)
        y = fmt.quantize_input(x, params) @ fmt.dequantize(t, params).T
        ref = _kernel(fmt, x, t, params)
        assert torch.allclose(y, ref, rtol=1e-4, atol=2e-3 * float(ref.abs().max())), fmt.name
        checked += 1
    assert checked >= 8


def test_bytes_are_the_stored_bytes() -> None:
    w = torch.randn(32, 64)
    for fmt in CandidatePolicy(allow_comfyquant_formats=True).formats_for(torch.float32):
        q = quantize_weight(w, fmt, block_size=16)
        stored = sum(t.numel() * t.element_size() for t in q.tensors.values())
        if q.comfy_quant is not None:
            stored += encoded_size(q.comfy_quant)
        assert option_bytes(fmt, (32, 64), q.params) == stored, fmt.name


def test_without_statistics_the_error_is_the_weight_error() -> None:
    w = torch.randn(16, 32, dtype=torch.float64).float()
    sens = layer_sensitivity("l", w, None, [get_format("int8")])
    opt = sens.option("int8")
    deq = get_format("int8").dequantize(get_format("int8").quantize(w, {}), {}, torch.float64)
    assert opt is not None and opt.act_err == 0
    assert opt.weight_err == pytest.approx(float((w.double() - deq).square().sum() / w.double().square().sum()))
    assert sens.basis.startswith("weight only")


# ---- solver ----------------------------------------------------------------------------------------------------
def _instance(rng: random.Random, layers: int, options: int) -> tuple[list[list[int]], list[list[float]]]:
    nbytes = [[rng.randint(1, 40) for _ in range(options)] for _ in range(layers)]
    cost = [[rng.random() for _ in range(options)] for _ in range(layers)]
    return nbytes, cost


def _brute(nbytes: list[list[int]], cost: list[list[float]], budget: int) -> float:
    best = math.inf
    for combo in itertools.product(*[range(len(b)) for b in nbytes]):
        if sum(nbytes[i][j] for i, j in enumerate(combo)) <= budget:
            best = min(best, sum(cost[i][j] for i, j in enumerate(combo)))
    return best


def test_frontier_is_exact_on_a_unit_grid() -> None:
    rng = random.Random(0)
    for _ in range(12):
        nbytes, cost = _instance(rng, 5, 3)
        fr = Frontier(nbytes, cost)
        assert fr.unit == 1
        for budget in range(fr.min_bytes - 1, fr.max_bytes + 2, 7):
            plan = fr.plan(budget)
            want = _brute(nbytes, cost, budget)
            if want == math.inf:
                assert plan is None
                continue
            assert plan is not None and fr.total_bytes(plan) <= budget
            assert fr.total_cost(plan) == pytest.approx(want)


def test_frontier_on_a_coarse_grid_stays_within_budget() -> None:
    rng = random.Random(1)
    nbytes, cost = _instance(rng, 6, 4)
    nbytes = [[b * 1000 + rng.randint(0, 999) for b in row] for row in nbytes]
    fr = Frontier(nbytes, cost, resolution=50)
    assert fr.unit > 1
    for budget in range(fr.min_bytes, fr.max_bytes, 9973):
        plan = fr.plan(budget)
        assert plan is not None and fr.total_bytes(plan) <= budget
        assert fr.total_cost(plan) <= _brute(nbytes, cost, budget - fr.unit * 6) + 1e-12


def test_smallest_plan_meeting_a_floor_is_the_fewest_bytes() -> None:
    rng = random.Random(2)
    for _ in range(10):
        nbytes, cost = _instance(rng, 5, 3)
        fr = Frontier(nbytes, cost)
        limit = rng.uniform(0.5, 2.5)
        plan = fr.smallest_meeting(lambda c, fr=fr, limit=limit: fr.total_cost(c) <= limit)
        combos = [c for c in itertools.product(*[range(3)] * 5)
                  if sum(cost[i][j] for i, j in enumerate(c)) <= limit]
        if not combos:
            assert plan is None
            continue
        fewest = min(sum(nbytes[i][j] for i, j in enumerate(c)) for c in combos)
        assert plan is not None and fr.total_cost(plan) <= limit
        assert fr.total_bytes(plan) == fewest


# ---- confidence bound ----------------------------------------------------------------------------------------
# one-sided t quantiles as printed in statistics tables (6 decimals; scipy.stats.t.ppf agrees)
T_TABLE = [(0.95, 1, 6.313752), (0.95, 2, 2.919986), (0.95, 9, 1.833113), (0.95, 19, 1.729133),
           (0.95, 29, 1.699127), (0.975, 10, 2.228139), (0.99, 5, 3.364930), (0.995, 20, 2.845340),
           (0.9, 120, 1.288646), (0.999, 3, 10.214532)]


@pytest.mark.parametrize(("p", "dof", "want"), T_TABLE)
def test_t_quantile_matches_the_table(p: float, dof: int, want: float) -> None:
    assert t_quantile(p, dof) == pytest.approx(want, abs=1e-6)
    assert t_two_sided(want, dof) == pytest.approx(2 * p - 1, abs=1e-6)


def test_t_distribution_closed_forms() -> None:
    """dof 1 is Cauchy, dof 2 has ``t / sqrt(2 + t^2)``; large dof: the normal's quantile plus the first
    Cornish-Fisher term ``(z^3 + z) / (4 dof)``."""
    for t in (0.1, 1.0, 3.0, 40.0):
        assert t_two_sided(t, 1) == pytest.approx(2 * math.atan(t) / math.pi, rel=1e-14)
        assert t_two_sided(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-14)
    assert t_quantile(0.5, 7) == 0.0
    z = 1.6448536269514722
    assert t_quantile(0.95, 5000) == pytest.approx(z + (z**3 + z) / 20000, abs=1e-7)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)
    with pytest.raises(ValueError):
        t_two_sided(1.0, 0)


def test_lower_bound_against_a_float64_reference() -> None:
    import numpy as np

    vals = [48.48, 48.74, 48.9, 47.35, 48.47, 46.79, 50.63, 50.01, 47.02, 50.23]
    b = lower_bound(vals, 0.95)
    a = np.asarray(vals, dtype=np.float64)
    want = a.mean() - 1.833113 * a.std(ddof=1) / math.sqrt(len(a))
    assert (b.n, b.t) == (10, pytest.approx(1.833113, abs=1e-6))
    assert b.mean == pytest.approx(a.mean(), rel=1e-15) and b.sd == pytest.approx(a.std(ddof=1), rel=1e-13)
    assert b.lower == pytest.approx(want, abs=1e-5)
    one = lower_bound([47.5], 0.95)
    assert one.lower == 47.5 and one.sd == 0.0  # no spread to estimate from one item
    with pytest.raises(ValueError):
        lower_bound([], 0.95)


def test_bound_headroom_shrinks_with_items_and_grows_with_spread() -> None:
    """Same spread, more items: less headroom (``t_{n-1} / sqrt(n)`` falls); twice the spread: twice the
    headroom; a higher confidence: more."""
    heads = []
    for k in range(1, 16):
        vals = [40.0, 42.0] * k  # sample sd sqrt(n / (n - 1)): about constant
        b = lower_bound(vals, 0.95)
        heads.append(b.mean - b.lower)
        wide = lower_bound([40.0 + 2 * (v - 40.0) for v in vals], 0.95)
        assert wide.mean - wide.lower == pytest.approx(2 * heads[-1], rel=1e-12)
        assert lower_bound(vals, 0.99).lower < b.lower < lower_bound(vals, 0.5).lower == b.mean
    assert all(a > b for a, b in itertools.pairwise(heads))
    assert heads[0] > 10 * heads[-1]  # 2 items: t 6.31; 30 items: t 1.70 / sqrt(30)


# ---- planner --------------------------------------------------------------------------------------------------
def _layers(n: int = 4) -> list[LayerSource]:
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(32, 64, generator=gen).to(torch.bfloat16) * (1 + i) for i in range(n)]
    return [LayerSource(f"l{i}", (32, 64), torch.bfloat16, (lambda w=w: w)) for i, w in enumerate(ws)]


def test_plan_meets_a_size_budget_and_says_why() -> None:
    layers = _layers()
    bytes_in = sum(x.nbytes for x in layers) + 1000
    plan = plan_precision(layers, Budget(size=0.7), CandidatePolicy(), bytes_in=bytes_in, fixed_bytes=1000)
    assert plan.bytes_out <= 0.7 * bytes_in
    assert plan.size_ratio == plan.bytes_out / bytes_in
    assert any(x.format == KEEP for x in plan.layers) and any(x.format != KEEP for x in plan.layers)
    assert all("of its bytes" in x.reason for x in plan.layers)
    assert "weight errors only" in " ".join(plan.notes)
    assert plan.summary()["layers"] == plan.formats()


def test_plan_refuses_an_impossible_size_with_the_smallest() -> None:
    layers = _layers()
    bytes_in = sum(x.nbytes for x in layers)
    with pytest.raises(UserError) as e:
        plan_precision(layers, Budget(size=0.2), CandidatePolicy(), bytes_in=bytes_in, fixed_bytes=0)
    one = min(option_bytes(f, (32, 64), f.resolve((32, 64))) for f in CandidatePolicy().formats_for(torch.bfloat16))
    smallest = one * len(layers) / bytes_in
    assert f"{smallest:.4f}" in str(e.value) and "\n" not in str(e.value)


def test_plan_meets_a_per_layer_sqnr_floor() -> None:
    layers = _layers()
    bytes_in = sum(x.nbytes for x in layers)
    loose = plan_precision(layers, Budget(sqnr=30), CandidatePolicy(), bytes_in=bytes_in, fixed_bytes=0)
    tight = plan_precision(layers, Budget(sqnr=45), CandidatePolicy(), bytes_in=bytes_in, fixed_bytes=0)
    assert all(x.sqnr_db >= 30 for x in loose.layers) and all(x.sqnr_db >= 45 for x in tight.layers)
    assert loose.bytes_out < tight.bytes_out
    with pytest.raises(UserError, match="needs size"):
        plan_precision(layers, Budget(sqnr=45, size=0.6), CandidatePolicy(), bytes_in=bytes_in, fixed_bytes=0)


def _tiny_probe(items: int) -> Any:
    """A psnr workload on a small 8-layer MLP whose ``items`` inputs differ in scale (their PSNRs spread ~2 dB)."""
    from comfyquant.eval.autoprobe import ModelProbe

    gen = torch.Generator().manual_seed(5)
    mods: list[torch.nn.Module] = [torch.nn.Linear(64, 128)]
    for _ in range(6):
        mods += [torch.nn.GELU(), torch.nn.Linear(128, 128)]
    model = torch.nn.Sequential(*mods, torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[-1])))
    xgen = torch.Generator().manual_seed(6)
    x = torch.randn(items, 8, 64, generator=xgen) * torch.exp(0.25 * torch.randn(items, 1, 1, generator=xgen)) * 0.3
    return ModelProbe("tiny", "psnr", model, lambda m: m(x),
                      lambda a, b: (a.double() - b.double()).square().flatten(1).mean(1), psnr_of, lambda p: {})


def test_fewer_calibration_items_plan_more_headroom() -> None:
    """A psnr floor holds on the 95% lower confidence bound of the calibration items' mean: with 3 items the
    plan keeps several dB more headroom over the floor (t 2.92 / sqrt(3)) than with 30 (t 1.70 / sqrt(30)),
    and takes more bytes for it."""
    out = {}
    for n in (3, 30):
        probe = _tiny_probe(n)
        layers = [LayerSource(k, tuple(m.weight.shape), torch.float32, (lambda m=m: m.weight.detach()))
                  for k, m in probe.model.named_modules() if isinstance(m, torch.nn.Linear)]
        plan = plan_precision(layers, Budget(psnr=50), CandidatePolicy(), bytes_in=sum(x.nbytes for x in layers),
                              fixed_bytes=0, probe=probe, config=AutoConfig())
        f = plan.floor
        assert (f["items"], f["confidence"], f["floor"]) == (n, 0.95, 50.0 + f["margin_db"])
        assert f["measured_bound"] >= f["floor"] and f["predicted_bound"] >= f["floor"]
        assert f["measured_mean"] == pytest.approx(plan.measured["psnr"])
        assert f["measured_mean"] - f["measured_bound"] == pytest.approx(
            t_quantile(0.95, n - 1) * f["measured_sd"] / math.sqrt(n))
        assert f"n {n} calibration items" in plan.to_text()
        out[n] = (f["measured_mean"] - 50.0, plan.bytes_out)
    assert out[3][0] > out[30][0] + 2.0, out
    assert out[3][1] > out[30][1], out


def test_auto_config_refuses_a_meaningless_bound() -> None:
    with pytest.raises(ValueError, match="confidence"):
        AutoConfig(confidence=1.0)
    with pytest.raises(ValueError, match="confidence"):
        AutoConfig(confidence=0.3)
    with pytest.raises(ValueError, match="margin_db"):
        AutoConfig(margin_db=-0.5)
    with pytest.raises(ValueError, match="margin_db"):
        AutoConfig(margin_db=math.inf)


def test_quality_floors_need_a_workload() -> None:
    with pytest.raises(UserError, match="needs a workload"):
        plan_precision(_layers(), Budget(psnr=40), CandidatePolicy(), bytes_in=10**6, fixed_bytes=0,
                       config=AutoConfig())


def test_metrics_of_distortions() -> None:
    assert psnr_of(torch.tensor([4e-4, 0.0])) == pytest.approx((40.0 + 99.0) / 2)
    a = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(a + 0.05 * torch.randn(8, 16, dtype=torch.float64), dim=1)
    d = (a - b).square().sum(1)
    assert cosine_of(d) == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b).mean()))
    assert with_margin("psnr", 45, 0.5) == 45.5

    class _Psnr:
        quality = staticmethod(psnr_of)

    d = torch.tensor([4e-4, 4e-6, 0.0], dtype=torch.float64)
    assert item_values(_Psnr(), d) == pytest.approx([40.0, 60.0, 99.0])  # type: ignore[arg-type]
    assert sum(item_values(_Psnr(), d)) / 3 == pytest.approx(psnr_of(d))  # type: ignore[arg-type]
    assert 1 - with_margin("cosine", 0.999, 10.0) == pytest.approx(1e-4)
