"""QuantizedTensor and its layouts on the CPU: error bounds against float64, linear bounds, generic ops, fallback.

Bounds used (s = the scale that applies to an element):
- int8 weight: round-to-nearest gives |W - Ŵ| <= s/2 per element (s per tensor, per row or per tile).
- int8 rotated: the error e is bounded by s/2 in the rotated basis and H is orthogonal, so each row's L2
  error ||W_n - Ŵ_n||_2 <= sqrt(K) * s_n / 2.
- fp8 with m mantissa bits: |W - Ŵ| <= 2^-(m+1) |W| + s * (half the subnormal step): e4m3 m=3, step 2^-9;
  e5m2 m=2, step 2^-16.
- W8A8 linear against the float64 product with the *dequantized* weight: activations are quantized per token
  with s_x = rowmax|x| / 127, so |x - x_q| <= s_x/2 and |y_mn - ŷ_mn| <= s_x,m / 2 * Σ_k |Ŵ_nk| (rotated layers:
  the same with x H and the stored rotated weight). fp8 activations: |Δx| <= 2^-(m+1)|x| + s_x * step/2.
A relative slack of 1e-5 covers float32 accumulation.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.runtime import REGISTRY, QuantizedTensor, register_layout_op
from comfyquant.runtime.layouts import Fp8Layout, Int8Layout

pytestmark = pytest.mark.cpu_int8

CASES = {
    "int8-row": ("int8_tensorwise", {}),
    "int8-tensor": ("int8_tensorwise", {"per_row": False}),
    "int8-rot": ("int8_tensorwise", {"convrot": True, "convrot_groupsize": 64}),
    "int8-block": ("int8_blockwise", {"block_size": 32}),
    "fp8": ("float8_e4m3fn", {}),
    "fp8-e5m2": ("float8_e5m2", {}),
}
FP8_BITS = {torch.float8_e4m3fn: (3, 2.0 ** -9), torch.float8_e5m2: (2, 2.0 ** -16)}


def _weight(n: int = 96, k: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3] *= 20  # one loud row: per-row and per-tile scales matter
    return w


@pytest.mark.parametrize("case", CASES)
def test_dequantize_error_within_rounding_bound(case: str) -> None:
    layout, kw = CASES[case]
    w = _weight()
    qt = QuantizedTensor.from_float(w, layout, **kw)
    assert qt.shape == w.shape and qt.dtype == w.dtype and qt.layout_name == layout
    deq = qt.dequantize().double()
    err = (deq - w.double()).abs()
    p = qt.params
    if case == "int8-rot":
        s = p.scale.double().reshape(-1)
        row_l2 = err.pow(2).sum(1).sqrt()
        assert bool((row_l2 <= math.sqrt(w.shape[1]) * s / 2 * (1 + 1e-5)).all())
        assert float(err.max()) > 0
    elif layout.startswith("int8"):
        if case == "int8-block":
            b = p.block_size
            s = p.scale.double().repeat_interleave(b, 0).repeat_interleave(b, 1)[: w.shape[0], : w.shape[1]]
        else:
            s = p.scale.double().expand_as(err) if p.scale.numel() > 1 else p.scale.double()
        assert bool((err <= s / 2 * (1 + 1e-5)).all())
        assert int(qt.qdata.abs().max()) == 127
    else:
        m, step = FP8_BITS[qt.storage_dtype]
        bound = 2.0 ** -(m + 1) * w.double().abs() + float(p.scale) * step / 2
        assert bool((err <= bound * (1 + 1e-5)).all())


def _linear_bound(x: torch.Tensor, w_used: torch.Tensor, fp8: torch.dtype | None) -> torch.Tensor:
    """Per-output bound of the activation-quantization error (see module docstring)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    amax = x64.abs().amax(1, keepdim=True)
    if fp8 is None:
        dx = (amax / 127 / 2).expand_as(x64)
    else:
        m, step = FP8_BITS[fp8]
        dx = 2.0 ** -(m + 1) * x64.abs() + amax / torch.finfo(fp8).max * step / 2
    return dx @ w_used.double().abs().t()


