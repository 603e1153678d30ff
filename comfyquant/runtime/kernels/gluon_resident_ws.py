"""The resident one-launch W8A8 kernel, warp-specialized: a row block's quantization overlapping its own MMAs.

``gluon_resident.w8a8_resident`` runs a program's phases one after the other (the rows' absmax, their codes
into shared memory, every MMA, each column tile's epilogue with synchronous stores): at 128-row blocks a program
fills an SM and nothing hides those phases (H100: SDXL attn 640 at 16,384 rows 27.8 µs on 64-row blocks, bf16
26.9; the byte floor ~13). Here one program holds a 128-row block (codes of all of K, K <= 1,280) and splits
the work across partitions (``gl.warp_specialize``):

- a quantizer (4 warps): pass 1 (the rows' absmax over all of K, 32 rows at a time) into a shared scale
  buffer (``scales_ready``), then pass 2 chunk by chunk of K, each chunk's codes announced on its own barrier
  (``chunk_ready[kk]``), so the first MMAs start while later chunks are still being quantized;
- a weight loader (1 warp): the weight's tiles by TMA through a ring (``ready`` / ``empty``), from the start;
- two consumer warp groups of 64 rows (the default partition and a 4-warp worker), both reading each ring slot
  (``empty`` counts two arrivals): int8 wgmma into int32, then ``gluon_gemm.scaled_epilogue`` and a TMA store
  through shared memory that overlaps the next column tile's MMAs (the store clips rows >= M, columns >= N).

Codes, scales and epilogue are ``gluon_resident``'s functions (``act_kernels.quant_codes`` / ``scale_of``), so
the output is bit-equal to ``w8a8_resident``'s and the two-launch path's (``check_gemm_gpu.check_resident_ws``).
The grid is (row blocks, column splits): a program takes its split's contiguous share of the column tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
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

from comfyquant.runtime.kernels.act_kernels import quant_codes, scale_of
from comfyquant.runtime.kernels.configs import HOPPER_SMEM, ResidentConfig, cdiv, column_splits
from comfyquant.runtime.kernels.gluon_gemm import scaled_epilogue
from comfyquant.runtime.kernels.gluon_resident import (
    plan_operands,
    rows_of,
    weight_descriptor,
    x_chunk,
)
from comfyquant.runtime.kernels.gluon_resident import refusal as resident_refusal
from comfyquant.runtime.kernels.launch import FastKernel, device_facts
from comfyquant.runtime.kernels.triton_plans import desc_maker, flat_cache, raw_stream

BLOCK_M = 128  # rows a program: two consumer warp groups of 64
WG_ROWS = gl.constexpr(64)
P2ROWS = gl.constexpr(64)  # rows the quantizer's pass 2 codes at once (64 x 128 float32: 64 registers a thread)
QELEMS = gl.constexpr(20480)  # elements of x the quantizer's pass 1 holds at once (32 rows of K = 640: 80 a thread)
# 128 x 1,280 bytes of codes (SDXL attn 1,280) beside a 6-deep ring of 64-wide tiles and the output buffers: 225 KB
# on sm_90 compiles (230,808 bytes); 128-wide tiles there would leave a 2-deep ring
WS_MAX_K = 1280
WS_MAX_STAGES = 8
WS_MIN_STAGES = 3  # a shallower ring leaves each weight tile's L2 latency exposed
WARPS = 4  # the default partition's (the first consumer warp group)
# registers a thread (setmaxnreg) of the second consumer warp group, the quantizer and the weight loader; the
# default partition (the first consumer group) gets the rest of the 16 warps' 64 K (512 - these: 176). ptxas
# spills nothing at these on K = 192-1,280, with or without bias; the quantizer spilled at 120 from K = 768 and
# at 104 on K = 640 (pass 1 keeps every K chunk's loads of its rows in flight)
WS_REGS = (176, 136, 24)
N64_SPEED = 0.9  # a 64-wide column tile's throughput relative to a 128-wide one (configs.WS_N64_SPEED's)
# a program's quantization of its block (pass 1, before any MMA) in columns of MMA work: an estimate, not
# measured (pass 1 of 128 x K from L2 against 128 x K x 128 int8 MACs a column tile); the bench times splits
QUANT_COLS = 256
SMEM_SLACK = 1024  # barriers (8 bytes each) and the allocator's alignment beside the buffers


@gluon.jit
def _share(N, BLOCK_N: gl.constexpr):
    """(first column tile, column tiles) of this program's split (grid axis 1)."""
    n_tiles = gl.cdiv(N, BLOCK_N)
    per = gl.cdiv(n_tiles, gl.num_programs(1))
    n_first = gl.program_id(1) * per
    return n_first, gl.minimum(per, n_tiles - n_first)


