"""Warp-specialized W4A8 (``int4_rot``) GEMM for Hopper, in Gluon: the int4 weight unpacked into shared memory by
a partition of its own, so the MMA warp groups run the int8 W8A8 main loop (``gluon_gemm``) unchanged.

The Triton W4A8 kernels unpack the weight in the MMA's own warps and Triton waits on every wgmma whose operand is
built in registers, so unpacking and MMA never overlap within a program (``triton_gemm.w4a8_joined``: about half
the int8 GEMM's speed, run 67). Here a producer warp streams the int8 activations and the packed weight bytes
through a ring of shared-memory stages by TMA; an unpacking warp group turns each packed ``[BLOCK_N, BLOCK_K/2]``
tile into the int8 ``[BLOCK_N, BLOCK_K]`` tile wgmma reads (byte j's low / high nibble: columns 2j / 2j+1, the
natural K order, so the activations are not permuted) and arrives on the stage's ``ready`` barrier, whose other
arrival is the activation tile's TMA; the two consumer warp groups are ``gluon_gemm``'s, with its epilogue
(``acc * s_x[row] * s_w[col] + bias``): the same integer sums as every W4A8 kernel, so bit-equal outputs.

Barriers per stage: ``ready`` (2 arrivals: the producer's expect with A's bytes, the unpacker's arrive),
``packed`` (the weight bytes landed), ``empty`` (both consumers done with the stage's A and int8 B). The producer
waits ``empty`` before loading a stage's A and packed bytes, so a ``packed`` phase also means the consumers have
left the stage's int8 tile, which the unpacker may then overwrite. Pinned-only until timed on a GPU
(``benchmarks/bench_w4a8.py``, ``check_kernels_gpu.check_w4a8``)."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from comfyquant.runtime.kernels.gluon_gemm import (
    CONSUMER_REGS,
    PRODUCER_REGS,
    WG_ROWS,
    _consumer_default,
    _consumer_worker,
    _tile_of,
)

UNPACK_REGS = 96  # registers per thread of the unpacking warp group (one packed tile in flight)
W4A8_CONSUMER_REGS = 208  # the second consumer group's (the unpacker takes what gluon_gemm's would leave)
BLOCK_N = 128  # weight rows per tile (int8 tile 16 KB + packed 8 KB a stage beside A's 16 KB)
BLOCK_K = 128
STAGES = 4


@gluon.jit
def _producer(a_desc, p_desc, a_bufs, p_bufs, ready, packed, empty, M, N, K, CONFIG: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = p_desc.block_type.shape[0]
    HALF: gl.constexpr = p_desc.block_type.shape[1]
    GROUP_M: gl.constexpr = CONFIG[2]
    NSTAGES: gl.constexpr = CONFIG[3]
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BN, GROUP_M)
        for kk in range(k_tiles):
            s = it % NSTAGES
            mbarrier.wait(empty.index(s), ((it // NSTAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kk * BK], ready.index(s), a_bufs.index(s))
            mbarrier.expect(packed.index(s), p_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(p_desc, [pid_n * BN, kk * HALF], packed.index(s), p_bufs.index(s))
            it += 1


@gluon.jit
def _unpacker(p_bufs, b_bufs, ready, packed, M, N, K, CONFIG: gl.constexpr):
    """Each stage's packed weight bytes to its int8 tile (low nibble, high nibble: columns 2j, 2j+1)."""
    BN: gl.constexpr = p_bufs.shape[1]
    HALF: gl.constexpr = p_bufs.shape[2]
    BLOCK_M: gl.constexpr = 2 * WG_ROWS
    NSTAGES: gl.constexpr = CONFIG[3]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 8 packed bytes a thread, rows split
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, 2 * HALF)
    steps = gl.cdiv(num_tiles - gl.program_id(0), gl.num_programs(0)) * k_tiles  # this program's tiles' K steps
    for it in range(steps):
        s = it % NSTAGES
        mbarrier.wait(packed.index(s), (it // NSTAGES) & 1)
        p = p_bufs.index(s).load(layout)
        w = gl.join((p << 4) >> 4, p >> 4).reshape([BN, 2 * HALF])  # arithmetic shifts: sign-extended nibbles
        b_bufs.index(s).store(w)
        fence_async_shared()  # the generic-proxy stores before wgmma's (async-proxy) reads
        mbarrier.arrive(ready.index(s))


@gluon.jit(do_not_specialize=["M"])
def w4a8_ws(a_desc, p_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, M, N, K, ROW_SB: gl.constexpr,
            HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
            PRODUCER_REGS: gl.constexpr, UNPACK_REGS: gl.constexpr):
    """``C = (A @ unpack(P)^T) * s_x[:, None] * s_w + bias``: A ``[M, K]`` int8 in natural column order (per-row
    scales ``s_x``), P ``[N, K/2]`` packed int4 (byte j: columns 2j low, 2j+1 high), ``s_w`` per weight row when
    ``ROW_SB`` else one scalar, C bf16/fp16; one program per SM, K % BLOCK_K == 0."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = p_desc.block_type.shape[0]
    gl.static_assert(BLOCK_M == 2 * WG_ROWS, "two consumer warp groups of 64 rows each")
    gl.static_assert(p_desc.block_type.shape[1] * 2 == BK, "packed boxes: half the K step")
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BK], a_desc.layout)
    p_bufs = gl.allocate_shared_memory(p_desc.dtype, [STAGES, BN, BK // 2], p_desc.layout)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.int8)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, WG_ROWS, BN], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    packed = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    lr_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # A's TMA (the producer's expect) and the unpacker's arrive
        mbarrier.init(packed.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warp group
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(lr_bars.index(i), count=1)
    fence_async_shared()
    config: gl.constexpr = (ROW_SB, HAS_BIAS, GROUP_M, STAGES, False, False)  # cooperative, no low-rank term
    consumer_args = (c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, None,
                     None, c_bufs, c_bufs, lr_bars, config)
    gl.warp_specialize([
        (_consumer_default, consumer_args),
        (_consumer_worker, consumer_args),
        (_producer, (a_desc, p_desc, a_bufs, p_bufs, ready, packed, empty, M, N, K, config)),
        (_unpacker, (p_bufs, b_bufs, ready, packed, M, N, K, config)),
    ], [4, 1, 4], [CONSUMER_REGS, PRODUCER_REGS, UNPACK_REGS])


def descriptors(q: torch.Tensor, w_packed: torch.Tensor, out: torch.Tensor, block_n: int = BLOCK_N,
                block_k: int = BLOCK_K) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of A ``[M, K]`` int8, the packed weight ``[N, K/2]`` and C ``[M, N]`` (64-row halves)."""
    a_l = gl.NVMMASharedLayout.get_default_for([2 * WG_ROWS.value, block_k], gl.int8)
    p_l = gl.NVMMASharedLayout.get_default_for([block_n, block_k // 2], gl.int8)
    c_dt = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
    c_l = gl.NVMMASharedLayout.get_default_for([WG_ROWS.value, block_n], c_dt)
    return (TensorDescriptor.from_tensor(q, [2 * WG_ROWS.value, block_k], a_l),
            TensorDescriptor.from_tensor(w_packed, [block_n, block_k // 2], p_l),
            TensorDescriptor.from_tensor(out, [WG_ROWS.value, block_n], c_l))


def launch_args(q: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, sb: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, stages: int = STAGES, group_m: int = 8,
                programs: int = 132) -> tuple[tuple[int], tuple]:
    """(grid, every argument of :func:`w4a8_ws` in order) for ``out = W4A8(q, w_packed)``: ``q`` the unpermuted
    int8 codes, ``sb`` float32 weight scales (one per row or one)."""
    (m, k), n = q.shape, w_packed.shape[0]
    if k % BLOCK_K:
        raise ValueError(f"W4A8 on the warp-specialized kernel needs K % {BLOCK_K} == 0, got K = {k}")
    a_d, p_d, c_d = descriptors(q, w_packed, out)
    tiles = triton.cdiv(m, 2 * WG_ROWS.value) * triton.cdiv(n, BLOCK_N)
    return ((min(programs, tiles),),
            (a_d, p_d, c_d, s_x.reshape(-1), sb, bias if bias is not None else sb, m, n, k, sb.numel() > 1,
             bias is not None, group_m, stages, W4A8_CONSUMER_REGS, PRODUCER_REGS, UNPACK_REGS))


def gluon_w4a8(q: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(q @ unpack(w_packed)^T) * s_x * w_scale + bias`` on the warp-specialized kernel (2-D ``q``: int8 codes
    in natural column order, as :func:`triton_int8.w4a8_linear` makes them for the joined order)."""
    out = torch.empty((q.shape[0], w_packed.shape[0]), device=q.device, dtype=out_dtype)
    sb = w_scale.reshape(-1).float()
    programs = torch.cuda.get_device_properties(q.device).multi_processor_count
    grid, args = launch_args(q, s_x, w_packed, sb, bias, out, programs=programs)
    w4a8_ws[grid](*args, num_warps=4)
    return out


assert CONSUMER_REGS >= W4A8_CONSUMER_REGS  # the unpacker's registers come out of the second consumer's
