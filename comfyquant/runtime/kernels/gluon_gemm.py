"""Warp-specialized persistent W8A8 GEMM for Hopper, in Gluon (Triton's lower-level dialect, triton >= 3.6).

Plain Triton has no warp specialization on sm_90 (``tl.range(warp_specialize=True)`` is Blackwell-only in 3.6),
so its pipelined W8A8 kernel issues the TMA loads, the wgmma and the epilogue from the same warps. Here the work
is split as cuBLAS's cooperative kernels split it: one producer warp streams A/B tiles through a ring of shared-
memory stages (``ready`` / ``empty`` mbarriers), two consumer warp groups each own half of the output tile's rows
(wgmma on int8 operands into int32, or on fp8 ones into float32 partials promoted per K step), and each writes its
half through shared memory with a TMA store that overlaps the next tile's main loop. The epilogue is
``w8a8_tma``'s: ``acc * s_x[row] * s_w[col] + bias`` in float32, in that order, so both kernels produce bit-equal
outputs.

``configs.ws_config`` picks its tile (128x128; 128x64 below 1,024 rows where that fills the SMs' waves better) for
int8 W8A8 layers on sm_90 on the shapes ``configs.ws_shape`` gives it (from 256 rows), a LoRA's
low-rank term in its epilogue included (``HAS_LR``, ``configs.WS_LOW_RANK``); the runtime launches it through
``triton_int8._ws_launch`` and the plans; ``gluon_w8a8`` is a plain launch for benchmarks and checks. fp8
layers take it too since ``configs.WS_FP8`` (run 52: 1.77x bf16 GEMM alone on Flux / Wan at M >= 4096, cuBLAS fp8
1.76x; run 27's form, which let ptxas serialize its wgmma, 1.14-1.35x). Measured and not picked: a ping-pong
schedule (``PINGPONG``, within 3% of the cooperative one; run 27, docs/KERNEL_NOTES.md).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

WG_ROWS = gl.constexpr(64)  # rows of the output tile per consumer warp group (wgmma's M)
CONSUMER_REGS = 232  # registers per thread of the second consumer warp group (setmaxnreg); the first gets the rest
PRODUCER_REGS = 40  # the producer warp only issues TMA copies


@gluon.jit
def _tile_of(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    # the grouped order of triton_gemm._tile_of: GROUP_M row tiles share each column sweep (B stays in L2)
    num_m = gl.cdiv(M, BLOCK_M)
    num_n = gl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@gluon.jit
def _stage(a_bufs, b_bufs, ready, it, WG: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """Ring slot ``it``'s A rows of warp group ``WG`` (all rows with ``PINGPONG``) and B^T, once its loads landed."""
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    a = a_bufs.index(s)
    if not PINGPONG:
        a = a.slice(WG * WG_ROWS, WG_ROWS, dim=0)
    return a, b_bufs.index(s).permute((1, 0))


@gluon.jit
def _mainloop_exact(a_bufs, b_bufs, ready, empty, it, k_tiles, WG: gl.constexpr, ROWS: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, layout: gl.constexpr):
    """int8 operands: every K step's wgmma into one int32 accumulator (exact), one step in flight behind the
    next; a step's ring slot is released once its wgmma is done. Returns (accumulator, next ring index)."""
    acc = gl.zeros((ROWS, BLOCK_N), dtype=gl.int32, layout=layout)
    for kk in range(k_tiles):
        a, b = _stage(a_bufs, b_bufs, ready, it, WG, STAGES, PINGPONG)
        acc = warpgroup_mma(a, b, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))  # the previous step's wgmma is done: release its stage
        if kk > 0:
            mbarrier.arrive(empty.index((it - 1) % STAGES))
        it += 1
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(empty.index((it - 1) % STAGES))
    return acc, it


