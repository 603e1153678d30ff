"""Linear kernels for the block-scaled formats (``nvfp4``, ``mxfp8``): a dequantizing reference for every device and
native block-scaled ``torch._scaled_mm`` for SM >= 10.

Kernel-table signature: ``impl(x, w, scales, bias, opts, out_dtype)`` with ``w`` the stored weight (nvfp4: uint8
``[N, K/2]``; mxfp8: fp8 ``[N, K]``), ``scales`` = (swizzled ``weight_scale``, ``weight_scale_2`` for nvfp4) and
no ``opts``. The native path quantizes the activations the way ComfyUI does (nvfp4: per-tensor global scale
``amax / (448 * 6)`` and e4m3 block scales; mxfp8: E8M0 block scales), swizzles their scales and hands both
operands to cuBLAS; ``emulate_scaled_mm`` evaluates the same operands in float64 with cuBLAS' semantics so the
operand preparation is tested on the CPU.

Nibble order: cuBLAS reads the first of two fp4 values from the LOW nibble; ComfyUI's nvfp4 (and our
activations, to match) put it in the HIGH nibble. Swapping the nibbles of both operands swaps K positions 2i and
2i+1 in A and B alike, inside one 16-block: the product is unchanged, so the stored weight goes in as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comfyquant.errors import UserError
from comfyquant.quant import fp4, mx, nvfp4, swizzle
from comfyquant.runtime.kernels.backends import BackendChoice, device_capability
from comfyquant.runtime.kernels.registry import KernelBackend, KernelKind, needs_cuda, register_kernel_kind

NATIVE_MIN_CAPABILITY = (10, 0)


@dataclass(frozen=True)
class BlockScaledOperands:
    """Inputs of one block-scaled GEMM ``a @ b^T``: ``a`` ``[M, K]`` / ``b`` ``[N, K]`` (fp4 packed: ``K/2`` bytes),
    swizzled flattened block scales, and ``alpha`` (nvfp4: product of the two global scales)."""

    recipe: str  # "nvfp4" | "mxfp8"
    a: torch.Tensor
    b: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor
    alpha: torch.Tensor | None
    k: int


def _x2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def nvfp4_operands(x2d: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   w_scale_2: torch.Tensor) -> BlockScaledOperands:
    """Quantize ``x2d`` to nvfp4 (dynamic global scale) and pair it with the stored weight."""
    codes, bs, g = nvfp4.quantize(x2d.float())
    return BlockScaledOperands(
        "nvfp4", fp4.pack_fp4(codes), w.view(torch.uint8), swizzle.swizzle(bs).reshape(-1),
        w_scale.view(torch.float8_e4m3fn).reshape(-1), (g * w_scale_2.float().reshape(())).reshape(()), x2d.shape[1])


def mxfp8_operands(x2d: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> BlockScaledOperands:
    """Quantize ``x2d`` to mxfp8 and pair it with the stored weight."""
    q, s = mx.quantize(x2d.float())
    return BlockScaledOperands(
        "mxfp8", q, w, swizzle.swizzle(s).view(torch.float8_e8m0fnu).reshape(-1),
        w_scale.view(torch.float8_e8m0fnu).reshape(-1), None, x2d.shape[1])


def _decode(ops: BlockScaledOperands, which: str) -> torch.Tensor:
    """float64 ``[R, K]`` of one operand as cuBLAS reads it (fp4: first element in the low nibble)."""
    data, scales = (ops.a, ops.scale_a) if which == "a" else (ops.b, ops.scale_b)
    rows, k = data.shape[0], ops.k
    if ops.recipe == "nvfp4":
        b = data.view(torch.uint8)
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(rows, k)
        vals = fp4.decode_e2m1(codes, torch.float64)
        block, sv = nvfp4.BLOCK, swizzle.unswizzle(scales.view(torch.float8_e4m3fn), rows, k // nvfp4.BLOCK)
        sv = sv.to(torch.float64)
    else:
        vals = data.to(torch.float64)
        block = mx.BLOCK
        sv = mx.e8m0_to_float(swizzle.unswizzle(scales.view(torch.uint8), rows, k // mx.BLOCK), torch.float64)
    return (vals.reshape(rows, -1, block) * sv.unsqueeze(-1)).reshape(rows, k)


def emulate_scaled_mm(ops: BlockScaledOperands) -> torch.Tensor:
    """float64 ``alpha * (a @ b^T)`` with the hardware's reading of the operands (CPU tests)."""
    out = _decode(ops, "a") @ _decode(ops, "b").T
    return out if ops.alpha is None else out * ops.alpha.to(torch.float64)