@gluon.jit
def _quantizer(x_ptr, a_smem, s_smem, i_smem, scales_ready, chunk_ready, M, K, stride_xm, KT: gl.constexpr):
    """Pass 1: the block's scales and reciprocals (``gluon_resident._row_scales``'s arithmetic) into ``s_smem`` /
    ``i_smem``, then ``scales_ready``; pass 2: K chunk ``kk``'s codes of all rows into ``a_smem[kk]``, then
    ``chunk_ready[kk]`` (rows past M: zero codes, scale 1)."""
    BLOCK_K: gl.constexpr = a_smem.shape[2]
    ROWS: gl.constexpr = a_smem.shape[1]
    load_l: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BLOCK_K, BLOCK_K // 16], [4, 1], [1, 0])
    rows_l: gl.constexpr = gl.SliceLayout(1, load_l)
    # pass 1 holds all of K for 32 rows at a time (16 past K = 640), every chunk's loads in flight at once
    QROWS: gl.constexpr = 16 if BLOCK_K == 128 and KT * BLOCK_K * 32 > QELEMS else 32
    row0 = gl.program_id(0) * ROWS
    cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, load_l))
    for sub in gl.static_range(ROWS // QROWS):
        rows = row0 + sub * QROWS + gl.arange(0, QROWS, layout=rows_l)
        amax = gl.zeros([QROWS], gl.float32, rows_l)
        for kt in gl.static_range(KT):
            amax = gl.maximum(amax, gl.max(gl.abs(x_chunk(x_ptr, rows, cols, kt, M, K, stride_xm, BLOCK_K)), axis=1))
        scale = scale_of(amax, 127.0)
        s_smem.slice(sub * QROWS, QROWS).store(scale)
        i_smem.slice(sub * QROWS, QROWS).store(gl.div_rn(gl.full_like(scale, 1.0), scale))
    gl.thread_barrier()  # every warp's scales are in shared memory before one thread arrives
    mbarrier.arrive(scales_ready)
    # pass 2 (x again, from L2) in 64-row halves: the compiler puts a barrier before each store into the codes
    # buffer (any two stores into one allocation), which the next half's loads cannot pass
    for kk in gl.static_range(KT):
        for h in gl.static_range(ROWS // P2ROWS):
            rows = row0 + h * P2ROWS + gl.arange(0, P2ROWS, layout=rows_l)
            scale = s_smem.slice(h * P2ROWS, P2ROWS).load(rows_l)
            inv = i_smem.slice(h * P2ROWS, P2ROWS).load(rows_l)
            x = x_chunk(x_ptr, rows, cols, kk, M, K, stride_xm, BLOCK_K)
            a_smem.index(kk).slice(h * P2ROWS, P2ROWS, dim=0).store(
                quant_codes(x, scale[:, None], inv[:, None], 127.0, 0))
        fence_async_shared()  # the codes (generic proxy) before any wgmma (async proxy) reads them
        gl.thread_barrier()  # ... of every warp, before one thread arrives
        mbarrier.arrive(chunk_ready.index(kk))


@gluon.jit
def _loader(w_desc, b_bufs, ready, empty, N, KT: gl.constexpr):
    """The weight's tiles of this program's column tiles, K step by K step, into the ring (a slot once both
    consumer warp groups released it)."""
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    BLOCK_K: gl.constexpr = b_bufs.shape[2]
    STAGES: gl.constexpr = b_bufs.shape[0]
    n_first, mine = _share(N, BLOCK_N)
    it = 0
    for t in range(mine):
        for kk in gl.static_range(KT):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [(n_first + t) * BLOCK_N, kk * BLOCK_K], ready.index(s),
                                            b_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(c_desc, a_smem, b_bufs, c_buf, s_smem, ready, empty, scales_ready, chunk_ready, sb_ptr, bias_ptr,
              N, WG: gl.constexpr, EPI: gl.constexpr):
    """Warp group ``WG``'s 64 rows of every column tile of the split: wgmma over the K chunks (each waited for
    once it is quantized), the epilogue, a TMA store of the tile overlapping the next tile's MMAs."""
    KT: gl.constexpr = a_smem.shape[0]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    STAGES: gl.constexpr = b_bufs.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    n_first, mine = _share(N, BLOCK_N)
    off_m = gl.program_id(0) * a_smem.shape[1] + WG * WG_ROWS
    mbarrier.wait(scales_ready, 0)  # (before chunk 0's codes anyway: pass 1 precedes pass 2)
    s_rows = s_smem.slice(WG * WG_ROWS, WG_ROWS).load(gl.SliceLayout(1, layout))
    it = 0
    for t in range(mine):
        acc = gl.zeros((WG_ROWS, BLOCK_N), dtype=gl.int32, layout=layout)
        for kk in gl.static_range(KT):
            mbarrier.wait(chunk_ready.index(kk), 0)  # completed once: later tiles pass at once
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(kk).slice(WG * WG_ROWS, WG_ROWS, dim=0),
                                b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))  # the previous step's wgmma is done: release its slot
            if kk > 0:
                mbarrier.arrive(empty.index((it - 1) % STAGES))
            it += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((it - 1) % STAGES))
        offs_n = (n_first + t) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        out = scaled_epilogue(acc, s_rows, sb_ptr, bias_ptr, offs_n, N, EPI[0], EPI[1])
        tma.store_wait(0)  # the previous tile's store has left c_buf
        c_buf.store(out.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, (n_first + t) * BLOCK_N], c_buf)
    tma.store_wait(0)