@pytest.mark.parametrize("case", CASES)
def test_linear_matches_float64_within_activation_bound(case: str) -> None:
    layout, kw = CASES[case]
    w = _weight()
    bias = torch.randn(w.shape[0]) * 0.1
    x = torch.randn(3, 5, w.shape[1], generator=torch.Generator().manual_seed(1))
    x[0, 0] *= 30  # an outlier token
    qt = QuantizedTensor.from_float(w, layout, **kw)
    y = F.linear(x, qt, bias)
    assert y.shape == (3, 5, w.shape[0]) and y.dtype == torch.float32
    ref = (x.double() @ qt.dequantize().double().t() + bias.double()).reshape(-1, w.shape[0])
    if case == "int8-rot":
        # the kernel quantizes x H against the stored rotated weight
        w_used = qt.qdata.double() * qt.params.scale.double()
        x_used = fast_hadamard(x.double(), qt.params.convrot_groupsize)
        bound = _linear_bound(x_used, w_used, None)
    else:
        w_used = qt.dequantize()
        bound = _linear_bound(x, w_used, qt.storage_dtype if layout.startswith("float8") else None)
    err = (y.double().reshape(-1, w.shape[0]) - ref).abs()
    slack = 1e-5 * (x.double().abs().reshape(-1, w.shape[1]) @ w_used.double().abs().t()) + 1e-6
    assert bool((err <= bound + slack).all()), float((err - bound).max())
    assert float(err.max()) > 0  # activations really were quantized


@pytest.mark.parametrize("case", ["int8-row", "int8-rot", "fp8"])
def test_dequant_backend_is_exact_weight_only(case: str) -> None:
    layout, kw = CASES[case]
    w = _weight()
    qt = QuantizedTensor.from_float(w, layout, backend="dequant", **kw)
    x = torch.randn(4, w.shape[1], dtype=torch.float64).float()
    y = F.linear(x, qt)
    ref = x.double() @ qt.dequantize().double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_generic_ops_keep_the_tensor_quantized() -> None:
    w = _weight()
    qt = QuantizedTensor.from_float(w, "int8_tensorwise")
    c = qt.clone()
    assert isinstance(c, QuantizedTensor) and c.qdata.data_ptr() != qt.qdata.data_ptr()
    c.qdata.zero_()
    assert int(qt.qdata.abs().max()) == 127  # the clone owns its storage
    d = qt.detach()
    assert isinstance(d, QuantizedTensor) and d.qdata.data_ptr() == qt.qdata.data_ptr()
    b = qt.to(torch.bfloat16)
    assert isinstance(b, QuantizedTensor) and b.dtype == torch.bfloat16 and b.qdata.dtype == torch.int8
    torch.testing.assert_close(b.dequantize(), qt.dequantize().to(torch.bfloat16))
    assert qt.to("cpu") is qt and qt.to(torch.device("cpu"), torch.float32) is qt
    moved = qt.to("cpu", copy=True)
    assert isinstance(moved, QuantizedTensor) and moved.qdata.data_ptr() != qt.qdata.data_ptr()
    assert qt.contiguous() is qt and qt.is_contiguous()
    assert not qt.is_pinned()
    e = torch.empty_like(qt)
    assert isinstance(e, QuantizedTensor) and e.shape == qt.shape and e.qdata.dtype == torch.int8
    assert qt.nbytes == w.numel() + w.shape[0] * 4  # int8 storage + fp32 row scales


def test_copy_from_quantized_and_from_float() -> None:
    w1, w2 = _weight(seed=1), _weight(seed=2)
    dst = QuantizedTensor.from_float(w1, "int8_tensorwise")
    src = QuantizedTensor.from_float(w2, "int8_tensorwise")
    ptr = dst.qdata.data_ptr()
    dst.copy_(src)
    assert dst.qdata.data_ptr() == ptr and torch.equal(dst.dequantize(), src.dequantize())
    dst.copy_(w1)  # a float source is quantized with dst's layout options
    torch.testing.assert_close(dst.dequantize(), QuantizedTensor.from_float(w1, "int8_tensorwise").dequantize())
    with pytest.raises(TypeError):
        dst.copy_(QuantizedTensor.from_float(w1, "float8_e4m3fn"))