def scaled_mm(ops: BlockScaledOperands, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The native GEMM (SM >= 10): ``torch._scaled_mm`` with swizzled block scales, then alpha and bias."""
    if ops.recipe == "nvfp4":
        a, b = ops.a.view(torch.float4_e2m1fn_x2), ops.b.view(torch.float4_e2m1fn_x2)
    else:
        a, b = ops.a, ops.b
    if ops.alpha is None:
        bias = None if bias is None else bias.to(out_dtype)
        return torch._scaled_mm(a, b.t(), ops.scale_a, ops.scale_b, bias=bias, out_dtype=out_dtype)
    out = torch._scaled_mm(a, b.t(), ops.scale_a, ops.scale_b, out_dtype=torch.float32) * ops.alpha
    return (out if bias is None else out + bias.float()).to(out_dtype)


def native_supported(device: torch.device, recipe: str, k: int) -> bool:
    """Whether the native path runs here: CUDA SM >= 10 and a K cuBLAS takes (fp4: K % 32)."""
    cap = device_capability(device)
    if cap is None or cap < NATIVE_MIN_CAPABILITY:
        return False
    return k % (32 if recipe == "nvfp4" else mx.BLOCK) == 0


# ---- kernel-table implementations ---------------------------------------------------------------------------
def _reference(x: torch.Tensor, w_deq: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    y = F.linear(x, w_deq.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y.to(out_dtype)


def nvfp4_weight(w: torch.Tensor, w_scale: torch.Tensor, w_scale_2: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized ``[N, K]`` of a stored nvfp4 weight."""
    n, k = w.shape[0], w.shape[1] * 2
    bs = swizzle.unswizzle(w_scale.view(torch.float8_e4m3fn), n, k // nvfp4.BLOCK)
    return nvfp4.dequantize(fp4.unpack_fp4(w), bs, w_scale_2.float().reshape(()), dtype)


def mxfp8_weight(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized ``[N, K]`` of a stored mxfp8 weight."""
    n, k = w.shape
    return mx.dequantize(w, swizzle.unswizzle(w_scale.view(torch.uint8), n, k // mx.BLOCK), dtype)


def nvfp4_reference(x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                    bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """Any device: dequantize (float32, then the activation dtype) and ``F.linear``."""
    w_scale, w_scale_2 = scales[0], scales[1]
    assert w_scale is not None and w_scale_2 is not None
    return _reference(x, nvfp4_weight(w, w_scale, w_scale_2), bias, out_dtype)


def nvfp4_native(x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                 bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """SM >= 10: nvfp4 activations and weight through cuBLAS' block-scaled FP4 GEMM."""
    w_scale, w_scale_2 = scales[0], scales[1]
    assert w_scale is not None and w_scale_2 is not None
    ops = nvfp4_operands(_x2d(x), w, w_scale, w_scale_2)
    return scaled_mm(ops, bias, out_dtype).reshape(*x.shape[:-1], w.shape[0])


def mxfp8_reference(x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                    bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """Any device: dequantize (exact) and ``F.linear`` in the activation dtype."""
    assert scales[0] is not None
    return _reference(x, mxfp8_weight(w, scales[0]), bias, out_dtype)


def mxfp8_native(x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                 bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """SM >= 10: mxfp8 activations and weight through cuBLAS' block-scaled FP8 GEMM."""
    assert scales[0] is not None
    ops = mxfp8_operands(_x2d(x), w, scales[0])
    return scaled_mm(ops, bias, out_dtype).reshape(*x.shape[:-1], w.shape[0])


# ---- kernel kinds ---------------------------------------------------------------------------------------------
def _chooser(recipe: str):
    def choose(x: torch.Tensor, n: int, k: int, opts: tuple, policy) -> BackendChoice:
        allowed = getattr(policy, "allow", ()) or ("torch", "scaled_mm")
        if "scaled_mm" in allowed and native_supported(x.device, recipe, k):
            return BackendChoice("scaled_mm", f"SM >= 10: native block-scaled {recipe} _scaled_mm")
        cap = device_capability(x.device)
        where = x.device.type if cap is None else f"sm_{cap[0]}{cap[1]}"
        return BackendChoice("torch", f"{where}: no native {recipe}, weight dequantized to {x.dtype}")
    return choose


def _scale_numel(n: int, k: int, block: int) -> int:
    rows, cols = swizzle.swizzled_shape(n, k // block)
    return rows * cols


def _check_nvfp4(x: torch.Tensor, w: torch.Tensor, scales: tuple, opts: tuple) -> None:
    what = "nvfp4 linear"
    if w.dtype != torch.uint8:
        raise UserError(f"{what}: packed weight must be uint8 [N, K/2], got {w.dtype}")
    n, k = w.shape[0], 2 * w.shape[1]
    if len(scales) < 2 or scales[0] is None or scales[1] is None:
        raise UserError(f"{what}: needs scales=(weight_scale, weight_scale_2)")
    if k % nvfp4.BLOCK or scales[0].numel() != _scale_numel(n, k, nvfp4.BLOCK) or scales[1].numel() != 1:
        raise UserError(f"{what}: weight_scale of {scales[0].numel()} values / weight_scale_2 of "
                        f"{scales[1].numel()} do not fit weight [{n}, {k}]")


def _check_mxfp8(x: torch.Tensor, w: torch.Tensor, scales: tuple, opts: tuple) -> None:
    what = "mxfp8 linear"
    if w.dtype != torch.float8_e4m3fn:
        raise UserError(f"{what}: weight must be float8_e4m3fn [N, K], got {w.dtype}")
    n, k = w.shape
    if not scales or scales[0] is None or k % mx.BLOCK or scales[0].numel() != _scale_numel(n, k, mx.BLOCK):
        raise UserError(f"{what}: weight_scale does not fit weight [{n}, {k}] (one E8M0 per 32, swizzled)")


_NATIVE = needs_cuda(NATIVE_MIN_CAPABILITY)
NVFP4_KIND = register_kernel_kind(KernelKind(
    "nvfp4", {"torch": nvfp4_reference, "scaled_mm": KernelBackend(nvfp4_native, _NATIVE)},
    choose=_chooser("nvfp4"), in_features=lambda w, opts: 2 * int(w.shape[1]), check=_check_nvfp4))
MXFP8_KIND = register_kernel_kind(KernelKind(
    "mxfp8", {"torch": mxfp8_reference, "scaled_mm": KernelBackend(mxfp8_native, _NATIVE)},
    choose=_chooser("mxfp8"), check=_check_mxfp8))
