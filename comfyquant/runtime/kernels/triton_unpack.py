"""``int4_rot`` on the W8A8 GEMM: the packed int4 weight unpacked to int8 codes in one pass, then the int8 path.

Triton's W4A8 GEMM unpacks the nibbles in registers and feeds them to the MMA as its register operand, and
Triton waits for every such wgmma to finish before the next (``pendings=0``): on the H200 it ran 0.52-1.15x
bf16 where the int8 W8A8 GEMM runs 1.45-1.93x (runs 64-69). From a few hundred rows it is faster to write the
codes out (one pass: 0.5 byte read and 1 byte written per weight element) and run the W8A8 GEMM on them. The
codes are the same integers (int4's -8..7 are int8 codes) and the activation pass the same rotation and per-row
int8, so the output is bit-equal to the W4A8 kernel's: int32 sums are exact in any order, and both share the
float32 epilogue.

The unpacked weight goes to a per-stream workspace (``scratch.WeightWorkspace``: one buffer grown to the
largest layer), so a model keeps its 4-bit weights plus one int8 layer's worth of scratch. Launches on one
stream run in issue order: the next layer's unpack starts after this layer's GEMM has read the buffer.
Imported lazily: only GPU backends (and the CPU interpreter tests) import this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels import scratch, triton_int8, triton_plans
from comfyquant.runtime.kernels.acts import Norm
from comfyquant.runtime.kernels.configs import cdiv
from comfyquant.runtime.kernels.launch import FastKernel, stream_id
from comfyquant.runtime.kernels.triton_gemm import nibble_codes

BLOCK_N, BLOCK_KH = 32, 128  # rows x packed bytes per program: 4 KB read, 8 KB written


@triton.jit
def unpack_int4_kernel(w_ptr, out_ptr, N, KH, stride_w, stride_o, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
    """``out[:, 2j] = low nibble of w[:, j]``, ``out[:, 2j + 1] = high nibble``, both two's-complement int4, as
    int8 (comfy-kitchen's packing, ``quant.int4.pack_int4``)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
    rows = offs_n.to(tl.int64)[:, None]
    mask = (offs_n < N)[:, None] & (offs_k < KH)[None, :]
    codes = nibble_codes(tl.load(w_ptr + rows * stride_w + offs_k[None, :], mask=mask, other=0), BLOCK_N,
                         2 * BLOCK_KH)
    offs_o = tl.program_id(1) * (2 * BLOCK_KH) + tl.arange(0, 2 * BLOCK_KH)
    omask = (offs_n < N)[:, None] & (offs_o < 2 * KH)[None, :]
    tl.store(out_ptr + rows * stride_o + offs_o[None, :], codes.to(tl.int8), mask=omask)


_UNPACK = FastKernel(unpack_int4_kernel)


def _launch(w_packed: torch.Tensor, out: torch.Tensor) -> tuple[tuple[int, int], tuple]:
    n, kh = w_packed.shape
    return (cdiv(n, BLOCK_N), cdiv(kh, BLOCK_KH)), (w_packed, out, n, kh, w_packed.stride(0), out.stride(0),
                                                     BLOCK_N, BLOCK_KH)


def _key(args: tuple) -> tuple:
    """The launch's caller key: the generic one (what Triton specializes each argument on)."""
    return _UNPACK.key(args, 4, 1)


def unpack_int4_into(w_packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (int8 ``[N, K]``, rows contiguous) filled with the codes of ``w_packed`` (int8 ``[N, K/2]``)."""
    w_packed = triton_int8._contig_rows(w_packed)
    grid, args = _launch(w_packed, out)
    _UNPACK(grid, args, w_packed.device, num_warps=4, num_stages=1, key=_key(args))
    return out


def _workspace_codes(w_packed: torch.Tensor, stream: int) -> torch.Tensor:
    n, kh = w_packed.shape
    return scratch.weight_workspace(w_packed.device).codes(stream, n, 2 * kh)


def w4_unpacked_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       group: int, out_dtype: torch.dtype, low_rank: triton_int8.LowRank | None = None,
                       act: int = 0, norm: Norm | None = None) -> torch.Tensor:
    """``w4a8_linear``'s result (bit-equal) by unpacking W into the stream's workspace and running
    ``int8_linear`` on the codes (rotation ``group``, input activation ``act`` or folded ``norm``, low-rank term
    as it takes them)."""
    w8 = unpack_int4_into(w_packed, _workspace_codes(w_packed, stream_id(x.device)))
    return triton_int8.int8_linear(x, w8, w_scale, bias, group, out_dtype, low_rank=low_rank, act=act, norm=norm)


def plan_w4_unpacked(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     group: int, out_dtype: torch.dtype, act: int = 0,
                     low_rank: triton_int8.LowRank | None = None,
                     norm: Norm | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The eager plan of :func:`w4_unpacked_linear` for ``x``'s signature, or None: the unpack launch into this
    stream's workspace buffer, then the W8A8 plan made on that buffer. It keeps the buffer (a grown workspace
    retires it, the plan still owns it); a call on another stream takes the general path."""
    w_packed = triton_int8._contig_rows(w_packed)
    stream = triton_plans.raw_stream(x.device)
    st0 = stream()
    w8 = _workspace_codes(w_packed, st0)
    grid, args = _launch(w_packed, w8)
    fire_u = _UNPACK.prepared(grid, args, num_warps=4, num_stages=1, key=_key(args))
    inner = triton_plans.plan_int8(x, w8, w_scale, bias, group, out_dtype, act, low_rank, norm)
    if fire_u is None or inner is None:
        return None

    def run(xc: torch.Tensor) -> torch.Tensor:
        st = stream()
        if st != st0:
            return w4_unpacked_linear(xc, w_packed, w_scale, bias, group, out_dtype, low_rank, act, norm)
        fire_u(st, *args)
        return inner(xc)

    return run
