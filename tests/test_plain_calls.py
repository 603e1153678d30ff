"""The plain-call fast path (``dispatch.bind_linear``'s ``plain`` / ``hot``, ``QuantLinear.forward``): a layer
called with no side path or norm (an input activation is part of the signature) replays its signature's plan
with a third of the general path's reads, gives the general path's numbers, and steps aside for whatever the
general path handles (a new shape, a non-contiguous input, a LoRA, a ComfyUI weight patch, a bias to cast).

On the CPU the backend with a plan is the dense copy (``runtime.kernels.dense_copy``), chosen here by the cost
model with the default (H200) table, as a CUDA device would choose for these narrow layers; a test backend with
plans covers the activation signatures, which are never copied."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime import QuantizeConfig, quantize_
from comfyquant.runtime.kernels import builtin, dispatch
from comfyquant.runtime.kernels.backends import BackendChoice
from comfyquant.runtime.kernels.costs import DEFAULT_COSTS
from comfyquant.runtime.kernels.dense_copy import CopyBudget, has_copy
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import KernelBackend, kernel_kind, register_kernel_kind

pytestmark = pytest.mark.cpu_int8

N = K = 640  # SDXL's narrow attention projection: the cost model puts every int8 path over bf16 at 16 rows


@pytest.fixture
def int8_by_cost_model():
    """The int8 kind choosing by the cost model on the CPU (its W8A8 path runs as the reference, the weight-only
    path as ``dequant``); restored after the test."""
    int8 = kernel_kind("int8")

    def choose(x, n, k, opts, policy):
        return builtin.decide_paths(x.numel() // k, n, k, 0, policy, DEFAULT_COSTS, False,
                                    (("triton", "torch"), ("triton_w8a16", "dequant")))

    register_kernel_kind(dataclasses.replace(int8, choose=choose), replace=True)
    yield
    register_kernel_kind(int8, replace=True)


def _within_gemm_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                          b: torch.Tensor | None) -> bool:
    """Whether two fp32 products of the same operands agree to the summation bound of a K-term dot product
    (2 K u of the sum of magnitudes): the CPU GEMM picks its kernel and blocking by row count and layout, so the
    same rows computed as part of another call may round differently (an AMX Xeon: 4.6e-5 at K = 640)."""
    mag = x.abs().double() @ (q.double() * s.double()).abs().t() + (0 if b is None else b.abs().double())
    return bool(((got.double() - want.double()).abs() <= 2 * x.shape[-1] * 2.0 ** -24 * mag).all())


def _want(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q s)^T + b`` in float64, rounded to x's dtype."""
    y = x.double() @ (q.double() * s.double()).t()
    return (y if b is None else y + b.double()).to(x.dtype)


