"""The rounding optimizers against float64 references, for every registered format through the registry."""

from __future__ import annotations

import pytest
import torch

from comfyquant.calibration.stats import LayerStats
from comfyquant.formats import REGISTRY, AffineFormat
from comfyquant.optimize.config import LearnedConfig, OptimizerConfig
from comfyquant.optimize.driver import optimize
from comfyquant.optimize.gptq import gptq_round
from comfyquant.optimize.hessian import NonFiniteError, damped_inverse_factor, normalized, output_error
from comfyquant.optimize.learned import grid_neighbors, learned_round
from comfyquant.optimize.quip import Incoherence, quip_folded

N, K = 32, 64
FORMATS = [f for f in REGISTRY.formats() if isinstance(f, AffineFormat) and f.is_quantized]


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, 5] *= 15
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)
    x = torch.randn(2048, K, generator=g) @ mix
    x[:, :3] *= 10  # outlier input channels
    s = LayerStats.empty(K, 64)
    s.update(x, g)
    return w, x, s


def _params(fmt: AffineFormat) -> dict:
    return fmt.resolve((N, K), {"block_size": 16, "convrot_groupsize": 16})


def obs_reference(w: torch.Tensor, h: torch.Tensor, quant) -> torch.Tensor:
    """Optimal Brain Quantization in float64, the textbook way: quantize column j, update the remaining
    columns by ``-e_j H^-1[j, rest] / H^-1[j, j]``, remove j from the inverse (no Cholesky, no blocks)."""
    w = w.double().clone()
    hinv = torch.linalg.inv(h.double())
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = quant(w[:, j:j + 1], j)[:, 0]
        e = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1:] -= e[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_gptq_matches_obs_reference_on_every_format(fmt, layer):
    w, _, s = layer
    params = _params(fmt)
    w_t = fmt.transform(w, params)
    h = fmt.transform_hessian(normalized(s.hessian_mean()), params) + 0.01 * torch.eye(K, dtype=torch.float64)
    grid = fmt.grid(w_t, params)
    u, _ = damped_inverse_factor(h, 1e-12, 0)
    q = gptq_round(w_t, u, grid, block=16)
    ref = obs_reference(w_t, h, lambda col, j: grid.fake_quant(col.float(), slice(j, j + 1)).double())
    assert (q.double() != ref).float().mean() < 0.01  # float32 vs float64: a few ties may round apart
    assert torch.equal(grid.fake_quant(q), q)  # on the grid
    assert output_error(w_t, q, h) < 0.5 * output_error(w_t, grid.fake_quant(w_t), h)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_driver_every_method_every_format(fmt, layer):
    w, x, s = layer
    params = _params(fmt)
    for method in ("gptq", "learned", "quip"):
        cfg = OptimizerConfig(method=method, learned=LearnedConfig(iters=60), bias_correction=True)
        res = optimize("l", w, fmt, params, s, cfg)
        assert res.error is not None and res.error <= res.error_rtn
        deq = fmt.dequantize(res.tensors, params, torch.float64)
        assert deq.shape == (N, K) and torch.isfinite(deq).all()
        if method == "gptq":
            assert res.method == "gptq" and res.gain_db > 1.0
        # bias correction: the mean output error on the calibration inputs becomes zero
        y_err = (x.double() @ (w.double() - deq).T).mean(0)
        torch.testing.assert_close(res.bias_delta.double(), y_err, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["int8", "fp8", "int8-block"])
def test_grid_neighbors_bracket_and_learned_rounding(name, layer):
    w, _, s = layer
    fmt = REGISTRY.get(name)
    params = _params(fmt)
    grid = fmt.grid(w, params)
    lo, hi = grid_neighbors(w, grid)
    assert torch.equal(grid.fake_quant(lo), lo) and torch.equal(grid.fake_quant(hi), hi)
    tol = 1e-6 * w.abs().max()
    assert bool((lo <= w + tol).all() and (hi >= w - tol).all())
    nearest = grid.fake_quant(w)
    assert bool(((nearest == lo) | (nearest == hi)).all())
    h = normalized(s.hessian_mean())
    q, info = learned_round(w, h, grid, LearnedConfig(iters=60))
    assert bool(((q == lo) | (q == hi)).all())
    assert info["hard_loss_vs_rtn"] < 1.0


def test_quip_incoherence_and_storage(layer):
    w, _, s = layer
    inc = Incoherence.random(K, torch.Generator().manual_seed(1))
    x = torch.randn(3, K, dtype=torch.float64)
    torch.testing.assert_close(inc.invert(inc.apply(x)), x)
    torch.testing.assert_close(inc.apply(x).norm(dim=1), x.norm(dim=1))
    fmt = REGISTRY.get("int8")
    h = normalized(s.hessian_mean())
    q, grid = quip_folded(w, h, fmt, {}, damp=0.01, retries=2, block=16, seed=0)
    assert torch.equal(grid.fake_quant(q), q)
    rot = optimize("l", w, "int8-rot", _params(REGISTRY.get("int8-rot")), s, OptimizerConfig(method="quip"))
    assert rot.method == "quip-convrot" and rot.gain_db > 1.0
    with pytest.raises(Exception, match="needs a rotated format"):
        optimize("l", w, "int8", {}, s, OptimizerConfig(method="quip", quip_storage="convrot"))


def test_fallbacks_are_reported(layer):
    w, _, s = layer
    # a Hessian that stays indefinite under every damping step: RTN with the reason
    bad = LayerStats(torch.tensor([[1.0, 1e9], [1e9, 1.0]], dtype=torch.float64).repeat_interleave(K // 2, 0)
                     .repeat_interleave(K // 2, 1) + torch.eye(K, dtype=torch.float64), 10, torch.zeros(K,
                     dtype=torch.float64), torch.ones(K), torch.zeros(4, K), torch.full((4,), float("inf"),
                     dtype=torch.float64))
    res = optimize("l", w, "int8", {}, bad, OptimizerConfig(method="gptq"))
    assert res.method == "rtn" and "not positive definite" in res.notes[0]
    assert torch.equal(res.tensors["weight"], optimize("l", w, "int8", {}, None, OptimizerConfig()).tensors["weight"])
    nan = LayerStats(s.hessian.clone(), s.count, s.col_sum, s.absmax, s.sample, s.keys)
    nan.hessian[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        optimize("l", w, "int8", {}, nan, OptimizerConfig(method="gptq"))
    none = optimize("l", w, "int8", {}, None, OptimizerConfig(method="gptq"))
    assert none.method == "rtn" and "no calibration statistics" in none.notes[0]


def test_fp8_input_scale_from_activations(layer):
    w, x, s = layer
    fmt = REGISTRY.get("fp8")
    params = fmt.resolve((N, K), {"input_scale": True})
    res = optimize("l", w, fmt, params, s, OptimizerConfig(input_scale_percentile=100.0))
    torch.testing.assert_close(res.tensors["input_scale"], x.abs().max() / 448.0)
    assert {t.suffix for t in fmt.slots((N, K), params)} == set(res.tensors)