@gluon.jit
def _promoted_step(a_bufs, b_bufs, ready, empty, acc, zero, it, WG: gl.constexpr, STAGES: gl.constexpr,
                   PINGPONG: gl.constexpr):
    """One K step alone: its wgmma into a fresh partial, waited for, added (``_mainloop_promoted``'s odd step)."""
    a, b = _stage(a_bufs, b_bufs, ready, it, WG, STAGES, PINGPONG)
    p = warpgroup_mma(a, b, zero, use_acc=False, is_async=True, max_num_imprecise_acc=a.shape[1])
    p = warpgroup_mma_wait(0, deps=(p, ))
    mbarrier.arrive(empty.index(it % STAGES))
    return acc + p


@gluon.jit
def _mainloop_promoted(a_bufs, b_bufs, ready, empty, it, k_tiles, WG: gl.constexpr, ROWS: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, layout: gl.constexpr):
    """fp8 operands: each K step's wgmma sums (reduced precision inside the tensor core) start from zero in their
    own registers and are added into the float32 accumulator once done, as cuBLAS without fast accumulation and
    the Triton fp8 GEMM (``max_num_imprecise_acc = BLOCK_K``) promote them, in the same order (bit-equal to it).
    Sums are read only once their wgmma is waited for: reading sums still in flight, as the compiler's own
    promotion did, makes ptxas serialize every wgmma of the kernel (run 27: 1.14-1.35x bf16 against cuBLAS fp8's
    1.44-1.97x). K steps go in pairs, each into its own partial, so the first one's sums are added while the
    second's wgmma runs; only the pair's last add waits on an idle tensor core, and warp group 1 starts with one
    step alone so that wait falls mid-pair of the other group, whose wgmma keep the tensor cores busy."""
    acc = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=layout)
    zero = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=layout)
    LEAD: gl.constexpr = 1 if WG == 1 and not PINGPONG else 0  # cooperative groups share every step: offset them
    if LEAD:
        acc = _promoted_step(a_bufs, b_bufs, ready, empty, acc, zero, it, WG, STAGES, PINGPONG)
        it += 1
    for _j in range((k_tiles - LEAD) // 2):
        a, b = _stage(a_bufs, b_bufs, ready, it, WG, STAGES, PINGPONG)
        p0 = warpgroup_mma(a, b, zero, use_acc=False, is_async=True, max_num_imprecise_acc=a.shape[1])
        a, b = _stage(a_bufs, b_bufs, ready, it + 1, WG, STAGES, PINGPONG)
        p1 = warpgroup_mma(a, b, zero, use_acc=False, is_async=True, max_num_imprecise_acc=a.shape[1])
        p0, p1 = warpgroup_mma_wait(1, deps=(p0, p1))  # the first step's sums, the second's still in flight
        mbarrier.arrive(empty.index(it % STAGES))
        acc = acc + p0
        p1 = warpgroup_mma_wait(0, deps=(p1, ))
        mbarrier.arrive(empty.index((it + 1) % STAGES))
        acc = acc + p1
        it += 2
    if (k_tiles - LEAD) % 2:
        acc = _promoted_step(a_bufs, b_bufs, ready, empty, acc, zero, it, WG, STAGES, PINGPONG)
        it += 1
    return acc, it


@gluon.jit
def scaled_epilogue(acc, s_rows, sb_ptr, bias_ptr, offs_n, N, ROW_SB: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``acc * s_x[row] * s_w[col] + bias`` in float32, in that order (the Triton W8A8 epilogue's, so the kernels'
    outputs are bit-equal); ``s_rows`` in the accumulator's row layout, ``offs_n`` its column indices."""
    out = acc.to(gl.float32) * s_rows[:, None]
    if ROW_SB:
        out = out * gl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    else:
        out = out * gl.load(sb_ptr)
    if HAS_BIAS:
        out = out + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
    return out


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, CONFIG: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    GROUP_M: gl.constexpr = CONFIG[2]
    STAGES: gl.constexpr = CONFIG[3]
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(c_desc, a_bufs, b_bufs, c_buf, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc, u_desc,
              h_buf, u_buf, lr_bar, WG: gl.constexpr, CONFIG: gl.constexpr):
    """Warp group ``WG``'s share: cooperative (both groups on every tile, 64 rows each), or ping-pong (``CONFIG[4]``:
    each group its own tiles, alternate ones, all 128 rows; ``turn`` barriers let one group's main loop start
    only when the other's has ended, so that one's epilogue runs under the other's MMAs)."""
    BLOCK_M: gl.constexpr = a_bufs.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    ROW_SB: gl.constexpr = CONFIG[0]
    HAS_BIAS: gl.constexpr = CONFIG[1]
    GROUP_M: gl.constexpr = CONFIG[2]
    STAGES: gl.constexpr = CONFIG[3]
    PINGPONG: gl.constexpr = CONFIG[4]
    HAS_LR: gl.constexpr = CONFIG[5]
    ROWS: gl.constexpr = BLOCK_M if PINGPONG else WG_ROWS
    FP8: gl.constexpr = a_bufs.dtype.is_fp8()
    INSTR_N: gl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N  # 8-bit wgmma: n <= 128 here (as Triton picks)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, INSTR_N, 32])
    # the low-rank term's bf16 / fp16 wgmma (K 16 per instruction); its accumulator's registers map like the int8
    # one's, so the layout change below moves nothing (checked on the compiled code: no shared memory)
    lr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, INSTR_N, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, layout)
    cols_l: gl.constexpr = gl.SliceLayout(0, layout)
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    first = gl.program_id(0)
    step = gl.num_programs(0)
    it = 0
    if PINGPONG:  # tiles WG, WG + 2, ... of this program's list; the ring runs through all of them in order
        first = first + WG * step
        step = 2 * step
        it = WG * k_tiles
    n = 0
    for tile in range(first, num_tiles, step):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M + (0 if PINGPONG else WG * WG_ROWS)
        if HAS_LR:  # this tile's rows of h = x @ down^T and columns of up, arriving while the main loop runs
            mbarrier.expect(lr_bar, h_desc.block_type.nbytes + u_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(h_desc, [off_m, 0], lr_bar, h_buf)
            tma.async_copy_global_to_shared(u_desc, [0, pid_n * BLOCK_N], lr_bar, u_buf)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), (n & 1) ^ (1 - WG))  # group 0 starts; then strictly in turns
        if FP8:
            acc, it = _mainloop_promoted(a_bufs, b_bufs, ready, empty, it, k_tiles, WG, ROWS, BLOCK_N, STAGES,
                                         PINGPONG, layout)
        else:
            acc, it = _mainloop_exact(a_bufs, b_bufs, ready, empty, it, k_tiles, WG, ROWS, BLOCK_N, STAGES,
                                      PINGPONG, layout)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))  # the other group's main loop may start
            it += k_tiles  # the other group's tile comes next in the ring
        lr_phase = n & 1
        n += 1

        offs_m = off_m + gl.arange(0, ROWS, layout=rows_l)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols_l)
        out = scaled_epilogue(acc, gl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0), sb_ptr, bias_ptr, offs_n, N,
                              ROW_SB, HAS_BIAS)
        if HAS_LR:  # + h @ up, ranks up to the 64-wide box (TMA zero-fills past the rank and past M)
            mbarrier.wait(lr_bar, lr_phase)  # accumulated onto the scaled output itself, as the Triton epilogue's
            # tl.dot(h, u, out) does: one float32 tile live, not two
            out = gl.convert_layout(warpgroup_mma(h_buf, u_buf, gl.convert_layout(out, lr_layout)), layout)
        tma.store_wait(0)  # the previous tile's store has left c_buf
        c_buf.store(out.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, pid_n * BLOCK_N], c_buf)
    tma.store_wait(0)


