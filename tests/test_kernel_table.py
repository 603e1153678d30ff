"""The kernel-kind table: a format registered from one file runs eager and compiled; int4_rot matches comfy-kitchen.

A throwaway kind (weights stored as int8 [N, K/4] holding four 2-bit codes per byte, one scale per row) is
registered here with only a reference backend and must run through ``quant_linear`` eagerly and under
``torch.compile(fullgraph=True)`` with the generic custom op, with no edit anywhere else. ``int4_rot`` is
checked against comfy-kitchen 0.2.40's own packing and its eager ``convrot_w4a4_linear(linear_dtype="int8")``.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from comfyquant.errors import UserError
from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels import int4
from comfyquant.runtime.kernels.dispatch import (
    BackendChoice,
    DispatchPolicy,
    backends_for,
    choose_backend,
    int4_rot_linear,
    quant_linear,
)
from comfyquant.runtime.kernels.registry import (
    KernelBackend,
    KernelKind,
    needs_cuda,
    register_kernel_kind,
    unregister_kernel_kind,
)

pytestmark = pytest.mark.cpu_int8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- a dummy 2-bit format, defined entirely here ------------------------------------------------------------
def _unpack2(w: torch.Tensor) -> torch.Tensor:
    b = w.view(torch.uint8).to(torch.int32)
    codes = torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(w.shape[0], -1)
    return codes.float() - 1.5  # levels -1.5, -0.5, 0.5, 1.5


def _pack2(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32).reshape(codes.shape[0], -1, 4)
    return (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).to(torch.uint8).view(torch.int8)


def _dummy_ref(x, w, scales, bias, opts, out_dtype):
    wf = _unpack2(w) * scales[0].float().reshape(-1, 1)
    out = x.float() @ wf.t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


@pytest.fixture
def dummy_kind():
    calls = []

    def choose(x, n, k, opts, policy):
        calls.append((n, k, policy))
        return BackendChoice("torch", "only backend")

    kind = register_kernel_kind(KernelKind(
        "test_2bit", {"torch": _dummy_ref, "gpu_only": KernelBackend(_dummy_ref, needs_cuda())},
        choose=choose, in_features=lambda w, opts: 4 * int(w.shape[1])))
    yield kind, calls
    unregister_kernel_kind("test_2bit")


def test_registered_kind_runs_eager_and_compiled(dummy_kind) -> None:
    _kind, calls = dummy_kind
    g = torch.Generator().manual_seed(0)
    n, k = 24, 64
    codes = torch.randint(0, 4, (n, k), generator=g)
    w, s = _pack2(codes), torch.rand(n, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    x = torch.randn(3, 5, k, generator=g)
    exact = x.double() @ ((codes.double() - 1.5) * s.double().reshape(-1, 1)).t() + bias.double()

    y = quant_linear(x, "test_2bit", w, (s,), bias)
    assert y.shape == (3, 5, n) and _rel(y, exact) < 1e-6
    assert calls and calls[-1][:2] == (n, k)  # the kind's own choice saw the logical K (4 codes per byte)
    assert backends_for("test_2bit") == ("torch", "gpu_only")

    policy = DispatchPolicy(mode="graph")
    compiled = torch.compile(lambda t: quant_linear(t, "test_2bit", w, (s,), bias, backend=policy) * 2.0,
                             fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    assert torch.equal(yc, 2.0 * y)
    assert calls[-1][2] == policy  # the policy crossed the custom op as its key and came back equal
    # bf16 input, out_dtype honoured by the generic fake impl and the reference
    yb = torch.compile(lambda t: quant_linear(t, "test_2bit", w, (s,), None, out_dtype=torch.float32),
                       fullgraph=True, backend="aot_eager")(x.bfloat16())
    assert yb.dtype == torch.float32 and yb.shape == (3, 5, n)

    with pytest.raises(UserError, match="CUDA"):
        quant_linear(x, "test_2bit", w, (s,), backend="gpu_only")
    with pytest.raises(UserError, match="does not implement"):
        quant_linear(x, "test_2bit", w, (s,), backend="triton")
    with pytest.raises(UserError, match="in_features"):
        quant_linear(x[..., :60], "test_2bit", w, (s,))
    with pytest.raises(ValueError, match="already registered"):
        register_kernel_kind(KernelKind("test_2bit", {"torch": _dummy_ref}))


def test_unknown_kind_and_default_choice() -> None:
    with pytest.raises(ValueError, match="unknown kernel kind"):
        quant_linear(torch.randn(2, 8), "no_such_kind", torch.zeros(4, 8, dtype=torch.int8), ())
    register_kernel_kind(KernelKind("test_plain", {"torch": _dummy_ref}, in_features=lambda w, o: 4 * w.shape[1]))
    try:
        x = torch.randn(2, 8)
        assert choose_backend(x, kind="test_plain", n=4, k=8).name == "torch"  # no chooser: first that runs
    finally:
        unregister_kernel_kind("test_plain")
    assert {"int8", "int8_block", "fp8", "int4_rot"} <= set(importlib.import_module(
        "comfyquant.runtime.kernels.registry").kinds())


# ---- int4_rot ------------------------------------------------------------------------------------------------
def test_int4_pack_round_trip() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randint(-8, 8, (5, 34), generator=g, dtype=torch.int8)
    p = int4.pack_int4(v)
    assert p.dtype == torch.int8 and p.shape == (5, 17)
    assert torch.equal(int4.unpack_int4(p), v)
    # byte layout: even column in the low nibble
    assert int(int4.pack_int4(torch.tensor([[-1, 2]])).view(torch.uint8)) == 0x2F


@pytest.mark.comfyui
def test_int4_codec_matches_comfy_kitchen(comfy: Any) -> None:
    sv = importlib.import_module("comfy_kitchen.backends.eager.svdquant")
    g = torch.Generator().manual_seed(2)
    v = torch.randint(-8, 8, (7, 64), generator=g, dtype=torch.int8)
    assert torch.equal(int4.pack_int4(v), sv._pack_int4_row_major(v))
    p = torch.randint(-128, 128, (7, 32), generator=g, dtype=torch.int8)
    assert torch.equal(int4.unpack_int4(p), sv._unpack_int4_row_major(p))


@pytest.mark.comfyui
@pytest.mark.parametrize("group", [16, 256])
def test_w4a8_reference_matches_comfy_kitchen_eager(comfy: Any, group: int) -> None:
    cr = importlib.import_module("comfy_kitchen.backends.eager.convrot_w4a4")
    g = torch.Generator().manual_seed(group)
    n, k = 48, 512
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, ::37] *= 15.0  # outlier input channels
    x = torch.randn(6, k, generator=g) + 4.0 * (torch.rand(6, k, generator=g) > 0.98)
    bias = torch.randn(n, generator=g) * 0.1
    packed, scales = cr.quantize_convrot_w4a4_weight(w, convrot_groupsize=group)  # comfy-kitchen's own file data

    ours = int4_rot_linear(x, packed, scales, bias, convrot_group=group, out_dtype=torch.float32)
    # integer math and epilogue pinned down: float64 product of our dequantized operands
    x_rot = fast_hadamard(x.double(), group)
    qx, sx = quantize_rowwise(fast_hadamard(x.float(), group))
    w_deq = int4.unpack_int4(packed).double() * scales.double().reshape(-1, 1)
    assert _rel(ours, (qx.double() * sx.double()) @ w_deq.t() + bias.double()) < 1e-6
    # against comfy-kitchen's eager path on the same data, with its error to the exact product as the bound
    theirs = cr.convrot_w4a4_linear(x, packed, scales, bias, convrot_groupsize=group, linear_dtype="int8")
    exact = x_rot @ w_deq.t() + bias.double()
    e_ck = _rel(theirs, exact)
    assert _rel(ours, exact) <= e_ck  # 8-bit activations: never worse than its eager (4-bit activation) path
    assert _rel(ours, theirs) <= 1.5 * e_ck + 1e-6
    # and the float reference of the unrotated layer: int4 weight error dominates, rotation undone exactly
    assert _rel(ours, x.double() @ w.double().t() + bias.double()) < 0.2
    # weight-only path: same dequantized weight, activations unquantized
    yd = int4_rot_linear(x, packed, scales, bias, convrot_group=group, backend="dequant", out_dtype=torch.float32)
    assert _rel(yd, exact) < 1e-5


def test_int4_rot_checks_and_compile() -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-7, 8, (16, 64), generator=g)
    packed, s = int4.pack_int4(v), torch.rand(16, generator=g) + 0.1
    x = torch.randn(4, 64, generator=g)
    with pytest.raises(UserError, match="convrot group"):
        int4_rot_linear(x, packed, s, convrot_group=32)
    with pytest.raises(UserError, match="in_features"):
        int4_rot_linear(torch.randn(4, 32), packed, s, convrot_group=16)
    with pytest.raises(UserError, match="weight_scale"):
        int4_rot_linear(x, packed, torch.ones(3), convrot_group=16)
    f = torch.compile(lambda t: int4_rot_linear(t, packed, s, convrot_group=16), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), int4_rot_linear(x, packed, s, convrot_group=16))


def test_eager_plan_memo_still_validates_new_signatures() -> None:
    from comfyquant.runtime.kernels.dispatch import int8_linear

    g = torch.Generator().manual_seed(4)
    q, s = quantize_rowwise(torch.randn(16, 64, generator=g))
    x = torch.randn(3, 64, generator=g)
    y1 = int8_linear(x, q, s, torch.zeros(16))
    assert torch.equal(int8_linear(x, q, s, torch.zeros(16)), y1)  # memoized plan, same result
    with pytest.raises(UserError, match="bias"):
        int8_linear(x, q, s, torch.zeros(15))  # a new signature is checked again
    with pytest.raises(UserError, match="in_features"):
        int8_linear(torch.randn(3, 63), q, s)
    with pytest.raises(UserError, match="weight_scale"):
        int8_linear(x, q, torch.ones(8, 1))
    assert _rel(int8_linear(x, q, s, backend="dequant"), y1) < 0.05  # the requested backend is in the signature
