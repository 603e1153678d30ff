"""QuantLinear's eager fast path (``nn.bound_linear``): resolved once per (weight, bias), exact, never stale.

The binding fixes a layer's kernel arguments and backend choice at the first call; these tests change every
thing it holds (weight values in place, the weight object, the bias, the backend, dtype and smoothing) and
check each call still computes what the layout's own linear handler computes on the current tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyquant.errors import UserError
from comfyquant.runtime import QuantizeConfig, QuantLinear, quantize_
from comfyquant.runtime.nn import bound_linear, linear

FORMATS = ["int8", "int8-tensor", "int8-rot", "int8-block", "fp8", "int4-rot", "nvfp4", "mxfp8"]


def _layer(fmt: str, bias: bool = True, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(128, 64, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(64, generator=g))
    net = nn.Sequential(lin)
    quantize_(net, QuantizeConfig(format=fmt, min_features=1))
    assert isinstance(net[0], QuantLinear)
    return net[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.cpu_int8
def test_bound_call_equals_the_layout_handler_bit_for_bit(fmt: str, bias: bool) -> None:
    lin = _layer(fmt, bias)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = linear(x, lin.qweight, lin.bias)
        for _ in range(2):  # the first call binds, the second uses the memo
            assert torch.equal(lin(x), ref)
        assert bound_linear(lin.qweight, lin.bias) is not None  # every registered format has the fast path
        x3 = torch.randn(2, 3, 128)  # another signature: checked and chosen on its own
        assert torch.equal(lin(x3), linear(x3, lin.qweight, lin.bias))


@pytest.mark.cpu_int8
def test_in_place_weight_update_is_seen() -> None:
    lin = _layer("int8")
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = lin(x)
        lin.qweight.copy_(torch.randn(64, 128) * 0.05)  # requantized in place: same storage objects
        after = lin(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, linear(x, lin.qweight, lin.bias))


@pytest.mark.cpu_int8
def test_replaced_bias_weight_and_backend_bind_again() -> None:
    lin = _layer("int8")
    x = torch.randn(4, 128)
    with torch.no_grad():
        lin(x)
        lin.bias = nn.Parameter(torch.full((64,), 3.0), requires_grad=False)
        assert torch.equal(lin(x), linear(x, lin.qweight, lin.bias))
        other = _layer("int8", seed=5)
        lin.weight = other.weight
        assert torch.equal(lin(x), linear(x, other.qweight, lin.bias))
        lin.set_backend("dequant")  # a new weight object whose params name the backend
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.qweight.dequantize(), lin.bias))
        lin.set_backend("triton")  # cannot run on the CPU: the next call says so instead of using the old choice
        with pytest.raises(UserError, match="CUDA"):
            lin(x)


@pytest.mark.cpu_int8
def test_dtype_moves_and_smoothing_scales() -> None:
    lin = _layer("int8")
    lin.to(torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, linear(x, lin.qweight, lin.bias))
        # a smoothed layer (pre_quant_scale p): the bound call multiplies x by p as the handler does
        w = torch.randn(64, 128) * 0.05
        p = torch.rand(128) + 0.5
        from comfyquant.runtime import QuantizedTensor

        qt = QuantizedTensor.from_float(w, "int8", pre_quant_scale=p)
        sm = QuantLinear(128, 64, bias=False, weight=qt)
        xf = torch.randn(6, 128)
        ref = linear(xf, sm.qweight, None)
        assert torch.equal(sm(xf), ref)
        torch.testing.assert_close(ref, xf @ qt.dequantize().t(), rtol=0.05, atol=0.05)


@pytest.mark.cpu_int8
def test_node_layer_casts_its_bias_once_and_sees_in_place_updates() -> None:
    from comfyquant.nodes.ops import ComfyQuantLinear

    src = _layer("int8")
    lin = ComfyQuantLinear.wrap(src.qweight, src.bias.detach().float())  # an fp32 bias beside bf16 inputs
    lin.to(torch.bfloat16)
    lin.bias = torch.nn.Parameter(lin.bias.float(), requires_grad=False)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y1 = lin(x)
        cast = lin._bias_cast[2]
        assert torch.equal(y1, linear(x, lin.qweight, lin.bias.to(torch.bfloat16)))
        assert torch.equal(lin(x), y1) and lin._bias_cast[2] is cast  # cast once, reused
        lin.bias.add_(1.0)  # in place: same object, new values (its version counter moves)
        y2 = lin(x)
    assert torch.equal(y2, linear(x, lin.qweight, lin.bias.to(torch.bfloat16)))
    assert not torch.equal(y1, y2)


@pytest.mark.cpu_int8
def test_node_layer_under_inference_mode() -> None:
    """ComfyUI executes nodes under ``torch.inference_mode``: a layer whose fp32 bias was made there (an
    inference tensor, no version counter) casts it for bf16 inputs, inside and outside inference mode."""
    from comfyquant.nodes.ops import ComfyQuantLinear

    src = _layer("int8")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    lin = ComfyQuantLinear.wrap(src.qweight, None)
    with torch.inference_mode():
        lin.bias = torch.nn.Parameter(src.bias.detach().float().clone(), requires_grad=False)
        assert lin.bias.is_inference()
        y_in = lin(x)
    want = linear(x, lin.qweight, src.bias.detach().float().to(torch.bfloat16))
    assert torch.equal(y_in, want)
    with torch.no_grad():
        assert torch.equal(lin(x), want)


def test_low_rank_goes_to_fusing_backends_and_is_added_otherwise() -> None:
    """``bind_linear(...)(x, low_rank)``: a backend that fuses the term gets it (and computes it itself); any
    other backend's output gets ``(x @ down[:r]^T) @ up[:r]`` added after; both equal the float64 formula."""
    from comfyquant.runtime.kernels.dispatch import bind_linear
    from comfyquant.runtime.kernels.registry import (
        KernelBackend,
        KernelKind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    seen: list[object] = []

    def plain(x, w, scales, bias, opts, out_dtype):
        return (x.double() @ (w.double() * scales[0].double()).t()).to(out_dtype)

    def fusing(x, w, scales, bias, opts, out_dtype, low_rank=None):
        seen.append(low_rank)
        y = x.double() @ (w.double() * scales[0].double()).t()
        if low_rank is not None:  # the padded operands, whole: rows past r are zero
            y = y + (x.double() @ low_rank[0].double().t()) @ low_rank[1].double()
        return y.to(out_dtype)

    register_kernel_kind(KernelKind("test_lr", {"plain": plain, "fusing": KernelBackend(fusing, fuses_low_rank=True)}))
    try:
        g = torch.Generator().manual_seed(3)
        w = torch.randint(-100, 100, (24, 40), dtype=torch.int8, generator=g)
        s = torch.rand(24, 1, generator=g) * 0.01
        x = torch.randn(6, 40, generator=g, dtype=torch.float64)
        down = torch.zeros(16, 40, dtype=torch.float64)
        up = torch.zeros(16, 24, dtype=torch.float64)
        down[:5] = torch.randn(5, 40, generator=g, dtype=torch.float64)
        up[:5] = torch.randn(5, 24, generator=g, dtype=torch.float64)
        want = x @ (w.double() * s.double()).t() + (x @ down[:5].t()) @ up[:5]
        for backend in ("plain", "fusing"):
            call = bind_linear("test_lr", w, (s,), None, backend=backend)
            torch.testing.assert_close(call(x, (down, up, 5)), want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(call(x), x @ (w.double() * s.double()).t(), rtol=1e-12, atol=1e-12)
        assert [t is None for t in seen] == [False, True]  # the fusing backend got the term once, then none
    finally:
        unregister_kernel_kind("test_lr")


@pytest.mark.cpu_int8
def test_dynamic_lora_on_a_bound_layer_equals_the_side_path_formula() -> None:
    """A dynamic LoRA (with a dense diff and a bias diff too) through QuantLinear's bound path, and a smoothed
    layer whose LoRA must read x itself, not the smoothed x."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry
    from comfyquant.runtime import QuantizedTensor

    g = torch.Generator().manual_seed(4)
    for pre in (None, torch.rand(128, generator=g) + 0.5):
        qt = QuantizedTensor.from_float(torch.randn(64, 128, generator=g) * 0.05, "int8", pre_quant_scale=pre)
        lin = QuantLinear(128, 64, bias=False, weight=qt)
        side = LoRASidePath()
        d, u = torch.randn(7, 128, generator=g) * 0.1, torch.randn(64, 7, generator=g) * 0.1
        side.add(1, SideEntry(down=d, up=u))
        side.add(2, SideEntry(dense=torch.randn(64, 128, generator=g) * 0.01, bias=torch.randn(64, generator=g)))
        lin.adapter = side
        x = torch.randn(5, 128, generator=g)
        with torch.no_grad():
            base = linear(x, lin.qweight, None)
            want = base + (x @ d.t()) @ u.t() + x @ side.dense.t() + side.bias
            torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
            assert side.fused_operands(x)[0].shape == (16, 128)  # padded to the kernels' 16-row steps


def test_bound_calls_replay_a_backends_plan_from_the_second_call() -> None:
    """``KernelBackend.plan`` (the eager fast path): made after a signature's first call, used for later calls of
    that signature whose input is contiguous and aligned, remade for other low-rank operands; every result is
    the float64 product (a plan that answered for another input or term would fail)."""
    from comfyquant.runtime.kernels.dispatch import bind_linear
    from comfyquant.runtime.kernels.registry import (
        KernelBackend,
        KernelKind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    log: list[str] = []

    def product(x, w, s, low_rank=None):
        y = x.double() @ (w.double() * s.double()).t()
        if low_rank is not None:
            y = y + (x.double() @ low_rank[0].double().t()) @ low_rank[1].double()
        return y

    def impl(x, w, scales, bias, opts, out_dtype, low_rank=None):
        log.append("impl")
        return product(x, w, scales[0], low_rank).to(out_dtype)

    def plan(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
        log.append("plan made" + (" lr" if low_rank is not None else ""))

        def run(x):
            log.append("plan")
            return product(x, w, scales[0], low_rank).to(out_dtype)
        return run

    register_kernel_kind(KernelKind("test_plan", {"p": KernelBackend(impl, fuses_low_rank=True, plan=plan)}))
    try:
        g = torch.Generator().manual_seed(4)
        w = torch.randint(-100, 100, (24, 40), dtype=torch.int8, generator=g)
        s = torch.rand(24, 1, generator=g) * 0.01
        xs = [torch.randn(6, 40, generator=g, dtype=torch.float64) for _ in range(3)]
        lr_a = (torch.randn(16, 40, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g,
                                                                                dtype=torch.float64), 16)
        lr_b = (lr_a[0] * 2, lr_a[1], 16)
        call = bind_linear("test_plan", w, (s,), None)
        for x in xs:
            torch.testing.assert_close(call(x), product(x, w, s), rtol=1e-12, atol=1e-12)
        assert log == ["impl", "plan made", "plan", "plan"]
        wide = torch.randn(6, 80, generator=g, dtype=torch.float64)[:, ::2]  # same signature, strided
        torch.testing.assert_close(call(wide), product(wide, w, s), rtol=1e-12, atol=1e-12)
        assert log[-1] == "impl"
        log.clear()
        for lr in (lr_a, lr_a, lr_b, lr_b):
            torch.testing.assert_close(call(xs[0], lr), product(xs[0], w, s, lr), rtol=1e-12, atol=1e-12)
        assert log == ["impl", "plan made lr", "plan", "impl", "plan made lr", "plan"]
        assert len(call.memo) == 2 and all(callable(e[1]) for e in call.memo.values())  # without / with the term
    finally:
        unregister_kernel_kind("test_plan")


def test_measured_dispatch_picks_the_fastest_backend_and_caches_it(tmp_path) -> None:
    """``DispatchPolicy(measure=True)``: the first call of a shape times every candidate (not the reference),
    keeps the fastest, writes it to the cache file; a second binding of the same shape reads it without timing;
    a backend that refuses the shape is skipped with its reason; results are the float64 product."""
    import json

    from comfyquant.errors import UserError
    from comfyquant.runtime.kernels.dispatch import DispatchPolicy, bind_linear
    from comfyquant.runtime.kernels.registry import (
        KernelKind,
        kernel_kind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    calls: dict[str, int] = {}

    def product(x, w, s):
        return x.double() @ (w.double() * s.double()).t()

    def make(name, repeat):
        def impl(x, w, scales, bias, opts, out_dtype):
            calls[name] = calls.get(name, 0) + 1
            for _ in range(repeat - 1):  # real extra work: the slow backend computes the product again
                product(x, w, scales[0])
            return product(x, w, scales[0]).to(out_dtype)
        return impl

    def refuses(x, w, scales, bias, opts, out_dtype):
        raise UserError("needs K a multiple of 4096")

    register_kernel_kind(KernelKind("test_measure", {"ref": make("ref", 1), "slow": make("slow", 40),
                                                     "fast": make("fast", 1), "picky": refuses}))
    try:
        g = torch.Generator().manual_seed(5)
        w = torch.randint(-100, 100, (96, 160), dtype=torch.int8, generator=g)
        s = torch.rand(96, 1, generator=g) * 0.01
        x = torch.randn(64, 160, generator=g, dtype=torch.float64)
        policy = DispatchPolicy(measure=True, measure_cache=str(tmp_path))
        call = bind_linear("test_measure", w, (s,), None, backend=policy)
        torch.testing.assert_close(call(x), product(x, w, s), rtol=1e-12, atol=1e-12)
        chosen = next(iter(call.memo.values()))[0]
        assert chosen is kernel_kind("test_measure").backends["fast"] and calls["slow"] >= 5
        assert "ref" not in calls  # the reference is not a candidate when others run here
        files = list(tmp_path.glob("measured-v*.json"))
        assert len(files) == 1
        entry = next(iter(json.loads(files[0].read_text())["choices"].values()))
        assert entry["backend"] == "fast" and entry["us"]["fast"] < entry["us"]["slow"]
        assert "4096" in entry["skipped"]["picky"]
        before = dict(calls)
        call2 = bind_linear("test_measure", w, (s,), None, backend=policy)  # same shape: read from the cache
        torch.testing.assert_close(call2(x), product(x, w, s), rtol=1e-12, atol=1e-12)
        assert calls["slow"] == before["slow"] and calls["fast"] == before["fast"] + 1
    finally:
        unregister_kernel_kind("test_measure")


def test_tma_direct_launch_passes_what_tritons_descriptor_wrapper_passes() -> None:
    """``launch._tma_direct``: firing with descriptors expanded by the caller hands the C launcher exactly the
    arguments Triton's own wrapper (``wrap_handle_tensordesc``, which expands them on every launch) hands it."""
    pytest.importorskip("triton")
    from triton.backends.nvidia.driver import wrap_handle_tensordesc
    from triton.tools.tensor_descriptor import TensorDescriptor

    from comfyquant.runtime.kernels.launch import _tma_direct

    seen: list[tuple] = []
    signature = {"a": "tensordesc<i8[64,64]>", "b": "tensordesc<i8[32,64]>", "out": "*bf16", "m": "i32", "k": "i32"}

    class Run:
        launch = staticmethod(wrap_handle_tensordesc(lambda *a: seen.append(a), signature, None))
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

    class Compiled:
        run, function, packed_metadata = Run(), 77, ("meta",)

    a, b = torch.zeros(128, 256, dtype=torch.int8), torch.zeros(96, 256, dtype=torch.int8)
    out = torch.empty(128, 96, dtype=torch.bfloat16)
    da, db = TensorDescriptor.from_tensor(a, [64, 64]), TensorDescriptor.from_tensor(b, [32, 64])
    ck = Compiled()
    ck.run.launch(4, 1, 1, 5, 77, False, False, None, None, ("meta",), None, None, None, da, db, out, 128, 256)
    fire, expand = _tma_direct(ck, (4, 1, 1))
    fire(5, *expand(da, 0), *expand(db, 1), out, 128, 256)
    assert len(seen) == 2 and len(seen[0]) == len(seen[1])
    assert all((x is y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(*seen, strict=True))


def test_input_activations_reach_only_backends_that_fuse_them_and_plans_replay_either_way() -> None:
    """``bind_linear(...)(x, None, act)``: a backend fusing elementwise activations gets ``act=code`` for silu and
    the activated x for the gated swiglu (x [M, 2K]); one fusing gated ones gets swiglu's code and the whole x;
    one fusing none gets the activated x. Each replays a plan from the second call (built for what it is given:
    the activated input behind a torch activation where it does not fuse). Every result is the float64
    product of the activated input."""
    from comfyquant.runtime.kernels.acts import act_code, apply_input_act
    from comfyquant.runtime.kernels.dispatch import bind_linear
    from comfyquant.runtime.kernels.registry import (
        KernelBackend,
        KernelKind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    log: list[tuple] = []

    def product(x, w, s, act):
        if act == act_code("swiglu"):
            x = apply_input_act(x, "swiglu")
        elif act:
            x = apply_input_act(x, "silu")
        return x.double() @ (w.double() * s.double()).t()

    def impl(x, w, scales, bias, opts, out_dtype, act=0):
        log.append(("impl", x.shape[-1], act))
        return product(x, w, scales[0], act).to(out_dtype)

    def plan(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
        log.append(("plan made", x.shape[-1], act))

        def run(v):
            log.append(("plan", v.shape[-1], act))
            return product(v, w, scales[0], act).to(out_dtype)
        return run

    backends = {"none": KernelBackend(impl, plan=plan),
                "elementwise": KernelBackend(impl, fuses_input_act=True, plan=plan),
                "gated": KernelBackend(impl, fuses_input_act=True, plan=plan, fuses_gated_act=True)}
    register_kernel_kind(KernelKind("test_act", backends))
    try:
        g = torch.Generator().manual_seed(5)
        w = torch.randint(-100, 100, (24, 40), dtype=torch.int8, generator=g)
        s = torch.rand(24, 1, generator=g) * 0.01
        expect = {("none", "silu"): (40, 0), ("none", "swiglu"): (40, 0), ("elementwise", "silu"): (40, 3),
                  ("elementwise", "swiglu"): (40, 0), ("gated", "silu"): (40, 3), ("gated", "swiglu"): (80, 4)}
        for (backend, act), (width, code) in expect.items():
            log.clear()
            call = bind_linear("test_act", w, (s,), None, backend=backend)
            for _ in range(3):
                x = torch.randn(6, 80 if act == "swiglu" else 40, generator=g, dtype=torch.float64)
                want = apply_input_act(x, act).double() @ (w.double() * s.double()).t()
                torch.testing.assert_close(call(x, None, act), want, rtol=1e-12, atol=1e-12)
            assert log == [("impl", width, code), ("plan made", width, code), ("plan", width, code),
                           ("plan", width, code)], (backend, act, log)
    finally:
        unregister_kernel_kind("test_act")
