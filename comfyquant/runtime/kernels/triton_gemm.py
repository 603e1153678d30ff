"""Triton GEMM kernels (device code only; launches and configs live in ``triton_int8`` / ``configs``).

- ``w8a8``: int8 x int8 -> int32 (pointer loads), epilogue ``acc * s_x * s_w + bias`` cast to the output dtype.
  Every GEMM's epilogue can also add a low-rank term ``h @ u`` (dynamic LoRAs, see ``_store``). The same kernel
  takes fp8 x fp8 operands (both e4m3fn or both e5m2; sm_89+) and then accumulates in float32 (``_dot``).
- ``w8a8_tma``: the same on Hopper with A/B tiles through the tensor-copy engine (TMA), wgmma (int8 or fp8).
- ``w8a16``: weight-only: int8/fp8 W converted to x's 16-bit dtype in registers, fp32 accumulate (small M).
- ``fused``: ONE launch per W8A8 linear: each program takes its rows' absmax over K (bf16 x), then quantizes
  the A tiles in registers inside the main loop (no int8 round trip through memory, no second launch).
- ``fused_rows``: one launch from 64 rows: a row block's programs quantize its rows between them into an int8
  scratch, wait for each other (counters, tiles handed out in row-block order), then run the int8 GEMM.
- ``w4a8``: int4 weights (two per byte, even column in the low nibble) against int8 activations whose K order
  is permuted per 128-column block (evens first, then odds: ``triton_quant`` writes it so); each packed tile
  is split with two shifts into the even-K and odd-K int8 halves, two int8 dots per K step, no interleave.
- ``dequant``: W (int8/fp8) times its row/tensor scale into a bf16/fp16 copy (the dequantize + cuBLAS path).
"""

from __future__ import annotations

import triton
import triton.language as tl

from comfyquant.runtime.kernels.act_kernels import (
    block_place,
    block_wait,
    input_act,
    quant_codes,
    quantize_rows,
    rms_part,
    rms_weighted,
    rne_int8,
)

PERM_BLOCK = 128  # the W4A8 K-permutation block (= the W4A8 kernel's K step)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    return _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row-tiles share each column sweep, so B tiles stay in L2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _store(out, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, h_ptr, u_ptr, R, stride_hm,
           stride_ur, HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    """``out [BM, BN]`` fp32 (already times the row scale) * weight scale + bias (+ ``h @ u``) -> C, masked at
    the edges. ``HAS_LR``: a low-rank side path (dynamic LoRAs) added here instead of by a second GEMM that
    reads and writes all of C again: ``h [M, R]`` (x times the LoRA down-projections) and ``u [R, N]`` (the
    up-projections), R a multiple of 16; ``LR_IEEE``: fp32 operands, multiplied exactly (no TF32)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if ROW_SB:
        out = out * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    else:
        out = out * tl.load(sb_ptr)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LR:
        offs_r = tl.arange(0, 16)
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
        mask_m = (offs_m < M)[:, None]
        for r0 in range(0, R, 16):
            h = tl.load(h_rows + (r0 + offs_r)[None, :], mask=mask_m, other=0.0)
            u = tl.load(u_ptr + (r0 + offs_r).to(tl.int64)[:, None] * stride_ur + offs_n[None, :],
                        mask=mask_n[None, :], other=0.0)
            if LR_IEEE:
                out = tl.dot(h, u, out, input_precision="ieee")
            else:
                out = tl.dot(h, u, out)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _row_scale(acc, sa_ptr, M, pid_m, BLOCK_M: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]


@triton.jit
def _store_raw(acc, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _dot(a, b, acc, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + a @ b``; fp8 x fp8 into float32 with wgmma's reduced-precision fp8 sums (Triton's sm_90 default
    for all of K: ~14-bit sums, the error grows with K) promoted into the fp32 ``acc`` every ``BLOCK_K``, as
    cuBLAS does without fast accumulation (``torch._scaled_mm``'s default)."""
    if a.dtype.is_fp8():
        return tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
    return tl.dot(a, b, acc, out_dtype=ACC_DTYPE)