@gluon.jit
def _consumer_default(c_desc, a_smem, b_bufs, c_bufs, s_smem, ready, empty, scales_ready, chunk_ready, sb_ptr,
                      bias_ptr, N, EPI: gl.constexpr):
    _consumer(c_desc, a_smem, b_bufs, c_bufs.index(0), s_smem, ready, empty, scales_ready, chunk_ready, sb_ptr,
              bias_ptr, N, 0, EPI)


@gluon.jit
def _consumer_worker(c_desc, a_smem, b_bufs, c_bufs, s_smem, ready, empty, scales_ready, chunk_ready, sb_ptr,
                     bias_ptr, N, EPI: gl.constexpr):
    _consumer(c_desc, a_smem, b_bufs, c_bufs.index(1), s_smem, ready, empty, scales_ready, chunk_ready, sb_ptr,
              bias_ptr, N, 1, EPI)


@gluon.jit(do_not_specialize=["M"])
def w8a8_resident_ws(x_ptr, w_desc, c_desc, sb_ptr, bias_ptr, M, N, K, stride_xm, ROW_SB: gl.constexpr,
                     HAS_BIAS: gl.constexpr, KT: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     QUANT_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """``out = (q(x) @ W^T) * s_x[:, None] * s_w + bias`` (``w8a8_resident``'s) for bf16 / fp16 ``x`` ``[M, K]``
    and int8 ``W`` ``[N, K]`` (``w_desc``: ``[BLOCK_N, BLOCK_K]`` boxes), the output through ``c_desc``
    (``[64, BLOCK_N]`` boxes); program (row block, split); ``*_REGS``: :data:`WS_REGS`."""
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    gl.static_assert(c_desc.block_type.shape[0] == WG_ROWS, "the output in 64-row halves, one per warp group")
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * WG_ROWS, BLOCK_K], gl.int8)
    a_smem = gl.allocate_shared_memory(gl.int8, [KT, 2 * WG_ROWS, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, WG_ROWS, BLOCK_N], c_desc.layout)
    s_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s_smem = gl.allocate_shared_memory(gl.float32, [2 * WG_ROWS], s_layout)  # the rows' scales
    i_smem = gl.allocate_shared_memory(gl.float32, [2 * WG_ROWS], s_layout)  # ... and their reciprocals
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    chunk_ready = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
    scales_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
    for i in gl.static_range(KT):
        mbarrier.init(chunk_ready.index(i), count=1)
    mbarrier.init(scales_ready.index(0), count=1)
    fence_async_shared()
    epi: gl.constexpr = (ROW_SB, HAS_BIAS)  # (a constexpr tuple: plain flags would reach the partitions as values)
    consumer_args = (c_desc, a_smem, b_bufs, c_bufs, s_smem, ready, empty, scales_ready.index(0), chunk_ready, sb_ptr,
                     bias_ptr, N, epi)
    gl.warp_specialize([
        (_consumer_default, consumer_args),
        (_consumer_worker, consumer_args),
        (_quantizer, (x_ptr, a_smem, s_smem, i_smem, scales_ready.index(0), chunk_ready, M, K, stride_xm, KT)),
        (_loader, (w_desc, b_bufs, ready, empty, N, KT)),
    ], [4, 4, 1], [CONSUMER_REGS, QUANT_REGS, LOADER_REGS])


