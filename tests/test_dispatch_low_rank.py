"""Backend choice for calls with a low-rank term (dynamic LoRAs): the fp8 kind prefers its fusing Triton GEMM
over ``_scaled_mm`` + a second pass where the cost model says so, and ``bind_linear`` keys its memo on it (CPU).

The fp8 choice is a pure function of the device description (compute capability, triton present, cost table),
so an sm_90 device is described here, not faked: ``fp8_choice`` is what ``_choose_fp8`` calls with the real
device's facts.
"""

from __future__ import annotations

import pytest
import torch

from comfyquant.runtime.kernels import builtin
from comfyquant.runtime.kernels import costs as cm
from comfyquant.runtime.kernels.backends import BackendChoice
from comfyquant.runtime.kernels.dispatch import bind_linear, choose_backend
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import (
    KernelBackend,
    KernelKind,
    kernel_kind,
    register_kernel_kind,
    unregister_kernel_kind,
)

pytestmark = pytest.mark.cpu_int8

H200 = (9, 0)
FLUX = {"qkv": (3072, 9216), "mlp0": (3072, 12288), "proj": (3072, 3072), "single_lin1": (3072, 21504)}


def _fp8(m: int, k: int, n: int, rank: int, *, cap=H200, triton: bool = True, graph: bool = False,
         policy: DispatchPolicy | None = None) -> str:
    return builtin.fp8_choice(cap, triton, m, n, k, policy, lambda: cm.DEFAULT_COSTS, graph, rank).name


@pytest.mark.parametrize("graph", [False, True])
def test_fp8_with_a_low_rank_term_takes_the_fusing_triton_gemm_on_sm90(graph: bool) -> None:
    fp8 = kernel_kind("fp8")
    for layer, (k, n) in FLUX.items():
        without, with_lr = _fp8(4096, k, n, 0, graph=graph), _fp8(4096, k, n, 32, graph=graph)
        if layer != "proj":  # (3072x3072 is host-bound in eager mode: the one-launch dequant path wins there)
            assert without == "scaled_mm", (layer, without)  # cuBLAS fp8 is the faster plain GEMM
        assert with_lr == "triton", (layer, with_lr)
        assert fp8.backends[with_lr].fuses_low_rank and not fp8.backends[without].fuses_low_rank
        assert fp8.backends["triton"].fuses_input_act
    # without a low-rank term the Triton fp8 GEMM is never a candidate, at any M
    for m in (1, 64, 512, 4096, 16384):
        for k, n in FLUX.values():
            assert _fp8(m, k, n, 0, graph=graph) != "triton"


def test_fp8_low_rank_choice_respects_device_shape_and_policy() -> None:
    assert _fp8(4096, 3072, 9216, 32, cap=(8, 0)) == "dequant"  # no fp8 tensor cores
    assert _fp8(4096, 3072, 9216, 32, triton=False) == "scaled_mm"
    assert _fp8(4096, 3000, 9216, 32) == "dequant"  # K % 16: _scaled_mm's constraint decides first
    assert _fp8(4096, 3072, 9216, 32, policy=DispatchPolicy(allow=("scaled_mm",))) == "scaled_mm"
    reason = builtin.fp8_choice(H200, True, 4096, 9216, 3072, None, lambda: cm.DEFAULT_COSTS, False, 32).reason
    assert "rank-32 low-rank term" in reason and "triton_fp8" in reason
    # CPU tensors: the reference, low-rank term or not; the new backend refuses them
    x = torch.randn(4, 64)
    assert choose_backend(x, kind="fp8", n=32, k=64, low_rank=16).name == "torch"
    assert "needs a CUDA device" in kernel_kind("fp8").why_not("triton", x.device)


def test_cost_model_low_rank_terms() -> None:
    c = cm.DEFAULT_COSTS
    m, n, k = 4096, 9216, 3072
    fused, unfused = cm.low_rank_us(m, n, k, 32, c, True), cm.low_rank_us(m, n, k, 32, c, False)
    assert 0 < fused < unfused  # the addmm's passes over the [M, N] output are what fusing saves
    assert cm.low_rank_us(m, n, k, 0, c, False) == 0.0 and cm.low_rank_us(0, n, k, 32, c, False) == 0.0
    assert cm.low_rank_us(m, n, k, 64, c, False) > unfused  # monotone in the rank
    # a table measured before the fp8 Triton path existed takes the int8 Triton GEMM's constants for it
    assert "triton_fp8" not in dict(c.tflops)
    assert c.rate("triton_fp8") == c.rate("triton") and c.host("triton_fp8") == c.host("triton")
    faster = 1.2 * c.rate("triton")  # a measured fp8 rate above the int8 one it would otherwise borrow
    own = cm.DeviceCosts(c.device, c.sms, c.bw_gbs, c.launch_us, (*c.host_us, ("triton_fp8", 70.0)),
                         (*c.tflops, ("triton_fp8", faster)), ws_speedup=c.ws_speedup)
    assert own.rate("triton_fp8") == faster and own.host("triton_fp8") == 70.0
    # its rate is the Triton fp8 kernel's (below the Gluon kernel's rows); on the Gluon kernel's shapes the fp8
    # path is the int8 Gluon kernel's model times configs.WS_FP8_SPEED, whatever the Triton fp8 rate
    assert cm.gpu_us("triton_fp8", 192, n, k, own) < cm.gpu_us("triton_fp8", 192, n, k, c)
    assert cm.gluon_path("triton_fp8", m, n, k, c.sms)
    assert cm.gpu_us("triton_fp8", m, n, k, own) == cm.gpu_us("triton_fp8", m, n, k, c)


