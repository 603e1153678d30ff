"""nvfp4 / mxfp8 linear kernels on the CPU: the dequantizing reference against float64, and the native
block-scaled ``_scaled_mm`` path's operands (activation quantization, swizzled scales, packed fp4, global scale)
evaluated with cuBLAS' semantics in float64 (``emulate_scaled_mm``): exactly the product of the dequantized
operands, within the activation-quantization bound of ``x @ W^T``, and failing when a scale layout is wrong.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyquant.formats import quantize_weight
from comfyquant.quant import mx, nvfp4, swizzle
from comfyquant.runtime.kernels import blockscaled as bk
from comfyquant.testing.synthetic import student_t4

SHAPES = [(5, 256, 48), (130, 512, 200)]  # (M, K, N): M and N off the 128-row scale tiles


def _case(m: int, k: int, n: int, fmt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(m + k + n)
    w = student_t4(n * k, g).reshape(n, k) * 0.02
    x = torch.randn(m, k, generator=g) * 1.5
    x[:, 3] *= 30.0  # an outlier channel, as activations have
    return x, quantize_weight(w, fmt).tensors, torch.randn(n, generator=g) * 0.01


def _act_error_bound(x64: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise bound on |Q(x) - x| for the activation quantizer (see formats round-trip bounds)."""
    if fmt == "nvfp4":
        _, bs, g = nvfp4.quantize(x64.float())
        unit = (g * bs.float()).double().repeat_interleave(nvfp4.BLOCK, 1)  # the float32 scale the codes used
        return torch.maximum(unit, x64.abs() - 6 * unit)
    _, s = mx.quantize(x64.float())
    unit = mx.e8m0_to_float(s, torch.float64).repeat_interleave(mx.BLOCK, 1)
    return 2.0**-4 * x64.abs() + 2.0**-10 * unit


def _operands(fmt: str, x: torch.Tensor, t: dict[str, torch.Tensor]) -> bk.BlockScaledOperands:
    if fmt == "nvfp4":
        return bk.nvfp4_operands(x, t["weight"], t["weight_scale"], t["weight_scale_2"])
    return bk.mxfp8_operands(x, t["weight"], t["weight_scale"])


def _weight64(fmt: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if fmt == "nvfp4":
        return bk.nvfp4_weight(t["weight"], t["weight_scale"], t["weight_scale_2"], torch.float64)
    return bk.mxfp8_weight(t["weight"], t["weight_scale"], torch.float64)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
@pytest.mark.parametrize("mkn", SHAPES)
def test_reference_kernel_matches_float64(fmt: str, mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    x, t, bias = _case(m, k, n, fmt)
    impl = bk.nvfp4_reference if fmt == "nvfp4" else bk.mxfp8_reference
    scales = (t["weight_scale"], t.get("weight_scale_2"))
    w64 = _weight64(fmt, t)
    ref = x.double() @ w64.T + bias.double()
    base = x.double().abs() @ w64.abs().T + bias.double().abs()
    y = impl(x.reshape(1, m, k), t["weight"], scales, bias, (), torch.float32)
    assert y.shape == (1, m, n) and y.dtype == torch.float32
    assert bool(((y.reshape(m, n).double() - ref).abs() <= (k + 16) * 2.0**-24 * base).all())
    yb = impl(x.bfloat16(), t["weight"], scales, bias, (), torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and bool(((yb.double() - ref).abs() <= 2.0**-6 * base + 1e-6).all())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
@pytest.mark.parametrize("mkn", SHAPES)
def test_native_operands_compute_the_quantized_product(fmt: str, mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    x, t, _ = _case(m, k, n, fmt)
    ops = _operands(fmt, x, t)
    rows_a = swizzle.swizzled_shape(m, k // (nvfp4.BLOCK if fmt == "nvfp4" else mx.BLOCK))
    assert ops.scale_a.numel() == rows_a[0] * rows_a[1] and ops.scale_a.dim() == ops.scale_b.dim() == 1
    got = bk.emulate_scaled_mm(ops)
    # exactly the product of the dequantized activation quantization and the dequantized weight
    if fmt == "nvfp4":
        codes, bs, g = nvfp4.quantize(x)
        xq = nvfp4.dequantize(codes, bs, g, torch.float64)
    else:
        q, s = mx.quantize(x)
        xq = mx.dequantize(q, s, torch.float64)
    w64 = _weight64(fmt, t)
    want = xq @ w64.T
    rtol = 2.0**-23 if fmt == "nvfp4" else 1e-12  # nvfp4's alpha = global_x * global_w is one float32 product
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12 * float(want.abs().max()))
    # and within the activation quantizer's bound of the float64 reference x @ W^T
    bound = _act_error_bound(x.double(), fmt) @ w64.abs().T
    assert bool(((got - x.double() @ w64.T).abs() <= bound * (1 + 1e-9) + 1e-12).all())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_emulation_catches_wrong_operand_layouts(fmt: str) -> None:
    x, t, _ = _case(130, 512, 200, fmt)
    ops = _operands(fmt, x, t)
    good = bk.emulate_scaled_mm(ops)
    block = nvfp4.BLOCK if fmt == "nvfp4" else mx.BLOCK
    plain_a = swizzle.unswizzle(ops.scale_a.view(torch.uint8), 130, 512 // block)
    padded = torch.zeros(swizzle.swizzled_shape(130, 512 // block), dtype=torch.uint8)
    padded[:130, :] = plain_a
    bad = [dataclasses.replace(ops, scale_a=padded.reshape(-1).view(ops.scale_a.dtype))]  # scales not swizzled
    if fmt == "nvfp4":
        a = ops.a.view(torch.uint8)
        bad.append(dataclasses.replace(ops, a=(a << 4) | (a >> 4)))  # nibble order differing between A and B
        bad.append(dataclasses.replace(ops, alpha=ops.alpha * 1.01))  # a global scale off by 1%
    for wrong in bad:
        err = (bk.emulate_scaled_mm(wrong) - good).abs().max()
        assert float(err) > 1e-3 * float(good.abs().max())


def test_native_path_is_not_chosen_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert not bk.native_supported(cpu, "nvfp4", 256) and not bk.native_supported(cpu, "mxfp8", 256)
