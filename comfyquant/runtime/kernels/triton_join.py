"""Triton kernel: ``cat((a, act(b)), -1)`` in one pass (a Flux single block's input to ``linear2``: the attention
output, then the MLP half of ``linear1``'s rows through its GELU).

Stock ComfyUI runs the GELU on the strided MLP half (torch's non-vectorized elementwise kernel: ~1.4 TB/s on an
H100, 163 µs at 4,608 x 12,288) and then ``torch.cat``; run 101's profile put ~2 ms of a 42 ms int8 Flux step there.
Here each program writes ``BLOCK`` columns of one joined row, reading them from ``a`` or, through the activation
(``act_kernels.input_act``'s codes, fp32), from ``b``; rows of either may be strided.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels.act_kernels import input_act
from comfyquant.runtime.kernels.configs import cdiv
from comfyquant.runtime.kernels.launch import FastKernel

BLOCK = 1024  # columns per program
WARPS = 4


@triton.jit(do_not_specialize=["KA", "KB", "s_a", "s_b", "s_o"])
def _join_act_kernel(a_ptr, b_ptr, out_ptr, KA, KB, s_a, s_b, s_o, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, column block): ``out[row, c] = a[row, c]`` for ``c < KA``, else ``act(b[row, c - KA])``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_a = cols < KA
    in_b = (cols >= KA) & (cols < KA + KB)
    x = tl.load(a_ptr + row * s_a + cols, mask=in_a, other=0.0).to(tl.float32)
    y = input_act(tl.load(b_ptr + row * s_b + (cols - KA), mask=in_b, other=0.0).to(tl.float32), ACT)
    tl.store(out_ptr + row * s_o + cols, tl.where(in_a, x, y).to(out_ptr.dtype.element_ty), mask=in_a | in_b)


_KERNEL = FastKernel(_join_act_kernel)


def join_act_launch(a: torch.Tensor, b: torch.Tensor, act: int, out: torch.Tensor) -> None:
    """Fill ``out`` (``[M, KA + KB]``, unit last stride) with ``a`` (``[M, KA]``) and ``act(b)`` (``[M, KB]``), both
    with a unit last stride; ``act`` one of ``act_kernels.input_act``'s codes. The caller checks shapes."""
    m, ka, kb = a.shape[0], a.shape[1], b.shape[1]
    args = (a, b, out, ka, kb, a.stride(0), b.stride(0), out.stride(0), act, BLOCK)
    key = (act, *((t.dtype, t.data_ptr() % 16 == 0) for t in (a, b, out)))
    _KERNEL((m, cdiv(ka + kb, BLOCK)), args, a.device, num_warps=WARPS, num_stages=1, key=key)