@triton.jit
def nibble_codes(p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The int8 codes ``[ROWS, COLS]`` of int4 bytes ``p`` (int8 ``[ROWS, COLS / 2]``, ``int4_rot``'s packing: byte
    j's low nibble is column 2j, its high nibble 2j + 1, two's complement): arithmetic shifts on int8 sign-extend
    each nibble, and the two planes joined on the last axis are the natural column order."""
    return tl.reshape(tl.join((p << 4) >> 4, p >> 4), (ROWS, COLS))


@triton.jit
def _packed_tile(p_ptrs, mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """A ``[BLOCK_K, BLOCK_N]`` weight tile in ``DTYPE`` from ``[BLOCK_N, BLOCK_K / 2]`` packed bytes, transposed
    for the MMA."""
    return tl.trans(nibble_codes(tl.load(p_ptrs, mask=mask, other=0), BLOCK_N, BLOCK_K).to(DTYPE))


@triton.jit
def _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, ACC_DTYPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              B_TO: tl.constexpr, A_ACT: tl.constexpr, A_CACHE: tl.constexpr, PACKED: tl.constexpr = False):
    # rows/cols past the edge are clamped (wrapped) instead of masked: their results are never stored;
    # ``A_CACHE``: A's load cache modifier (".cg": from L2, past a stale L1, for A written by other programs);
    # ``PACKED``: B is int4 packed two per byte along K (``b_ptr`` / ``stride_bn`` in bytes; weight-only only)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if PACKED:
        offs_kh = tl.arange(0, BLOCK_K // 2)
        p_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_kh[None, :]
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            rem = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0, cache_modifier=A_CACHE)
            if A_ACT != 0:
                a = input_act(a.to(tl.float32), A_ACT).to(a.dtype)
            b = _packed_tile(p_ptrs, offs_kh[None, :] < rem // 2, BLOCK_N, BLOCK_K, a.dtype)
            acc = _dot(a, b, acc, ACC_DTYPE, BLOCK_K)
            a_ptrs += BLOCK_K
            p_ptrs += BLOCK_K // 2
        return acc
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, cache_modifier=A_CACHE)
            b = tl.load(b_ptrs)
        else:
            rem = K - kk * BLOCK_K
            if a_ptr.dtype.element_ty.is_fp8():  # fp8 x fp8 (sm_89+): a float `other` (no int -> fp8 cast)
                a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0, cache_modifier=A_CACHE)
                if B_TO:  # fp8 loads take no integer `other`: zero the tail after the conversion
                    b = tl.load(b_ptrs, mask=offs_k[:, None] < rem)
                    b = tl.where(offs_k[:, None] < rem, b.to(a.dtype), 0.0)
                else:
                    b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0)
        if A_ACT != 0:  # the layer's input activation, applied as x is read (zero padding stays zero)
            a = input_act(a.to(tl.float32), A_ACT).to(a.dtype)
        if B_TO:
            b = b.to(a.dtype)
        acc = _dot(a, b, acc, ACC_DTYPE, BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["M"])
def w8a8(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
         ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
         h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ACC: tl.constexpr = tl.float32 if a_ptr.dtype.element_ty.is_fp8() else tl.int32
    acc = _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, ACC,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, 0, "")
    if RAW:  # the accumulator itself (exactness checks against torch._int_mm)
        _store_raw(acc, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N)
    else:
        _store(_row_scale(acc, sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m,
               pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def w8a16(a_ptr, b_ptr, c_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
          ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
          h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr,
          A_ACT: tl.constexpr, ws_ptr, cnt_ptr, K_PER, SPLIT: tl.constexpr, PACKED: tl.constexpr):
    """Weight-only GEMM (``PACKED``: int4 weights, two per byte along K, ``stride_bn`` in bytes). ``SPLIT`` > 1 (few output tiles, long K: a thin-M down projection leaves SMs idle):
    program ``(tile, s)`` multiplies K slice ``s`` (``K_PER`` columns, a multiple of ``BLOCK_K``), stores its
    fp32 partial in ``ws [SPLIT, M, N]`` and counts itself in ``cnt[tile]``; the last program of a tile sums
    the partials in slice order (deterministic) and runs the epilogue, then resets the count for the next
    launch (``cnt`` starts zeroed and is left zeroed)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT == 1:
        acc = _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, tl.float32,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, True, A_ACT, "", PACKED)
        _store(acc, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS,
               h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)
    else:
        s = tl.program_id(1)
        k0 = s * K_PER
        acc = _mainloop(a_ptr + k0, b_ptr + (k0 // 2 if PACKED else k0), M, N, tl.minimum(K - k0, K_PER), stride_am,
                        stride_bn, pid_m, pid_n, tl.float32, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, True, A_ACT, "",
                        PACKED)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        part = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + s.to(tl.int64) * M * N + part, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the count is released
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t in range(SPLIT):  # slice order, whichever program finished last
                total += tl.load(ws_ptr + t * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
            _store(total, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N, ROW_SB,
                   HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["M"])
def w8a8_tma(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_cm, ROW_SB: tl.constexpr,
             HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
             HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    """Hopper path: A and B tiles through the bulk tensor copy engine (TMA zero-fills the edges), wgmma; int8
    operands accumulate in int32, fp8 ones in float32."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    ACC: tl.constexpr = tl.float32 if a_desc.dtype.is_fp8() else tl.int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, kk * BLOCK_K])
        b = b_desc.load([off_n, kk * BLOCK_K])
        acc = _dot(a, b.T, acc, ACC, BLOCK_K)
    if RAW:
        _store_raw(acc, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N)
    else:
        _store(_row_scale(acc, sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m,
               pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def w8a8_tma_persistent(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_cm, ROW_SB: tl.constexpr,
                        HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
                        HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr, PROGRAMS: tl.constexpr,
                        FLATTEN: tl.constexpr):
    """``w8a8_tma`` on a persistent grid: ``PROGRAMS`` programs (one per SM) walk the output tiles in the same
    grouped order, so one tile's epilogue and the next tile's first loads need no new program; ``FLATTEN``: the
    compiler flattens the tile and K loops into one software pipeline (loads of the next tile are issued while
    this tile's last products and its epilogue run). Same arithmetic per tile as ``w8a8_tma``."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    ACC: tl.constexpr = tl.float32 if a_desc.dtype.is_fp8() else tl.int32
    for tile in tl.range(tl.program_id(0), num_tiles, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for kk in range(0, k_tiles):
            a = a_desc.load([off_m, kk * BLOCK_K])
            b = b_desc.load([off_n, kk * BLOCK_K])
            acc = _dot(a, b.T, acc, ACC, BLOCK_K)
        if RAW:
            _store_raw(acc, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N)
        else:
            _store(_row_scale(acc, sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m,
                   pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR,
                   LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def fused(x_ptr, b_ptr, c_ptr, sb_ptr, bias_ptr, M, N, K, stride_xm, stride_bn, stride_cm,
          ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, A_CHUNK: tl.constexpr,
          h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr,
          A_ACT: tl.constexpr, KBLOCK: tl.constexpr, nw_ptr, eps, NORM: tl.constexpr):
    """Per-token int8 quantization of x folded into the W8A8 GEMM (one launch, x read in bf16/fp16), after the
    layer's input activation ``A_ACT`` (0: none). ``KBLOCK``: one activation scale per row and ``BLOCK_K``
    columns instead of per row, taken from the A tile the loop loads anyway (no absmax pass over K first); each
    block's exact int32 product is scaled into an fp32 accumulator. ``NORM`` (not with ``KBLOCK``): a folded
    RMSNorm, as :func:`act_kernels.quantize_rows` applies it (codes of x times its weight, the row's factor in
    the scale)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    if not KBLOCK:
        # phase 1: the rows' absmax over all of K (re-read by every column tile; small M keeps it in L2)
        offs_c = tl.arange(0, A_CHUNK)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, A_CHUNK):
            xc = tl.load(x_rows + (k0 + offs_c)[None, :], mask=(k0 + offs_c)[None, :] < K, other=0.0)
            yc, ss = rms_part(input_act(xc.to(tl.float32), A_ACT), ss, nw_ptr, k0 + offs_c, K, NORM)
            amax = tl.maximum(amax, tl.max(tl.abs(yc), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
    inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
    # phase 2: quantize each A tile in registers, int8 dot
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_rows + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xa = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            rem = K - kk * BLOCK_K
            xa = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0)
        y = rms_weighted(input_act(xa.to(tl.float32), A_ACT), nw_ptr, kk * BLOCK_K + offs_k, K, NORM)
        if KBLOCK:
            amax_t = tl.max(tl.abs(y), axis=1)
            s_t = tl.where(amax_t > 0, tl.math.div_rn(amax_t, 127.0), 1.0)
            a = rne_int8(y * (1.0 / s_t)[:, None])
            acc_f += tl.dot(a, b, out_dtype=tl.int32).to(tl.float32) * s_t[:, None]
        else:  # the activation quantizer's codes (x / scale rounded as div_rn): the two-launch path's, bit for bit
            a = quant_codes(y, scale[:, None], inv[:, None], 127.0, 0).to(tl.int8)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if KBLOCK:
        out = acc_f
    else:
        if NORM == 1 or NORM == 2:
            scale = scale * tl.math.rsqrt(ss / K + eps)
        out = acc.to(tl.float32) * scale[:, None]
    _store(out, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS,
           h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def fused_rows(x_ptr, b_ptr, c_ptr, q_ptr, sa_ptr, sb_ptr, bias_ptr, sync_ptr, M, N, K, stride_xm, stride_bn,
               stride_cm, ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
               HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr, A_ACT: tl.constexpr, QR: tl.constexpr,
               BK: tl.constexpr, NCH: tl.constexpr, nw_ptr, eps, GR, QP, NORM: tl.constexpr, PHASE: tl.constexpr):
    """W8A8 in one launch from 64 rows: the first ``QP`` programs of a row block (at most its ``cdiv(N, BLOCK_N)``)
    quantize its rows between them (x's codes and scales into ``q`` / ``sa``, :func:`act_kernels.quantize_rows`:
    the activation kernel's, bit for bit), every program of the block waits for those, then multiplies its output
    tile from the int8 rows (L2 loads: other programs wrote them). Tiles go out in row-block order by a ticket
    taken at program start (``sync[0]``), so every program a waiting one needs has started: no co-residency is
    assumed past a row block's ``QP`` quantizing programs, which wait for each other (a layer of any width: the
    programs past ``QP`` wait only on lower tickets). ``sync[1 + row block]`` counts arrivals, then departures;
    the last ticket and the last departure reset them, so the counters start and end zeroed. ``PHASE`` 1 / 2: the
    quantization / the GEMM alone, for Triton's CPU interpreter (it runs programs one after another, so a wait
    would never end); 0: both, synchronized.
    ``NORM``: a folded RMSNorm or modulated LayerNorm (:func:`act_kernels.quantize_rows`; ``GR`` rows per
    modulation group)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = block_place(sync_ptr, tl.cdiv(M, BLOCK_M), num_n, PHASE == 0)
    if PHASE != 2:
        if pid_n < QP:
            for g in range(pid_n, BLOCK_M // QR, QP):  # this program's groups of QR rows
                quantize_rows(x_ptr, q_ptr, sa_ptr, sa_ptr, pid_m * BLOCK_M + g * QR + tl.arange(0, QR), M, K,
                              stride_xm, K, 127.0, BK, NCH, 0, 0, A_ACT, nw_ptr, eps, GR, NORM)
    if PHASE == 0:  # the row block's codes written, by its QP quantizing programs
        block_wait(sync_ptr + 1 + pid_m, (pid_n < QP).to(tl.int32), QP, num_n)
    if PHASE != 1:
        acc = _mainloop(q_ptr, b_ptr, M, N, K, K, stride_bn, pid_m, pid_n, tl.int32, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN_K, False, 0, ".cg")
        _store(_row_scale(acc, sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
               BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def w4a8(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
         ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
         HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    """int8 A (K permuted per BLOCK_K block: evens then odds) x packed int4 B [N, K/2]; K % BLOCK_K == 0."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_h = tl.arange(0, HALF)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_h[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_h[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _kk in range(0, K // BLOCK_K):
        a_even = tl.load(a_ptrs)
        a_odd = tl.load(a_ptrs + HALF)
        p = tl.load(b_ptrs)  # [HALF, BLOCK_N]: byte j holds columns 2j (low nibble) and 2j+1 (high)
        lo = (p << 4) >> 4  # arithmetic shifts on int8: sign-extended low nibble
        hi = p >> 4
        acc = tl.dot(a_even, lo, acc, out_dtype=tl.int32)
        acc = tl.dot(a_odd, hi, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += HALF
    _store(_row_scale(acc, sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
           BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def w4a8_swapped(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                 ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
                 HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    """:func:`w4a8` with the operands swapped: ``acc^T [BLOCK_N, BLOCK_M] = unpack(B) @ A^T``, transposed back
    for the epilogue. Hopper's wgmma reads its first operand from registers, so the int4 weight unpacked in
    registers feeds the MMA directly while the activation tiles (K-major, as 8-bit wgmma wants its second operand)
    stream into shared memory through the pipeline; in :func:`w4a8`'s order the computed weight is the second
    operand and goes through shared memory every K step. Same integer sums: bit-equal outputs."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_h = tl.arange(0, HALF)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[None, :] * stride_am + offs_h[:, None]  # [HALF, BLOCK_M]: A^T
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_h[None, :]  # [BLOCK_N, HALF] packed
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for _kk in range(0, K // BLOCK_K):
        a_even = tl.load(a_ptrs)
        a_odd = tl.load(a_ptrs + HALF)
        p = tl.load(b_ptrs)  # byte j of a row holds columns 2j (low nibble) and 2j+1 (high)
        lo = (p << 4) >> 4
        hi = p >> 4
        acc = tl.dot(lo, a_even, acc, out_dtype=tl.int32)
        acc = tl.dot(hi, a_odd, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += HALF
    _store(_row_scale(tl.trans(acc), sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m,
           pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit(do_not_specialize=["M"])
def w4a8_joined(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, h_ptr, u_ptr, R, stride_hm, stride_ur,
                HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr):
    """:func:`w4a8_swapped` with both nibbles in one MMA per K step, on A in its natural column order (no K
    permutation): ``join(low, high)`` reshaped to ``[BLOCK_N, BLOCK_K]`` is byte j's columns 2j, 2j+1 in place,
    which is already wgmma's register-operand layout (4 consecutive K a thread: two packed bytes), so no layout
    conversion. Triton waits on every wgmma whose operand is in registers, so one MMA of K = BLOCK_K per step
    instead of two of half that halves the waits. K % BLOCK_K == 0. Same integer sums: bit-equal."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[None, :] * stride_am + tl.arange(0, BLOCK_K)[:, None]  # [BLOCK_K, BLOCK_M]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + tl.arange(0, HALF)[None, :]  # [BLOCK_N, HALF]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for _kk in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        p = tl.load(b_ptrs)
        w = nibble_codes(p, BLOCK_N, BLOCK_K)
        acc = tl.dot(w, a, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += HALF
    _store(_row_scale(tl.trans(acc), sa_ptr, M, pid_m, BLOCK_M), sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m,
           pid_n, BLOCK_M, BLOCK_N, ROW_SB, HAS_BIAS, h_ptr, u_ptr, R, stride_hm, stride_ur, HAS_LR, LR_IEEE)


@triton.jit
def dequant(w_ptr, s_ptr, out_ptr, N, K, stride_w, stride_o, ROW_SB: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr = 0, stride_s=0):
    """``out = w * s`` (row or tensor scale; ``SCALE_BLOCK`` > 0: one scale per ``SCALE_BLOCK`` square tile, ``s``
    ``[ceil(N/b), ceil(K/b)]`` with row stride ``stride_s``) in out's 16-bit dtype: the weight for a cuBLAS GEMM."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :], mask=mask)
    if SCALE_BLOCK > 0:
        s = tl.load(s_ptr + (offs_n // SCALE_BLOCK)[:, None] * stride_s + (offs_k // SCALE_BLOCK)[None, :],
                    mask=mask, other=0.0)
    elif ROW_SB:
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr)
    out = w.to(tl.float32) * s
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_o + offs_k[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