@pytest.mark.parametrize("case", ["int8-row", "int8-tensor", "int8-rot", "fp8"])
def test_transpose_and_mm_fast_path(case: str) -> None:
    layout, kw = CASES[case]
    w = _weight()
    qt = QuantizedTensor.from_float(w, layout, **kw)
    t = qt.t()
    assert isinstance(t, QuantizedTensor) and t.shape == (w.shape[1], w.shape[0])
    torch.testing.assert_close(t.dequantize(), qt.dequantize().t())
    x = torch.randn(6, w.shape[1])
    bias = torch.randn(w.shape[0])
    torch.testing.assert_close(torch.mm(x, t), F.linear(x, qt))  # same kernel, same numbers
    torch.testing.assert_close(torch.addmm(bias, x, t), F.linear(x, qt, bias))


@pytest.mark.parametrize("case", ["int8-tensor", "fp8"])
def test_reshape_of_scalar_scaled_weights_stays_quantized(case: str) -> None:
    layout, kw = CASES[case]
    qt = QuantizedTensor.from_float(_weight(), layout, **kw)
    r = qt.reshape(-1)
    assert isinstance(r, QuantizedTensor) and r.shape == (qt.numel(),)
    torch.testing.assert_close(r.dequantize(), qt.dequantize().reshape(-1))
    v = qt.view(48, 384)
    assert isinstance(v, QuantizedTensor)
    torch.testing.assert_close(v.dequantize(), qt.dequantize().view(48, 384))


def test_unsupported_ops_fall_back_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    qt = QuantizedTensor.from_float(_weight(), "int8_tensorwise")  # per-row: no reshape
    caplog.set_level(logging.INFO, logger="comfyquant.runtime")
    REGISTRY._logged.discard(("aten.mul.Tensor", "int8_tensorwise"))
    out1 = qt * 2
    out2 = qt * 3
    assert type(out1) is torch.Tensor
    torch.testing.assert_close(out1, qt.dequantize() * 2)
    torch.testing.assert_close(out2, qt.dequantize() * 3)
    lines = [r for r in caplog.records if "aten.mul.Tensor" in r.getMessage()]
    assert len(lines) == 1 and "int8_tensorwise" in lines[0].getMessage()
    flat = qt.reshape(-1)  # per-row scales cannot follow a flattening view
    assert type(flat) is torch.Tensor
    torch.testing.assert_close(flat, qt.dequantize().reshape(-1))


def test_register_layout_op_takes_precedence_over_fallback() -> None:
    class Int8Doubling(Int8Layout):
        name = "test_int8_doubling"

    calls = []

    @register_layout_op(torch.ops.aten.mul.Tensor, Int8Doubling)
    def _mul(func, args, kwargs):
        calls.append(func)
        return args[0].dequantize() * args[1] * 2

    qt = QuantizedTensor.from_float(_weight(), Int8Doubling)
    torch.testing.assert_close(qt * 1.5, qt.dequantize() * 3.0)
    assert calls == [torch.ops.aten.mul.Tensor]
    with pytest.raises(ValueError, match="already registered"):
        register_layout_op(torch.ops.aten.mul.Tensor, Int8Doubling)(_mul)
    # the base layout still has no mul handler: it falls back
    base = QuantizedTensor.from_float(_weight(), Int8Layout)
    torch.testing.assert_close(base * 1.5, base.dequantize() * 1.5)


def test_fp8_static_input_scale_saturates_like_comfyui() -> None:
    w = _weight()
    qt = QuantizedTensor.from_float(w, Fp8Layout, input_scale=0.01)
    x = torch.randn(4, w.shape[1])
    x[0, 0] = 100.0  # 100 / 0.01 = 1e4 > 448: clamps to 448 * 0.01 = 4.48
    y = F.linear(x, qt)
    xq = (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).double() * 0.01
    ref = xq @ qt.dequantize().double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_full_precision_matrix_mult_computes_in_float() -> None:
    w = _weight()
    qt = QuantizedTensor.from_float(w, "int8_tensorwise", full_precision=True)
    x = torch.randn(4, w.shape[1])
    torch.testing.assert_close(F.linear(x, qt), F.linear(x, qt.dequantize()), rtol=0, atol=0)
    assert qt.comfy_quant() == {"format": "int8_tensorwise", "full_precision_matrix_mult": True}
    rot = QuantizedTensor.from_float(w, "int8_tensorwise", convrot=True, convrot_groupsize=64)
    assert rot.comfy_quant() == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