def test_bind_linear_memo_is_keyed_on_the_low_rank_term() -> None:
    """A kind whose choice differs with a low-rank term: the bound call uses each choice for its calls, in any
    order (a memo keyed on the shape alone would reuse the first one), and both results are right."""
    ran: list[tuple[str, bool]] = []

    def plain(x, w, scales, bias, opts, out_dtype):
        ran.append(("plain", False))
        return (x.double() @ w.double().t()).to(out_dtype)

    def fusing(x, w, scales, bias, opts, out_dtype, low_rank=None):
        ran.append(("fusing", low_rank is not None))
        y = x.double() @ w.double().t()
        if low_rank is not None:
            y = y + (x.double() @ low_rank[0].double().t()) @ low_rank[1].double()
        return y.to(out_dtype)

    seen_ranks: list[int] = []

    def choose(x, n, k, opts, policy):
        return BackendChoice("plain", "no low-rank term")

    def choose_lr(x, n, k, opts, policy, rank):
        seen_ranks.append(rank)
        return BackendChoice("fusing", f"rank {rank}")

    register_kernel_kind(KernelKind("test_lr_choice", {"plain": plain,
                                                       "fusing": KernelBackend(fusing, fuses_low_rank=True)},
                                    choose=choose, choose_low_rank=choose_lr))
    try:
        g = torch.Generator().manual_seed(5)
        w = torch.randn(24, 40, generator=g, dtype=torch.float64)
        x = torch.randn(6, 40, generator=g, dtype=torch.float64)
        down, up = torch.zeros(16, 40, dtype=torch.float64), torch.zeros(16, 24, dtype=torch.float64)
        down[:3], up[:3] = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.randn(3, 24, generator=g,
                                                                                          dtype=torch.float64)
        base = x @ w.t()
        want = base + (x @ down[:3].t()) @ up[:3]
        call = bind_linear("test_lr_choice", w, (None,))
        for _ in range(2):
            torch.testing.assert_close(call(x), base, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(call(x, (down, up, 3)), want, rtol=1e-12, atol=1e-12)
        assert ran == [("plain", False), ("fusing", True)] * 2
        assert seen_ranks == [16]  # chosen once (memoized), with the padded rank R
        assert choose_backend(x, kind="test_lr_choice", n=24, k=40).name == "plain"
        assert choose_backend(x, kind="test_lr_choice", n=24, k=40, low_rank=16).name == "fusing"
    finally:
        unregister_kernel_kind("test_lr_choice")


@pytest.mark.parametrize("graph", [False, True])
def test_fp8_takes_the_gluon_kernel_in_place_of_cublas_on_its_shapes(graph: bool) -> None:
    """On sm_90 with the Gluon kernel (``gluon=True``; ``configs.WS_FP8``) an fp8 layer on a shape it takes runs
    it, never ``_scaled_mm`` (H200 run 51: the whole layer faster on 66 of 68 such rows, the others within 0.7%);
    off its shapes (fewer rows, narrow layers) the choice is the one before; a policy that allows only
    ``_scaled_mm`` still gets it; without the Gluon kernel (sm_89, older Triton) nothing changes."""
    from comfyquant.runtime.kernels.configs import WS_FP8, ws_shape

    def pick(m: int, k: int, n: int, gluon: bool, policy: DispatchPolicy | None = None) -> str:
        return builtin.fp8_choice(H200, True, m, n, k, policy, lambda: cm.DEFAULT_COSTS, graph, 0, gluon=gluon).name

    for m in (1, 16, 256, 1024, 4096, 16384):
        for k, n in (*FLUX.values(), (1280, 1280), (5120, 1280), (640, 640)):
            got, before = pick(m, k, n, True), pick(m, k, n, False)
            if WS_FP8 and ws_shape(m, n, k, cm.DEFAULT_COSTS.sms):
                assert got != "scaled_mm", (m, k, n)
                if m >= 4096 and (k, n) in FLUX.values():  # GPU-bound: the W8A8 GEMM
                    assert got == "triton", (m, k, n, got)
            else:
                assert got == before, (m, k, n, got, before)
            assert pick(m, k, n, True, DispatchPolicy(allow=("scaled_mm",))) == "scaled_mm"


def test_fp8_keeps_cublas_for_float32_activations_on_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gluon kernel's epilogue stores bf16 / fp16 tiles; a float32 call (ComfyUI runs T5 in float32) would
    run the per-tile Triton fp8 kernel instead, slower than cuBLAS fp8, so ``_choose_fp8`` offers the Gluon kernel
    in place of ``_scaled_mm`` for 16-bit activations only (the device facts patched: no GPU here)."""
    monkeypatch.setattr(builtin, "device_capability", lambda dev: H200)
    monkeypatch.setattr(builtin, "triton_available", lambda: True)
    monkeypatch.setattr(builtin, "_ws_available", lambda: True)
    monkeypatch.setattr(builtin, "_costs", lambda x, policy: cm.DEFAULT_COSTS)
    monkeypatch.setattr(builtin, "_graph", lambda policy: False)
    k, n = FLUX["qkv"]
    got = {dt: builtin._choose_fp8(torch.empty(4096, k, dtype=dt), n, k, (), None).name
           for dt in (torch.bfloat16, torch.float16, torch.float32)}
    assert got[torch.bfloat16] == got[torch.float16] == "triton"
    assert got[torch.float32] == _fp8(4096, k, n, 0) == "scaled_mm"
