"""One-launch W8A8 on a cooperative grid: every program quantizes a share of x's rows, all meet at a grid
barrier, then they walk the output tiles as the persistent GEMM does.

Why: in eager mode the two-launch W8A8 layer (activation kernel, then GEMM) pays two C launches of host time,
which at the host-bound sizes (M <= ~1024: Flux at 512², SDXL, T5) sets the layer's wall time. The earlier
one-launch kernel (``triton_gemm.fused``) re-derives its rows' scales in every column tile, which costs GPU time
from M = 256 on. Here each row is quantized once, by one program, with the activation tile kernel's own helpers
(``triton_quant``: the same codes and scales as the two-launch path), into the same scratch buffers; the GEMM
phase reads the codes back through L2.

The barrier: programs arrive on a two-word counter (``[arrived, generation]``, acq_rel atomics at GPU scope);
the last to arrive resets ``arrived`` and bumps ``generation``, which the others poll. It needs no host reset
and holds for any grid size, so one counter serves every layer issued on a stream (launches on a stream run in
order). The launch is cooperative (Triton's ``launch_cooperative_grid``): the driver makes every program
resident at once or fails the launch, never a hang.

Device code and its launch arguments; the eager plan is in ``triton_plans``, the backend in ``builtin``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels.configs import TileConfig, cdiv, next_power_of_2
from comfyquant.runtime.kernels.launch import FastKernel, device_facts
from comfyquant.runtime.kernels.triton_gemm import _mainloop, _store, _tile_of
from comfyquant.runtime.kernels.triton_quant import _put, _rowmax, _tile

QROWS_MAX = 16  # rows one program quantizes at a time
CHUNK_ELEMS = 8192  # x elements one program holds per step of the quantization phase


@triton.jit
def _grid_barrier(sync_ptr, programs):
    """Every one of the grid's ``programs`` waits here until all have arrived (see the module docstring)."""
    tl.debug_barrier()  # this program's quantization stores are issued before it arrives
    gen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        cur = gen
        while cur == gen:
            cur = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit(do_not_specialize=["M", "programs"])
def w8a8_coop(x_ptr, q_ptr, s_ptr, b_ptr, c_ptr, sb_ptr, bias_ptr, sync_ptr, programs, M, N, K, stride_xm, stride_qm,
              stride_bn, stride_cm, ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
              QROWS: tl.constexpr, QCOLS: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
              HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr, ACT: tl.constexpr):
    """x [M, K] (16/32-bit, after the elementwise input activation ``ACT``) -> per-row int8 codes q and scales s
    (phase 1, ``QROWS`` rows x ``QCOLS`` columns at a time) -> ``(q @ w^T) * s * w_scale + bias (+ h @ u)``
    (phase 2, ``BLOCK_M`` x ``BLOCK_N`` tiles in grouped order), one barrier between; ``programs``: the grid
    size."""
    pid = tl.program_id(0)
    rows0 = tl.arange(0, QROWS)
    cols = tl.arange(0, QCOLS)
    for rb in range(pid, tl.cdiv(M, QROWS), programs):
        rows = rb * QROWS + rows0
        rmask = rows < M
        x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
        amax = tl.zeros((QROWS,), dtype=tl.float32)
        for c0 in range(0, K, QCOLS):
            amax = tl.maximum(amax, _rowmax(_tile(x_tile + c0, rmask, c0 + cols < K, 0, K, 0, ACT)))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
        tl.store(s_ptr + rows, scale, mask=rmask)
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
        for c0 in range(0, K, QCOLS):
            cmask = c0 + cols < K
            _put(q_rows, c0 + cols, _tile(x_tile + c0, rmask, cmask, 0, K, 0, ACT), scale, 127.0, rmask, cmask,
                 0, 0)
    _grid_barrier(sync_ptr, programs)
    for tile in range(pid, tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), programs):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # q and s were written by other programs in this launch: read them through L2 (".cg"), never L1
        acc = _mainloop(q_ptr, b_ptr, M, N, K, stride_qm, stride_bn, pid_m, pid_n, tl.int32, BLOCK_M, BLOCK_N,
                        BLOCK_K, EVEN_K, False, 0, "")
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        s_rows = tl.load(s_ptr + offs_m, mask=offs_m < M, other=0.0, cache_modifier=".cg")
        _store(acc.to(tl.float32) * s_rows[:, None], sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
               BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@functools.cache
def kernel() -> FastKernel:
    """The cooperative kernel's launcher (compiled with ``launch_cooperative_grid``)."""
    return FastKernel(w8a8_coop, launch_cooperative_grid=True)


def quant_tile(m: int, k: int, programs: int) -> tuple[int, int]:
    """(rows, columns) per step of the quantization phase: rows spread over the programs (up to
    :data:`QROWS_MAX`), columns the rest of :data:`CHUNK_ELEMS` (the whole row where it fits)."""
    rows = min(QROWS_MAX, next_power_of_2(max(1, cdiv(m, programs))))
    return rows, max(16, min(next_power_of_2(k), CHUNK_ELEMS // rows))


def programs(m: int, n: int, cfg: TileConfig, sms: int) -> int:
    """Grid size: one program per output tile, at most one per SM (all must be resident at once)."""
    return max(1, min(sms, cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)))


def launch_args(x2d: torch.Tensor, q: torch.Tensor, s: torch.Tensor, w_q: torch.Tensor, sb: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, sync: torch.Tensor, cfg: TileConfig,
                lr: tuple[tuple, tuple], act: int) -> tuple[tuple[int], tuple, tuple]:
    """(grid, args, key) of :func:`w8a8_coop`: x at ``args[0]``, q / s at 1 / 2, the output at 4, the barrier
    counter at 7 (``lr``: ``triton_int8._low_rank_args``' pair)."""
    (m, k), n = x2d.shape, w_q.shape[0]
    # off CUDA (Triton's interpreter, which runs programs one after another) one program: no one to wait for
    p = programs(m, n, cfg, device_facts(x2d.device)[0] if x2d.is_cuda else 1)
    qrows, qcols = quant_tile(m, k, p)
    lr_args, lr_key = lr
    has_bias = bias is not None
    b_arg = bias if has_bias else sb
    args = (x2d, q, s, w_q, out, sb, b_arg, sync, p, m, n, k, x2d.stride(0), q.stride(0), w_q.stride(0),
            out.stride(0), sb.numel() > 1, has_bias, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,
            k % cfg.block_k == 0, qrows, qcols, *lr_args, act)
    key = (cfg, p, qrows, qcols, x2d.dtype, out.dtype, n, k, x2d.stride(0), q.stride(0), w_q.stride(0),
           out.stride(0), sb.numel() > 1, has_bias, _al(x2d), _al(w_q), _al(sb), _al(b_arg), lr_key, act)
    return (p,), args, key


def _al(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0