@gluon.jit
def _consumer_worker(c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc,
                     u_desc, h_bufs, u_bufs, lr_bars, CONFIG: gl.constexpr):
    _consumer(c_desc, a_bufs, b_bufs, c_bufs.index(1), ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc,
              u_desc, h_bufs.index(1), u_bufs.index(1), lr_bars.index(1), 1, CONFIG)


@gluon.jit
def _consumer_default(c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc,
                      u_desc, h_bufs, u_bufs, lr_bars, CONFIG: gl.constexpr):
    _consumer(c_desc, a_bufs, b_bufs, c_bufs.index(0), ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc,
              u_desc, h_bufs.index(0), u_bufs.index(0), lr_bars.index(0), 0, CONFIG)


@gluon.jit(do_not_specialize=["M"])
def w8a8_ws(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, M, N, K, ROW_SB: gl.constexpr,
            HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
            PRODUCER_REGS: gl.constexpr, PINGPONG: gl.constexpr, h_desc, u_desc, HAS_LR: gl.constexpr):
    """``C = (A @ B^T) * s_x[:, None] * s_w + bias`` with A ``[M, K]`` int8 (per-row scales ``s_x``), B ``[N, K]``
    int8 (``s_w`` per row of B when ``ROW_SB``, else one scalar), C bf16/fp16; one program per SM. Both operands
    fp8 of one dtype: the same with a float32 accumulator. ``PINGPONG``: each consumer warp group takes whole
    tiles in turns (C's descriptor then spans the tile's 128 rows). ``HAS_LR``: plus ``h @ up`` (a dynamic LoRA's
    low-rank term: ``h = x @ down^T`` ``[M, R]`` and ``up`` ``[R, N]``, 16-bit, R <= 64, through ``h_desc`` /
    ``u_desc``; otherwise None). The runtime picks int8 and fp8 operands with or without the low-rank term; ping-
    pong was measured no faster (run 27) and stays for benchmarks and checks."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    ROWS: gl.constexpr = c_desc.block_type.shape[0]
    gl.static_assert(BLOCK_M == 2 * WG_ROWS, "two consumer warp groups of 64 rows each, or 128-row tiles in turns")
    gl.static_assert(ROWS == (BLOCK_M if PINGPONG else WG_ROWS), "C's block: a warp group's rows")
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, ROWS, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    lr_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if HAS_LR:  # one h tile and one up tile per consumer warp group
        h_bufs = gl.allocate_shared_memory(h_desc.dtype, [2, h_desc.block_type.shape[0], h_desc.block_type.shape[1]],
                                           h_desc.layout)
        u_bufs = gl.allocate_shared_memory(u_desc.dtype, [2, u_desc.block_type.shape[0], u_desc.block_type.shape[1]],
                                           u_desc.layout)
    else:  # placeholders the partitions never touch
        h_bufs = c_bufs
        u_bufs = c_bufs
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1 if PINGPONG else 2)  # one arrive per warp group reading the stage
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(lr_bars.index(i), count=1)
    fence_async_shared()
    config: gl.constexpr = (ROW_SB, HAS_BIAS, GROUP_M, STAGES, PINGPONG, HAS_LR)
    consumer_args = (c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, M, N, K, h_desc,
                     u_desc, h_bufs, u_bufs, lr_bars, config)
    gl.warp_specialize([
        (_consumer_default, consumer_args),
        (_consumer_worker, consumer_args),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, config)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5,
              torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
LR_MAX = 64  # the widest low-rank term the kernel's 64-wide h / up boxes hold
SMEM_LIMIT = 227 * 1024  # shared memory a Hopper block may take


def fit_stages(stages: int, block_n: int, block_k: int, pingpong: bool = False, low_rank: bool = False,
               out_bytes: int = 2) -> int:
    """``stages`` cut so the ring (128 x ``block_k`` A and ``block_n`` x ``block_k`` B, 8-bit), the two output
    buffers and, with ``low_rank``, the two h / up tiles fit a block's shared memory (1 KB kept for barriers)."""
    rows = 2 * WG_ROWS.value if pingpong else WG_ROWS.value
    fixed = 2 * rows * block_n * out_bytes + (2 * (rows * LR_MAX + LR_MAX * block_n) * 2 if low_rank else 0)
    per_stage = (2 * WG_ROWS.value + block_n) * block_k
    return max(2, min(stages, (SMEM_LIMIT - 1024 - fixed) // per_stage))


def lr_descriptors(h: torch.Tensor, up: torch.Tensor, rows: int, block_n: int) -> tuple[TensorDescriptor,
                                                                                          TensorDescriptor]:
    """TMA descriptors of a low-rank term's ``h`` ``[M, R]`` (``rows`` x 64 boxes) and ``up`` ``[R, N]`` (64 x
    ``block_n``), 16-bit, R <= :data:`LR_MAX` (the boxes zero-fill past R)."""
    if h.shape[1] > LR_MAX or up.shape[0] != h.shape[1] or h.dtype != up.dtype or h.dtype not in (
            torch.bfloat16, torch.float16):
        raise ValueError(f"low-rank term {tuple(h.shape)} x {tuple(up.shape)} {h.dtype}: needs 16-bit, R <= {LR_MAX}")
    dt = _GL_DTYPES[h.dtype]
    h_l = gl.NVMMASharedLayout.get_default_for([rows, LR_MAX], dt)
    u_l = gl.NVMMASharedLayout.get_default_for([LR_MAX, block_n], dt)
    return (TensorDescriptor.from_tensor(h, [rows, LR_MAX], h_l),
            TensorDescriptor.from_tensor(up, [LR_MAX, block_n], u_l))


def descriptors(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_m: int, block_n: int,
                block_k: int, pingpong: bool = False) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of A ``[M, K]``, B ``[N, K]`` (int8, or fp8 of one dtype) and C ``[M, N]`` (C in 64-row
    halves, one per warp group; whole tiles with ``pingpong``)."""
    op = _GL_DTYPES[a.dtype]
    a_l = gl.NVMMASharedLayout.get_default_for([block_m, block_k], op)
    b_l = gl.NVMMASharedLayout.get_default_for([block_n, block_k], op)
    c_dt = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
    c_rows = block_m if pingpong else WG_ROWS.value
    c_l = gl.NVMMASharedLayout.get_default_for([c_rows, block_n], c_dt)
    return (TensorDescriptor.from_tensor(a, [block_m, block_k], a_l),
            TensorDescriptor.from_tensor(w, [block_n, block_k], b_l),
            TensorDescriptor.from_tensor(out, [c_rows, block_n], c_l))


def gluon_w8a8(q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16, block_n: int = 256,
               block_k: int = 128, stages: int = 3, group_m: int = 8, programs: int | None = None,
               consumer_regs: int = CONSUMER_REGS, producer_regs: int = PRODUCER_REGS,
               pingpong: bool = False, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(q @ w_q^T) * s_x * w_scale + bias`` on the warp-specialized kernel (int8 or fp8 operands, 2-D ``q``);
    ``low_rank = (h, up)``: plus ``h @ up`` (16-bit ``[M, R]`` and ``[R, N]``, R <= :data:`LR_MAX`)."""
    m, k = q.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), device=q.device, dtype=out_dtype)
    stages = fit_stages(stages, block_n, block_k, pingpong, low_rank is not None, out.element_size())
    a_d, b_d, c_d = descriptors(q, w_q, out, 2 * WG_ROWS.value, block_n, block_k, pingpong)
    h_d, u_d = (None, None) if low_rank is None else lr_descriptors(*low_rank, c_d.block_shape[0], block_n)
    sb = w_scale.reshape(-1).float()
    if programs is None:
        programs = torch.cuda.get_device_properties(q.device).multi_processor_count
    tiles = triton.cdiv(m, 2 * WG_ROWS.value) * triton.cdiv(n, block_n)
    w8a8_ws[(min(programs, tiles),)](
        a_d, b_d, c_d, s_x.reshape(-1), sb, bias if bias is not None else sb, m, n, k, ROW_SB=sb.numel() > 1,
        HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages, CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=producer_regs, PINGPONG=pingpong, h_desc=h_d, u_desc=u_d, HAS_LR=low_rank is not None,
        num_warps=4)
    return out