def resident_ws_smem(block_n: int, block_k: int, stages: int, k: int, out_bytes: int = 2) -> int:
    """Shared memory a launch takes (an upper bound of the compiled kernel's): the codes (128 x K rounded up to
    ``block_k``), the weight ring, two 64-row output buffers, the scales and reciprocals, barriers."""
    return (BLOCK_M * cdiv(k, block_k) * block_k + stages * block_n * block_k + 2 * 64 * block_n * out_bytes
            + 2 * BLOCK_M * 4 + SMEM_SLACK)


def resident_ws_config(m: int, n: int, k: int, sms: int, out_bytes: int = 2) -> ResidentConfig | None:
    """The launch for ``[m, k] x [k, n]`` (None past :data:`WS_MAX_K`): 128-row blocks, each program filling an SM
    (its shared memory); the column tile (128 or 64 wide, the latter at :data:`N64_SPEED`) and splits whose
    slowest program has the least work over its waves (its columns plus :data:`QUANT_COLS` for quantizing its
    block; ties: fewer programs), so the programs come to about one per SM; the deepest ring that fits (up to
    :data:`WS_MAX_STAGES`; a tile width whose ring would be shallower than :data:`WS_MIN_STAGES` is not taken)."""
    if k > WS_MAX_K or k % 16 or n % 8:
        return None
    block_k = 128 if k % 128 == 0 or k > 256 else 64
    rows = max(1, cdiv(m, BLOCK_M))
    best, best_key = None, None
    for block_n in (128, 64):
        stages = next((st for st in range(WS_MAX_STAGES, WS_MIN_STAGES - 1, -1)
                       if resident_ws_smem(block_n, block_k, st, k, out_bytes) <= HOPPER_SMEM), 0)
        tiles = cdiv(n, block_n)
        for splits in range(1, tiles + 1):
            per = cdiv(tiles, splits)
            if not stages or column_splits(tiles, splits) != splits:  # a split without a column tile
                continue
            cost = cdiv(rows * splits, sms) * (per * block_n / (1.0 if block_n == 128 else N64_SPEED) + QUANT_COLS)
            key = (round(cost, 6), rows * splits)
            if best_key is None or key < best_key:
                best, best_key = ResidentConfig(BLOCK_M, block_n, block_k, stages, splits), key
    return best