def test_bound_call_replays_plain_signatures(int8_by_cost_model) -> None:
    q, s = quantize_rowwise(torch.randn(N, K, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    x, b = torch.randn(16, K, generator=g), torch.randn(N, generator=g)
    call = dispatch.bind_linear("int8", q, (s,), b, opts=(0,), backend=DispatchPolicy(copies=CopyBudget(1 << 30)))
    assert call.plain(x) is None and not call.hot  # nothing planned before the first call
    first = call(x)
    assert has_copy(q, torch.float32) and list(call.hot) == [(x.shape, x.dtype, x.device, None)]
    torch.testing.assert_close(first, _want(x, q, s, b), rtol=1e-5, atol=1e-4)
    assert torch.equal(call.plain(x), first) and torch.equal(call(x), first)
    # the copy's plan (plain torch ops, ``plan_takes_any``) takes any layout, unchecked: the same product up to
    # the GEMM's rounding for that layout
    xt = x.t().contiguous().t()  # the same values, column-major
    via_plan = call.plain(xt)
    assert via_plan is not None and _within_gemm_rounding(via_plan, first, x, q, s, b)
    assert torch.equal(call(xt), via_plan)
    assert call.plain(x[:8]) is None  # a new signature: decided by the general path first
    assert _within_gemm_rounding(call(x[:8]), first[:8], x[:8], q, s, b)
    # an input activation goes to the quantized kernel (no copy; on the CPU no plan): the general path
    call(x, input_act="gelu_tanh")
    assert call.plain(x, "gelu_tanh") is None and all(key[3] is None for key in call.hot)


@pytest.fixture
def planned_int8():
    """The int8 kind choosing a backend that makes plans on the CPU: its weight-only math, planned as a GPU
    backend's would be (a function of x, everything else fixed; it applies no activation itself)."""
    int8 = kernel_kind("int8")
    ref = int8.backends["dequant"]

    def plan(x, w, scales, bias, opts, out_dtype, act=0, *rest, **kw):
        return None if act else (lambda xx: ref.impl(xx, w, scales, bias, opts, out_dtype))

    backends = {**int8.backends, "planned": KernelBackend(ref.impl, plan=plan)}
    register_kernel_kind(dataclasses.replace(int8, backends=backends,
                                             choose=lambda x, n, k, opts, policy: BackendChoice("planned", "test")),
                         replace=True)
    yield
    register_kernel_kind(int8, replace=True)


def test_input_activation_signatures_replay_their_own_plan(planned_int8) -> None:
    """A call with an input activation is a signature of its own in the hot table: replayed with the activation
    applied, apart from the same input's plain call."""
    q, s = quantize_rowwise(torch.randn(N, K, generator=torch.Generator().manual_seed(7)))
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(8))
    call = dispatch.bind_linear("int8", q, (s,), None, opts=(0,))
    plain, act = call(x), call(x, input_act="gelu_tanh")
    torch.testing.assert_close(act, _want(torch.nn.functional.gelu(x, approximate="tanh"), q, s, None), rtol=1e-4,
                               atol=1e-3)
    assert set(call.hot) == {(x.shape, x.dtype, x.device, None), (x.shape, x.dtype, x.device, "gelu_tanh")}
    assert torch.equal(call.plain(x, "gelu_tanh"), act) and torch.equal(call(x, input_act="gelu_tanh"), act)
    assert torch.equal(call.plain(x), plain) and torch.equal(call(x), plain)
    assert call.plain(x, "silu") is None  # another activation: not planned yet


def test_a_checking_plan_leaves_other_layouts_to_the_general_path(planned_int8) -> None:
    """A plan that does not take any input (a GPU backend's launcher, here the CPU stand-in) is replayed only for
    contiguous, 16-byte aligned x: a column-major x of the same signature goes to the general path (same numbers),
    and so does a view that starts off the alignment."""
    q, s = quantize_rowwise(torch.randn(N, K, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(10))
    call = dispatch.bind_linear("int8", q, (s,), None, opts=(0,))
    first = call(x)
    assert torch.equal(call.plain(x), first)
    xt = x.t().contiguous().t()
    assert call.plain(xt) is None and torch.equal(call(xt), first)
    off = torch.randn(16 * K + 1)[1:].view(16, K)  # contiguous, 4 bytes past an aligned start
    off.copy_(x)
    assert off.data_ptr() % 16 and call.plain(off) is None and torch.equal(call(off), first)


def test_plain_call_skips_the_general_path(int8_by_cost_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a signature's first call, a plain layer call reads none of the general path: not even the capture
    query every general call makes."""
    lin = nn.Sequential(nn.Linear(K, N))
    quantize_(lin, QuantizeConfig(format="int8", min_features=1))
    layer = lin[0]
    layer.set_backend(DispatchPolicy(copies=CopyBudget(1 << 30)))
    x = torch.randn(2, 8, K, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = layer(x)

        def refuse(x: torch.Tensor) -> bool:
            raise AssertionError("the general path ran")

        monkeypatch.setattr(dispatch, "capturing", refuse)
        assert torch.equal(layer(x), want)
        with pytest.raises(AssertionError, match="general path"):
            layer(x[:1])  # a new signature does take it


def _layers(comfy: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized layer (``QuantLinear`` or the node pack's ``ComfyQuantLinear``) with the copy policy, its codes,
    row scales and bias."""
    from comfyquant.nodes.ops import ComfyQuantLinear

    lin = nn.Sequential(nn.Linear(K, N))
    quantize_(lin, QuantizeConfig(format="int8", min_features=1))
    layer = lin[0]
    layer.set_backend(DispatchPolicy(copies=CopyBudget(1 << 30)))
    if comfy:
        layer = ComfyQuantLinear.wrap(layer.qweight, layer.bias)
    qw = layer.qweight
    return layer, qw.qdata, qw.params.weight_scale, layer.bias.detach()


@pytest.mark.parametrize("comfy", [False, True])
def test_layer_state_changes_leave_the_plain_path(int8_by_cost_model, comfy: bool) -> None:
    """Each thing the general path handles, set after the plain path is warm, is seen on the next call."""
    layer, q, s, b = _layers(comfy)
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), _want(x, q, s, b), rtol=1e-5, atol=1e-4)
        layer.adapter = lambda xx, y: y + 1.0  # a side path (what a dynamic LoRA is)
        torch.testing.assert_close(layer(x), _want(x, q, s, b) + 1.0, rtol=1e-5, atol=1e-4)
        layer.adapter = None
        layer.bias = nn.Parameter(torch.zeros(N), requires_grad=False)  # a new bias object: bound anew
        torch.testing.assert_close(layer(x), _want(x, q, s, None), rtol=1e-5, atol=1e-4)
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
        layer(x)
        layer.input_act = "gelu_tanh"
        xa = torch.nn.functional.gelu(x, approximate="tanh")
        for _ in range(2):  # planned, then replayed
            torch.testing.assert_close(layer(x), _want(xa, q, s, b), rtol=1e-4, atol=1e-3)
        layer.input_act = None
        torch.testing.assert_close(layer(x), _want(x, q, s, b), rtol=1e-5, atol=1e-4)


def test_comfy_layer_patches_and_bias_cast_leave_the_plain_path(int8_by_cost_model) -> None:
    """ComfyUI's on-the-fly weight patches and an input in another dtype than the bias take the general path."""
    layer, q, s, b = _layers(comfy=True)
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in range(2):
            layer(x)
        layer.weight_function.append(lambda w: w * 0.0)  # a lowvram patch: the float weight, patched
        torch.testing.assert_close(layer(x), b.expand(16, N), rtol=0, atol=0)
        layer.weight_function.clear()
        layer.bias_function.append(lambda bb: bb * 0.0)
        torch.testing.assert_close(layer(x), _want(x, q, s, None), rtol=1e-5, atol=1e-4)
        layer.bias_function.clear()
        xd = x.double()  # the float32 bias is cast to the input's dtype; the plain path's signature is float32
        torch.testing.assert_close(layer(xd), _want(xd, q, s, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x), _want(x, q, s, b), rtol=1e-5, atol=1e-4)


def test_comfy_layer_with_a_smoothed_weight() -> None:
    """A layout's bound call that wraps the dispatcher's (a smoothed layer's, ``pre_quant_scale``: x * p first)
    has no plain plan of its own: the layer takes its general path every call, with the handler's numbers."""
    from comfyquant.nodes.ops import ComfyQuantLinear
    from comfyquant.runtime.nn import linear
    from comfyquant.runtime.tensor import QuantizedTensor

    g = torch.Generator().manual_seed(6)
    w, p, b = torch.randn(N, K, generator=g) * 0.05, torch.rand(K, generator=g) + 0.5, torch.randn(N, generator=g)
    qt = QuantizedTensor.from_float(w, "int8", pre_quant_scale=p)
    layer = ComfyQuantLinear.wrap(qt, b)
    x = torch.randn(16, K, generator=g)
    with torch.no_grad():
        want = linear(x, qt, b)
        for _ in range(3):  # binds, plans, then would replay
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