def refusal(x: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why the kernel does not take this call (None: it does): ``gluon_resident.refusal``'s terms with K up to
    :data:`WS_MAX_K` (N a multiple of 8 also keeps the output's rows 16-byte aligned for its TMA store)."""
    return resident_refusal(x, w_q, out_dtype, WS_MAX_K)


def output_descriptor(out: torch.Tensor, block_n: int) -> TensorDescriptor:
    """The TMA descriptor of the 16-bit output ``[M, N]`` in ``[64, block_n]`` boxes (one warp group's rows)."""
    dt = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([64, block_n], dt)
    return TensorDescriptor.from_tensor(out, [64, block_n], layout)


def launch_args(x2d: torch.Tensor, w_desc: TensorDescriptor, out: torch.Tensor, sb: torch.Tensor,
                bias: torch.Tensor | None, cfg: ResidentConfig, regs: tuple[int, int, int] = WS_REGS
                ) -> tuple[tuple[int, int], tuple]:
    """(grid, every argument of :func:`w8a8_resident_ws` positionally, constexprs included) of one launch."""
    m, k = x2d.shape
    n = out.shape[1]
    tiles = cdiv(n, cfg.block_n)
    splits = column_splits(tiles, cfg.splits)
    args = (x2d, w_desc, output_descriptor(out, cfg.block_n), sb, bias if bias is not None else sb, m, n, k,
            x2d.stride(0), sb.numel() > 1, bias is not None, cdiv(k, cfg.block_k), cfg.stages, *regs)
    return (cdiv(m, BLOCK_M), splits), args


@functools.cache
def _kernel() -> FastKernel:
    return FastKernel(w8a8_resident_ws)


def _fast(x2d: torch.Tensor, w_desc: TensorDescriptor, out: torch.Tensor, sb: torch.Tensor,
          bias: torch.Tensor | None, cfg: ResidentConfig) -> tuple[tuple[int, int], tuple, tuple]:
    """(grid, arguments, the FastKernel key) of a launch: M is not specialized; N, K, x's row stride and the
    flags are fixed per launch shape; the pointers' 16-byte alignment is keyed (the descriptors' is checked where
    they are made). The key spares every call Triton's generic one (~30 µs on a slow host)."""
    grid, args = launch_args(x2d, w_desc, out, sb, bias, cfg)
    key = ("ws", cfg, x2d.dtype, out.dtype, args[6], args[7], args[8], args[9], args[10],
           x2d.data_ptr() % 16 == 0, sb.data_ptr() % 16 == 0, bias is None or bias.data_ptr() % 16 == 0)
    return grid, args, key


def resident_ws_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype | None = None, cfg: ResidentConfig | None = None) -> torch.Tensor:
    """``x @ dequant(w_q)^T + bias`` with x quantized per row inside the launch, as ``gluon_resident.resident_w8a8``
    (bf16 / fp16 x of any leading shape, int8 ``w_q [N, K]``, ``w_scale`` per row or one scalar)."""
    x2d, out_dtype = rows_of(x, w_q, out_dtype, refusal, "the warp-specialized resident W8A8 kernel")
    lead, k = x.shape[:-1], x.shape[-1]
    m, n = x2d.shape[0], w_q.shape[0]
    cfg = cfg or resident_ws_config(m, n, k, device_facts(x.device)[0])
    if cfg.block_m != BLOCK_M:
        raise ValueError(f"the warp-specialized resident W8A8 kernel runs 128-row blocks, not {cfg.block_m}")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m:
        grid, args, key = _fast(x2d, weight_descriptor(w_q.contiguous(), cfg), out, w_scale.reshape(-1).float(),
                                bias, cfg)
        _kernel()(grid, args, x.device, num_warps=WARPS, num_stages=1, key=key)
    return out.reshape(*lead, n)


def plan_resident_ws(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, cfg: ResidentConfig | None = None
                     ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> resident_ws_w8a8(x, w_q, w_scale, bias, out_dtype)`` for inputs of ``x``'s shape, as
    ``gluon_resident.plan_resident`` launches: fired straight into the compiled kernel, the weight's descriptor
    expanded once and the output's once per buffer address (``triton_plans.flat_cache``). None until a call
    compiled the kernel for this shape and launch, for x that is not contiguous, or where Triton's launcher is not
    the shape the direct launch relies on; checked once per compiled kernel against Triton's own launch."""
    ops = plan_operands(x, w_q, w_scale, out_dtype, refusal, resident_ws_config, cfg)
    if ops is None:
        return None
    x2d, cfg, sb, desc, out0 = ops
    (m, k), n, dev = x2d.shape, out0.shape[1], x.device
    grid, args, key = _fast(x2d, desc, out0, sb, bias, cfg)
    direct = _kernel().prepared_tma(grid, num_warps=WARPS, num_stages=1, key=key)
    if direct is None:
        return None
    fire, expand = direct
    w_flat, c_flat, tail = expand(desc, 1), flat_cache(expand, desc_maker(args[2]), 2), args[3:]
    shape = (*x.shape[:-1], n)
    empty, stream = torch.empty, raw_stream(dev)

    def run(xc: torch.Tensor, _held: tuple = (desc, sb)) -> torch.Tensor:  # (the weight outlives its flat form)
        out = empty((m, n), dtype=out_dtype, device=dev)
        fire(stream(), xc, *w_flat, *c_flat(out), *tail)
        return out.view(shape)

    ok = _kernel().direct_agrees(key, lambda: run(x), lambda: resident_ws_w8a8(x, w_q, w_scale, bias, out_dtype, cfg),
                                 f"warp-specialized resident W8A8 plan for N={n} K={k}")
    return run if ok else None
