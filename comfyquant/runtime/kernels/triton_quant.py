"""Triton activation kernels: (group-wise regular-Hadamard rotation +) per-row quantization.

Three kernels. "rows": a row per program, the rotation the radix-4 butterfly of ``quant.hadamard.fast_hadamard``
in registers (H4/2 along each base-4 digit of the in-group index); any group, fp32 rows, static fp8 scales.
"tiles": tiles of rows, two passes (absmax, then codes), the rotation a tensor-core product with the dense
Hadamard of groups up to 64 (256: each quarter by the 64-group's, then one radix-4 stage across the quarters,
elementwise); fp16/bf16 rows. "blocks": unrotated only, rows in registers or in two unrolled passes over
chunks, the division a reciprocal and one FMA correction (bit-equal to ``div_rn``). "auto" (the default)
picks per call by the H200 timings (``benchmarks/bench_act_quant.py``; ``benchmarks/gpu_session.py``, section
``rotation``; :func:`pick_kernel`). Modes:
``int8`` (absmax/127, round-half-even), ``fp8`` (absmax/fp8_max, or a static scale), ``float`` (rotation only).
Imported lazily: only GPU backends import this module.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from comfyquant.quant.hadamard import hadamard_matrix
from comfyquant.runtime.kernels import scratch
from comfyquant.runtime.kernels.acts import GATED_CODES
from comfyquant.runtime.kernels.configs import cdiv, next_power_of_2
from comfyquant.runtime.kernels.launch import FastKernel, device_facts, stream_id
from comfyquant.runtime.kernels.scratch import row_scales

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 to the nearest integer, ties to even
MODE_INT8, MODE_FP8, MODE_FP8_STATIC, MODE_FLOAT = 0, 1, 2, 3
SINGLE_PASS_MAX = 8192  # rows up to this (padded) length are held in registers: one read of x
CHUNK = 4096  # longer rows: two passes over chunks (absmax, then quantize; the re-read hits L2)


@triton.jit
def _h4_stage(x, A: tl.constexpr, B: tl.constexpr):
    """Apply H4/2 along the middle axis of the ``[A, 4, B]`` view of the 1-D block ``x``."""
    y = tl.reshape(x, (A, 4, B))
    y = tl.permute(y, (0, 2, 1))
    y = tl.reshape(y, (A, B, 2, 2))
    lo, hi = tl.split(y)  # lo: digits 0, 2; hi: digits 1, 3 (index = 2*i1 + i0)
    a, c = tl.split(lo)
    b, d = tl.split(hi)
    s = (a + b + c + d) * 0.5
    # rows of H4: (1,1,1,-1), (1,1,-1,1), (1,-1,1,1), (-1,1,1,1)  =>  y_i = s - x_(3-i)
    out = tl.join(tl.join(s - d, s - b), tl.join(s - c, s - a))
    out = tl.reshape(out, (A, B, 4))
    out = tl.permute(out, (0, 2, 1))
    return tl.reshape(out, (A * 4 * B,))


@triton.jit
def _rotate(x, N: tl.constexpr, STAGES: tl.constexpr):
    """Group-wise regular Hadamard (group ``4**STAGES``, ``STAGES <= MAX_STAGES``) on a 1-D block of ``N`` fp32
    values."""
    if STAGES >= 1:
        x = _h4_stage(x, N // 4, 1)
    if STAGES >= 2:
        x = _h4_stage(x, N // 16, 4)
    if STAGES >= 3:
        x = _h4_stage(x, N // 64, 16)
    if STAGES >= 4:
        x = _h4_stage(x, N // 256, 64)
    if STAGES >= 5:
        x = _h4_stage(x, N // 1024, 256)
    if STAGES >= 6:
        x = _h4_stage(x, N // 4096, 1024)
    if STAGES >= 7:
        x = _h4_stage(x, N // 16384, 4096)
    if STAGES >= 8:
        x = _h4_stage(x, N // 65536, 16384)
    return x


@triton.jit
def input_act(x, ACT: tl.constexpr):
    """``acts.INPUT_ACTS`` on fp32 ``x``: 1 gelu (tanh approximation), 2 gelu (erf), 3 silu; 0 none."""
    if ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        return x * tl.sigmoid(x)
    else:
        return x


@triton.jit
def _load_act(ptrs, mask, K, ACT: tl.constexpr):
    """x at ``ptrs`` in fp32 (zero where masked) after the input activation; the gated ones read the row's
    second half ``K`` columns further on (the row holds 2K): swiglu (4) ``silu(x) * second``, geglu (5)
    ``x * gelu(second)`` (erf), gated_gelu_tanh (6) ``gelu_tanh(x) * second`` (code 1's gelu)."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 4:
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        return x * tl.sigmoid(x) * up
    if ACT == 5:
        gate = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        return x * input_act(gate, 2)
    if ACT == 6:
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        return input_act(x, 1) * up
    return input_act(x, ACT)


@triton.jit
def _read(x_row, o, K, BLOCK: tl.constexpr, STAGES: tl.constexpr, ACT: tl.constexpr):
    """Elements ``o`` of one row in fp32 (zero past K), after the input activation and the rotation."""
    return _rotate(_load_act(x_row + o, o < K, K, ACT), BLOCK, STAGES)


@triton.jit
def _div(x, s, inv):
    """``x / s`` rounded to nearest as ``div_rn`` rounds it, from ``inv = div_rn(1, s)``: a product and one FMA
    correction (Markstein: exact where the quotient is a normal float32; a zero or underflowing product keeps
    its own value, which rounds to the same code). ``div_rn`` per element is ~10 instructions, which at 2-3 bytes
    per element made the row kernel compute-bound."""
    q = x * inv
    return tl.where(q == 0, q, tl.fma(tl.fma(-q, s, x), inv, q))


@triton.jit
def quant_codes(x, scale, inv, qmax, MODE: tl.constexpr):
    """int8 (MODE 0: round half to even) or fp8 (clamped; the store's cast rounds) codes of ``x`` at ``scale``,
    ``inv = div_rn(1, scale)``."""
    y = _div(x, scale, inv)
    if MODE == 0:
        return (y + RNE_MAGIC) - RNE_MAGIC  # integral-valued fp32; the store casts it exactly
    return tl.clamp(y, -qmax, qmax)


@triton.jit
def _quantize(x, scale, qmax, MODE: tl.constexpr):
    """:func:`quant_codes` with the reciprocal taken here (one per row: ``scale`` is a row's scalar or a column)."""
    return quant_codes(x, scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), qmax, MODE)


@triton.jit
def _dst(o, PERM: tl.constexpr):
    """Store offset of element ``o``: identity, or evens-then-odds inside each ``PERM`` block (W4A8 order)."""
    if PERM == 0:
        return o
    r = o % PERM
    return o - r + (r % 2) * (PERM // 2) + r // 2


@triton.jit
def _act_kernel(x_ptr, out_ptr, s_ptr, static_s_ptr, K, stride_xm, stride_om, qmax,
                BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, STAGES: tl.constexpr, MODE: tl.constexpr,
                PERM: tl.constexpr, ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    o_row = out_ptr + row * stride_om
    if MODE == 3:  # rotation only
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read(x_row, o, K, BLOCK, STAGES, ACT)
            tl.store(o_row + o, x.to(out_ptr.dtype.element_ty), mask=o < K)
    elif MODE == 2:  # fp8 with a static scale
        scale = tl.load(static_s_ptr).to(tl.float32)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read(x_row, o, K, BLOCK, STAGES, ACT)
            tl.store(o_row + o, _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty), mask=o < K)
        tl.store(s_ptr + row, scale)  # per row like the dynamic modes: a GEMM epilogue reads one layout
    elif NUM_CHUNKS == 1:
        x = _read(x_row, offs, K, BLOCK, STAGES, ACT)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
        tl.store(o_row + _dst(offs, PERM), _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty),
                 mask=offs < K)
        tl.store(s_ptr + row, scale)
    else:
        amax = tl.zeros((), dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read(x_row, o, K, BLOCK, STAGES, ACT)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read(x_row, o, K, BLOCK, STAGES, ACT)
            tl.store(o_row + _dst(o, PERM), _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty),
                     mask=o < K)
        tl.store(s_ptr + row, scale)


@triton.jit
def _tile(ptrs, rmask, cmask, h, K, ROT: tl.constexpr, ACT: tl.constexpr):
    """One ``[BM, C]`` tile of rows (zero past M and K) in fp32, activated; with ``ROT``, activated in fp32 and
    rounded back to x's dtype (what the model's own activation module returns), then times the ``C x C``
    Hadamard ``h``: products of x and +-1/sqrt(C) are exact in x's dtype, sums in fp32."""
    mask = rmask[:, None] & cmask[None, :]
    if ROT:
        if ACT != 0:
            x = _load_act(ptrs, mask, K, ACT).to(h.dtype)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
        return tl.dot(x, h)
    return _load_act(ptrs, mask, K, ACT)


@triton.jit
def _quarters(ptrs, rmask, cmask, h, K, C: tl.constexpr, ACT: tl.constexpr):
    """A ``4C``-column group rotated as four ``[BM, C]`` quarters: each quarter times the ``C x C`` Hadamard on
    tensor cores, then the group's top radix-4 stage across the quarters, elementwise (H4/2: y_i = s - t_(3-i),
    s = (t0 + t1 + t2 + t3) / 2). No layout conversion between the stages."""
    t0 = _tile(ptrs, rmask, cmask, h, K, 1, ACT)
    t1 = _tile(ptrs + C, rmask, cmask, h, K, 1, ACT)
    t2 = _tile(ptrs + 2 * C, rmask, cmask, h, K, 1, ACT)
    t3 = _tile(ptrs + 3 * C, rmask, cmask, h, K, 1, ACT)
    s = (t0 + t1 + t2 + t3) * 0.5
    return s - t3, s - t2, s - t1, s - t0


@triton.jit
def _rowmax(y):
    return tl.max(tl.abs(y), axis=1)


@triton.jit
def _put(o_rows, offs, y, scale, qmax, rmask, cmask, MODE: tl.constexpr, PERM: tl.constexpr):
    """Store one tile: its codes at ``scale`` (int8/fp8), or the values themselves (MODE_FLOAT)."""
    if MODE != 3:
        y = _quantize(y, scale[:, None], qmax, MODE)
    tl.store(o_rows + _dst(offs, PERM)[None, :], y.to(o_rows.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _tile_amax(x_tile, rmask, cols, h, K, k_lo, k_end, STEP: tl.constexpr, UNROLL: tl.constexpr, C: tl.constexpr,
               BM: tl.constexpr, ROT: tl.constexpr, ACT: tl.constexpr):
    """The rows' absmax over columns ``[k_lo, k_end)`` after the activation and rotation, ``UNROLL`` steps per
    iteration (their loads in flight together)."""
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c00 in range(k_lo, k_end, STEP * UNROLL):
        for u in tl.static_range(UNROLL):
            c0 = c00 + u * STEP
            cmask = c0 + cols < K
            if ROT == 2:
                y0, y1, y2, y3 = _quarters(x_tile + c0, rmask, cmask, h, K, C, ACT)
                a = tl.maximum(tl.maximum(_rowmax(y0), _rowmax(y1)), tl.maximum(_rowmax(y2), _rowmax(y3)))
            else:
                a = _rowmax(_tile(x_tile + c0, rmask, cmask, h, K, ROT, ACT))
            amax = tl.maximum(amax, a)
    return amax


@triton.jit
def _act_tile_kernel(x_ptr, out_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_om, qmax,
                     C: tl.constexpr, STEP: tl.constexpr, BM: tl.constexpr, ROT: tl.constexpr, MODE: tl.constexpr,
                     PERM: tl.constexpr, ACT: tl.constexpr, UNROLL: tl.constexpr, KC, P, SPLIT: tl.constexpr):
    """``BM`` rows per program, ``STEP`` columns at a time (ROT 0: no rotation, STEP = C; 1: a group of ``C``
    times its Hadamard, STEP = C; 2: a group of ``STEP = 4C`` as :func:`_quarters`), ``UNROLL`` steps per loop
    iteration (their loads in flight together: short programs are latency-bound): per-row int8/fp8 in two
    passes over the rows (absmax, then codes; the second read hits L2 only while the resident programs' rows
    fit it: not at 16 rows x 12,288 columns), or the rotated values (MODE_FLOAT).

    ``SPLIT`` (launched for int8 codes; too few row blocks to fill the GPU): program ``(rows, p)`` takes columns
    ``[p KC, (p + 1) KC)``, in two launches: SPLIT 1 writes its part of the rows' absmax to ``s[M + p M + r]``
    (the scales' buffer holds ``(1 + P) M`` floats), SPLIT 2 takes the maximum of the ``P`` parts, scales and
    quantizes its columns (program 0 stores the scales). The codes do not depend on ``UNROLL`` or the split:
    each step's arithmetic is the same and a maximum is order-free."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.arange(0, C)
    if ROT != 0:
        h = tl.load(h_ptr + cols[:, None] * C + cols[None, :])
    else:
        h = 0
    x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
    p = tl.program_id(1)
    k_lo = p * KC
    k_end = tl.minimum(K, k_lo + KC)
    if SPLIT == 1:
        amax = _tile_amax(x_tile, rmask, cols, h, K, k_lo, k_end, STEP, UNROLL, C, BM, ROT, ACT)
        tl.store(s_ptr + M + p * M + rows, amax, mask=rmask)
    else:
        scale = tl.full((BM,), 1.0, tl.float32)
        if MODE != 3:
            if SPLIT == 2:
                amax = tl.zeros((BM,), dtype=tl.float32)
                for t in range(P):
                    amax = tl.maximum(amax, tl.load(s_ptr + M + t * M + rows, mask=rmask, other=0.0))
            else:
                amax = _tile_amax(x_tile, rmask, cols, h, K, k_lo, k_end, STEP, UNROLL, C, BM, ROT, ACT)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
            tl.store(s_ptr + rows, scale, mask=rmask & (p == 0))
        for c00 in range(k_lo, k_end, STEP * UNROLL):
            for u in tl.static_range(UNROLL):
                c0 = c00 + u * STEP
                cmask = c0 + cols < K
                if ROT == 2:
                    y0, y1, y2, y3 = _quarters(x_tile + c0, rmask, cmask, h, K, C, ACT)
                    _put(o_rows, c0 + cols, y0, scale, qmax, rmask, cmask, MODE, PERM)
                    _put(o_rows, c0 + C + cols, y1, scale, qmax, rmask, cmask, MODE, PERM)
                    _put(o_rows, c0 + 2 * C + cols, y2, scale, qmax, rmask, cmask, MODE, PERM)
                    _put(o_rows, c0 + 3 * C + cols, y3, scale, qmax, rmask, cmask, MODE, PERM)
                else:
                    _put(o_rows, c0 + cols, _tile(x_tile + c0, rmask, cmask, h, K, ROT, ACT), scale, qmax, rmask,
                         cmask, MODE, PERM)


@triton.jit
def take_ticket(sync_ptr, total):
    """This program's place in launch order (``sync[0]`` counts them out; the last of ``total`` resets it, so the
    next launch starts from zero): programs that hand work out in this order wait only on ones already started."""
    t = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if t == total - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
    return t


@triton.jit
def block_place(sync_ptr, blocks, per_block, SYNC: tl.constexpr):
    """(block, index within it) of this program: by :func:`take_ticket` when the programs of a block wait for each
    other (``SYNC``), else by program id (Triton's CPU interpreter runs them one after another)."""
    if SYNC:
        t = take_ticket(sync_ptr, blocks * per_block)
    else:
        t = tl.program_id(0)
    return t // per_block, t % per_block


@triton.jit
def block_barrier(flag, n):
    """Wait until the ``n`` programs sharing ``flag`` have arrived: every thread's stores are made before the
    arrival is released, the wait acquires; the counter counts arrivals, then departures, and the last departure
    resets it (zero before and after a launch)."""
    tl.debug_barrier()
    tl.atomic_add(flag, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    while seen < n:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    if tl.atomic_add(flag, 1, sem="relaxed", scope="gpu") == 2 * n - 1:
        tl.atomic_xchg(flag, 0, sem="relaxed", scope="gpu")


@triton.jit
def _act_held_kernel(x_ptr, out_ptr, s_ptr, h_ptr, sync_ptr, M, K, stride_xm, stride_om, qmax, P,
                     BM: tl.constexpr, HELD: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr,
                     ACT: tl.constexpr, PHASE: tl.constexpr):
    """Rotated (group 256) per-row int8 codes with x read once: program (row block, chunk ``p``) rotates its
    ``HELD`` groups of 256 columns into registers (:func:`_quarters`), writes its rows' absmax part to
    ``s[M + p M + r]`` (the scales' buffer holds ``(1 + P) M`` floats), waits for the row block's ``P`` programs,
    takes the maximum of the parts and stores its codes from registers (chunk 0 the scales). The tile kernel
    rotates every group twice and reads x twice (from HBM once its programs' rows outgrow L2); the codes are its
    own: the same arithmetic per group, and a maximum is order-free. Programs take tickets in row-block order
    (:func:`block_place`) and wait only on their block's ``P`` (at most one per SM, :func:`held_apply`) at
    ``sync[1 + block]`` (:func:`block_barrier`), as ``triton_gemm.fused_rows`` does. ``PHASE`` 1 / 2: the parts /
    the codes alone, for Triton's CPU interpreter (it runs programs one after another, so a wait would never
    end); 0: both, synchronized."""
    C: tl.constexpr = 64
    STEP: tl.constexpr = 256
    pid_m, p = block_place(sync_ptr, tl.cdiv(M, BM), P, PHASE == 0)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.arange(0, C)
    h = tl.load(h_ptr + cols[:, None] * C + cols[None, :])
    x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
    c0 = p * (STEP * HELD)
    cm0 = c0 + cols < K
    y0, y1, y2, y3 = _quarters(x_tile + c0, rmask, cm0, h, K, C, ACT)
    amax = tl.maximum(tl.maximum(_rowmax(y0), _rowmax(y1)), tl.maximum(_rowmax(y2), _rowmax(y3)))
    if HELD == 2:
        c1 = c0 + STEP
        cm1 = c1 + cols < K
        z0, z1, z2, z3 = _quarters(x_tile + c1, rmask, cm1, h, K, C, ACT)
        amax = tl.maximum(amax, tl.maximum(tl.maximum(_rowmax(z0), _rowmax(z1)),
                                           tl.maximum(_rowmax(z2), _rowmax(z3))))
    if PHASE != 2:
        tl.store(s_ptr + M + p * M + rows, amax, mask=rmask)
    if PHASE == 0:
        block_barrier(sync_ptr + 1 + pid_m, P)
    if PHASE != 1:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for j in range(P):  # L2 loads: the other programs wrote them
            amax = tl.maximum(amax, tl.load(s_ptr + M + j * M + rows, mask=rmask, other=0.0, cache_modifier=".cg"))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
        tl.store(s_ptr + rows, scale, mask=rmask & (p == 0))
        _put(o_rows, c0 + cols, y0, scale, qmax, rmask, cm0, MODE, PERM)
        _put(o_rows, c0 + C + cols, y1, scale, qmax, rmask, cm0, MODE, PERM)
        _put(o_rows, c0 + 2 * C + cols, y2, scale, qmax, rmask, cm0, MODE, PERM)
        _put(o_rows, c0 + 3 * C + cols, y3, scale, qmax, rmask, cm0, MODE, PERM)
        if HELD == 2:
            _put(o_rows, c1 + cols, z0, scale, qmax, rmask, cm1, MODE, PERM)
            _put(o_rows, c1 + C + cols, z1, scale, qmax, rmask, cm1, MODE, PERM)
            _put(o_rows, c1 + 2 * C + cols, z2, scale, qmax, rmask, cm1, MODE, PERM)
            _put(o_rows, c1 + 3 * C + cols, z3, scale, qmax, rmask, cm1, MODE, PERM)


@triton.jit
def _act_block_kernel(x_ptr, out_ptr, s_ptr, static_s_ptr, M, K, stride_xm, stride_om, qmax,
                      R: tl.constexpr, BK: tl.constexpr, NCH: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr,
                      ACT: tl.constexpr):
    """Unrotated per-row int8 / fp8 (dynamic or static scale) of ``R`` rows per program: :func:`quantize_rows`."""
    quantize_rows(x_ptr, out_ptr, s_ptr, static_s_ptr, tl.program_id(0) * R + tl.arange(0, R), M, K, stride_xm,
                  stride_om, qmax, BK, NCH, MODE, PERM, ACT)


@triton.jit
def quantize_rows(x_ptr, out_ptr, s_ptr, static_s_ptr, rows, M, K, stride_xm, stride_om, qmax, BK: tl.constexpr,
                  NCH: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr, ACT: tl.constexpr):
    """Codes and scales of the rows ``rows`` (those < M), ``BK`` columns at a time: one pass with the rows in
    registers when ``NCH == 1``, else two unrolled passes over ``NCH`` chunks (absmax, then codes; the re-read
    hits L2); :func:`_div` instead of a division per element. The block kernel's body, and the one-launch W8A8
    kernel's (``triton_gemm.fused_rows``) share of its row block: the same codes from either."""
    R: tl.constexpr = rows.shape[0]
    rmask = rows < M
    cols = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
    if MODE == 2:
        scale = tl.zeros((R,), dtype=tl.float32) + tl.load(static_s_ptr).to(tl.float32)
    elif NCH == 1:
        mask = rmask[:, None] & (cols < K)[None, :]
        x = _load_act(x_rows + cols[None, :], mask, K, ACT)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
    else:
        amax = tl.zeros((R,), dtype=tl.float32)
        for c in tl.static_range(NCH):
            o = c * BK + cols
            x = _load_act(x_rows + o[None, :], rmask[:, None] & (o < K)[None, :], K, ACT)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
    inv = tl.math.div_rn(tl.full((R,), 1.0, tl.float32), scale)
    if NCH == 1 and MODE != 2:
        y = quant_codes(x, scale[:, None], inv[:, None], qmax, MODE)
        tl.store(o_rows + _dst(cols, PERM)[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for c in tl.static_range(NCH):
            o = c * BK + cols
            mask = rmask[:, None] & (o < K)[None, :]
            y = quant_codes(_load_act(x_rows + o[None, :], mask, K, ACT), scale[:, None], inv[:, None], qmax, MODE)
            tl.store(o_rows + _dst(o, PERM)[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


MAX_STAGES = 8  # _rotate's radix-4 stages: groups up to 4**8 = 65536 (the format allows any power of 4)


def _stages(group: int | None) -> int:
    stages = 0 if group is None else (group.bit_length() - 1) // 2
    if stages > MAX_STAGES:
        raise ValueError(f"convrot group {group} is larger than the Triton rotation's {4 ** MAX_STAGES}")
    return stages


_ACT = FastKernel(_act_kernel)
_ACT_TILES = FastKernel(_act_tile_kernel)
_ACT_BLOCKS = FastKernel(_act_block_kernel)
_ACT_HELD = FastKernel(_act_held_kernel)
KERNELS = ("rows", "tiles", "split", "held", "blocks", "auto")
DEFAULT_KERNEL = "auto"  # what the linears and their plans run: pick_kernel per call
DOT_GROUPS = (16, 64, 256)  # 256: four quarters times the 64-group's Hadamard (an 8 KB operand) + one H4 stage
DOT_ROWS = 64  # rows per program of the rotating tile kernel: one warpgroup's wgmma M
DOT_ROWS_MIN = 16  # tl.dot's least M: 4x the programs where 64-row ones would leave SMs idle
TILE_ELEMS = 4096  # elements per tile of the plain tile kernel (rows x columns)


@functools.lru_cache(maxsize=32)
def _hadamard(group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense normalized regular Hadamard in ``dtype`` (entries +-1/sqrt(group): exact for groups <= 2^16)."""
    return hadamard_matrix(group, torch.float64).to(device=device, dtype=dtype).contiguous()


def out_width(x: torch.Tensor, act: int) -> int:
    """Columns of the output (K): x's, or half of them for a gated activation (its rows hold both halves)."""
    k = int(x.shape[-1])
    if act in GATED_CODES:
        if k % 2:
            raise ValueError(f"a gated input activation needs an even input width, got {k}")
        return k // 2
    return k


def tiles_apply(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0) -> bool:
    """Whether the tile kernel (``kernel="tiles"``) handles this call: unrotated int8/fp8 codes of any rows, or
    the rotation (int8 codes or rotated values) of fp16/bf16 rows by a group of :data:`DOT_GROUPS` dividing K.
    Elsewhere (larger groups, fp32 rows to rotate, static fp8 scales) the row kernel runs."""
    if group is None:
        return mode in (MODE_INT8, MODE_FP8)
    return (group in DOT_GROUPS and x2d.dtype in (torch.float16, torch.bfloat16)
            and out_width(x2d, act) % group == 0 and mode in (MODE_INT8, MODE_FLOAT))


def dot_rows(m: int, sms: int) -> int:
    """Rows per program of the rotating tile kernel: ``DOT_ROWS`` where those programs cover every SM, else
    ``DOT_ROWS_MIN`` (H200, runs 8-9: at M = 4096 the 64-row programs, 64 of them, ran 1.4-2.2x slower than
    the row kernel, the 16-row ones 0.70-0.88x its time for K <= 5120; at M = 16384 64 rows were 2-5% faster)."""
    return DOT_ROWS if cdiv(m, DOT_ROWS) >= sms else DOT_ROWS_MIN


ROT_STAGES = 3  # pipeline depth of the rotating tile kernel (run 41: 1.13-1.25x faster than 2 on every shape)
ROT_UNROLL = 2  # its steps per loop iteration in 16-row programs (run 41: 1.05-1.10x over 1 at M = 4096)


def rot_tile_config(m: int, sms: int) -> tuple[int, int, int, int]:
    """(rows, warps, stages, unroll) of the rotating tile kernel at ``m`` rows (H200, run 41,
    ``bench_rotation.py``, convrot 256, 54 configurations x 12 shapes: the best on every shape at M = 4096 /
    16384, where it runs 1.2-1.6x faster than the run 8-9 configuration (16 or 64 rows, 2 stages, no unroll))."""
    rows = dot_rows(m, sms)
    return rows, 4, ROT_STAGES, ROT_UNROLL if rows == DOT_ROWS_MIN else 1


# Rotated int8 rows too few for the tile kernel take its split form from ROT_SPLIT_MIN_M rows where each row is
# long (ROT_SPLIT_MIN_K) or the pass is large (ROT_SPLIT_MIN_ELEMS); shorter ones stay on the row kernel (H200,
# run 42, ``bench_rotation.py --split``, convrot 256: the split form 1.0-1.8x the row kernel's speed there, and
# 0.4-0.7x on 64-1,024 rows of 3,072-5,120 columns, where the row kernel's one pass in registers is short)
ROT_SPLIT_MIN_M = 64
ROT_SPLIT_MIN_K = 12288
ROT_SPLIT_MIN_ELEMS = 4 << 20
ROT_SPLIT_PROGRAMS = 4  # programs per SM its chunks aim at (run 42: 1.0-1.2x faster than 2 from 1,024 rows)


def split_chunks(m: int, k: int, group: int, sms: int, programs: int = ROT_SPLIT_PROGRAMS) -> int:
    """Column chunks of the split rotating tile kernel (see :func:`_act_tile_kernel`) for ``m`` x ``k`` rows:
    enough 16-row programs for ``programs`` per SM, each chunk a whole number of its unrolled steps
    (``ROT_UNROLL`` groups of 256, or of ``group`` below)."""
    steps = cdiv(k, _rot_step(group) * ROT_UNROLL)
    want = cdiv(programs * sms, cdiv(m, DOT_ROWS_MIN))
    return cdiv(steps, cdiv(steps, max(1, min(want, steps))))


def _rot_step(group: int) -> int:
    return 256 if group == 256 else group


# The one-read rotating kernel's launch: 64 rows x one group of 256 per program, 4 warps (H200 run 55,
# ``bench_rotation.py --held``: the fastest of 6 configurations on 18 of the 20 shapes from 1,024 rows)
HELD_ROWS = 64
HELD_GROUPS = 1
# ... and where "auto" takes it: from 1,024 rows, 2-16 M elements, rows up to 12,288 wide (run 55: 1.06-1.46x
# faster than the kernel picked before on 8 shapes there, e.g. 4,096 x 3,072 25.9 vs 30.5 µs; it scales worse
# than the pipelined tile kernel beyond: 4,096 x 15,360 1.18x slower, 16,384 rows 1.2-1.8x slower)
HELD_MIN_M = 1024
HELD_MAX_K = 12288
HELD_ELEMS = (2 << 20, 16 << 20)


def held_parts(k: int, held: int = HELD_GROUPS) -> int:
    """Column chunks (programs per row block) of the one-read rotating kernel for rows ``k`` wide."""
    return cdiv(k, 256 * held)


def held_apply(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, rows: int = HELD_ROWS,
               held: int = HELD_GROUPS) -> bool:
    """Whether the one-read rotating kernel (:func:`_act_held_kernel`) takes this call: int8 codes of fp16/bf16
    rows rotated by groups of 256 (:func:`tiles_apply`), a counter per row block within the shared counters, and
    a row block's programs no more than the SMs (a waiting program needs its block's others resident)."""
    if group != 256 or mode != MODE_INT8 or not tiles_apply(x2d, group, mode, act):
        return False
    m, k = int(x2d.shape[0]), out_width(x2d, act)
    return 1 + cdiv(m, rows) <= scratch.SPLIT_COUNTERS and held_parts(k, held) <= device_facts(x2d.device)[0]


def scale_floats(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, kernel: str = DEFAULT_KERNEL) -> int:
    """Floats the row-scale buffer of this call needs: M, or ``(1 + chunks) M`` where the split or the one-read
    rotating kernel runs (its absmax parts follow the scales)."""
    m = int(x2d.shape[0])
    kernel = pick_kernel(x2d, group, mode, act) if kernel == "auto" else kernel
    if kernel == "held" and held_apply(x2d, group, mode, act):
        return m * (1 + held_parts(out_width(x2d, act)))
    if kernel != "split" or not _splits(x2d, group, mode, act):
        return m
    return m * (1 + split_chunks(m, out_width(x2d, act), group, device_facts(x2d.device)[0]))


def _splits(x2d: torch.Tensor, group: int | None, mode: int, act: int) -> bool:
    return group is not None and mode == MODE_INT8 and tiles_apply(x2d, group, mode, act)


def block_config(m: int, k: int) -> tuple[int, int | None, int]:
    """(rows per program, columns per step or None for one pass, warps) of the block kernel, from the H200's
    timings of its configurations (run 35, ``bench_act_quant.py``: within 3% of the best of 12-24 on every
    shape, 1.06-1.9x faster than the row / tile kernels). Rows up to 8,192 wide in one pass; wider ones too while
    M <= 256 (latency-bound) or K is close to a power of two, else two passes over 4,096- or 2,048-column chunks
    (less masked work than a padded row); rows under 2,048 wide four to a program from M = 1,024."""
    full = next_power_of_2(max(k, 16))
    if k < 2048:
        chunk = min(256, k & -k)
        return (4, chunk, 4) if m >= 1024 and chunk >= 128 else (1, None, 4)
    if full <= 8192:
        if m >= 8192 and 2 * full >= 3 * k:
            return 1, 2048, 4
        return 1, None, 8 if m <= 256 and full == 8192 else 4
    if m <= 256 or 10 * full <= 11 * k:
        return 1, None, 16 if m <= 1024 else 8
    return 1, 4096 if k % 4096 == 0 else 2048, 4


def pick_kernel(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, held: bool = True) -> str:
    """The faster activation kernel for this call on the H200: unrotated, always the block kernel (run 35:
    1.06-1.9x the faster of the row and tile kernels on every shape from 256 x 768 to 16,384 x 15,360);
    rotated (runs 8-9, ``rotation`` section), "tiles" where :func:`tiles_apply` and its programs
    (:func:`dot_rows`) cover every SM at least once (below that the tile kernel ran 1.9-27x slower than the row
    kernel; at M = 16384 it was 1.6-2.3x faster); below that its split form (two launches over column chunks)
    for int8 codes of long rows (:data:`ROT_SPLIT_MIN_K`, :data:`ROT_SPLIT_MIN_ELEMS`), else "rows"; int8 codes
    by groups of 256 on mid-sized calls (:data:`HELD_MIN_M`, :data:`HELD_MAX_K`, :data:`HELD_ELEMS`): "held"
    (``held=False``: the choice among the others, which the timings recorded before that kernel judge)."""
    if group is None and mode in (MODE_INT8, MODE_FP8, MODE_FP8_STATIC):
        return "blocks"
    if not tiles_apply(x2d, group, mode, act):
        return "rows"
    m, k = int(x2d.shape[0]), out_width(x2d, act)
    if (held and m >= HELD_MIN_M and k <= HELD_MAX_K and HELD_ELEMS[0] <= m * k <= HELD_ELEMS[1]
            and held_apply(x2d, group, mode, act)):
        return "held"
    if cdiv(m, DOT_ROWS_MIN) >= device_facts(x2d.device)[0]:
        return "tiles"
    long_rows = k >= ROT_SPLIT_MIN_K or m * k >= ROT_SPLIT_MIN_ELEMS
    return "split" if m >= ROT_SPLIT_MIN_M and long_rows and mode == MODE_INT8 else "rows"


def _tile_width(k: int) -> int:
    """Columns per tile of the plain kernel: the largest power of two <= 1024 dividing K (no masked lanes), or
    K's next power of two up to 1024 (masked tail) when that would be below 64."""
    c = min(1024, k & -k)
    return c if c >= 64 else min(1024, next_power_of_2(max(k, 16)))


def _launch(x2d: torch.Tensor, group: int | None, mode: int, out_dtype: torch.dtype, qmax: float,
            static_scale: torch.Tensor | None = None, perm: int = 0, act: int = 0,
            kernel: str = DEFAULT_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape[0], out_width(x2d, act)
    out = torch.empty((m, k), dtype=out_dtype, device=x2d.device)
    if kernel == "auto":  # picked once for the scales' size and the launches
        kernel = pick_kernel(x2d, group, mode, act)
    floats = scale_floats(x2d, group, mode, act, kernel) if static_scale is None else m
    scale = row_scales(m, floats - m, x2d.device)
    for fk, grid, args, key, warps, stages in launch_for(x2d, out, scale, static_scale, group, mode, qmax, perm,
                                                         act, kernel):
        fk(grid, args, x2d.device, num_warps=warps, num_stages=stages, key=key)
    return out, scale


def launch_for(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
               group: int | None, mode: int, qmax: float, perm: int, act: int,
               kernel: str = DEFAULT_KERNEL) -> list[tuple]:
    """The launches, in order, of the activation kernel ``kernel`` picks for this call, each (FastKernel, grid,
    args, key, num_warps, num_stages) (:data:`KERNELS`; "blocks" without a rotation, "tiles" and "split" where
    :func:`tiles_apply`, else "rows"; "auto": :func:`pick_kernel`). ``args[0:3]`` are x, the output and the row
    scales (for "split" a view of a buffer of :func:`scale_floats` floats); ``args[3]`` what the kernel reads
    beside them: the static scale, or the row scales again (row and block kernels), or the group's Hadamard
    (tile kernel, fixed per device and dtype). One launch, or two for "split" (absmax parts, then codes)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown activation kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "auto":
        kernel = pick_kernel(x2d, group, mode, act)
    if kernel == "blocks" and group is None and mode != MODE_FLOAT:
        rows, chunk, warps = block_config(int(x2d.shape[0]), out_width(x2d, act))
        return [(_ACT_BLOCKS, *block_launch(x2d, out, scale, static_scale, mode, qmax, perm, act, rows, chunk,
                                            warps), 1)]
    if kernel == "held" and static_scale is None and held_apply(x2d, group, mode, act):
        sync = scratch.split_workspace(x2d.device).counters(stream_id(x2d.device))
        return [(_ACT_HELD, *held_launch(x2d, out, scale, sync, qmax, perm, act, phase=phase), 1)
                for phase in sync_phases(x2d.device)]
    if kernel == "split" and static_scale is None and _splits(x2d, group, mode, act):
        assert group is not None
        m, sms = int(x2d.shape[0]), device_facts(x2d.device)[0]
        chunks = split_chunks(m, out_width(x2d, act), group, sms)
        return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act, DOT_ROWS_MIN, 4,
                                          ROT_UNROLL, chunks, phase), ROT_STAGES) for phase in (1, 2)]
    if kernel in ("tiles", "split") and static_scale is None and tiles_apply(x2d, group, mode, act):
        if group is None:
            return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act), 2)]
        rows, warps, stages, unroll = rot_tile_config(int(x2d.shape[0]), device_facts(x2d.device)[0])
        return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act, rows, warps, unroll),
                 stages)]
    return [(_ACT, *act_launch(x2d, out, scale, static_scale, group, mode, qmax, perm, act), 3)]


def tile_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, group: int | None, mode: int,
                qmax: float, perm: int, act: int, rows: int | None = None, warps: int = 4,
                unroll: int = 1, chunks: int = 1, phase: int = 0) -> tuple:
    """(grid, args, key, num_warps) of the tile kernel (see :func:`tiles_apply`): with a group, ``rows`` rows
    per program (16 or more, a power of two; None: :func:`dot_rows`) and the group's Hadamard (groups 16 and 64)
    or the 64-group's applied to each quarter (group 256) as the product's operand; without, ``TILE_ELEMS`` per
    tile; ``unroll`` steps per loop iteration; ``phase`` 1 / 2 (``chunks`` > 1): one launch of the split form,
    ``chunks`` column chunks of whole unrolled steps (the scales' buffer holds ``(1 + chunks) M`` floats)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    if group is None:
        c, h, rot = _tile_width(k), scale, 0  # h: never read
        bm = max(1, min(64, TILE_ELEMS // c))
    else:
        bm = rows or dot_rows(m, device_facts(x2d.device)[0])
        c, rot = (64, 2) if group == 256 else (group, 1)
        h = _hadamard(c, x2d.dtype, x2d.device)
    step = 4 * c if rot == 2 else c
    kc, parts = k, 1
    if phase:
        kc = cdiv(cdiv(k, step * unroll), chunks) * step * unroll
        parts = cdiv(k, kc)
        if parts != chunks:
            raise ValueError(f"{chunks} chunks of whole {step * unroll}-column steps do not cover K = {k}")
    grid = (cdiv(m, bm), parts) if phase else (cdiv(m, bm),)
    return (grid, (x2d, out, scale, h, m, k, x2d.stride(0), out.stride(0), qmax, c, step, bm, rot, mode, perm, act,
                   unroll, kc, parts, phase),
            (c, bm, rot, mode, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, unroll, kc % 16 == 0, parts == 1, parts % 16 == 0, phase), warps)


def sync_phases(device: torch.device) -> tuple[int, ...]:
    """The launches of a kernel whose programs wait for each other (the one-read rotation, the row-block W8A8
    kernel): one synchronized (phase 0) on a GPU; under Triton's CPU interpreter, which runs programs one after
    another (a wait would never end), its first half, then its second (phases 1, 2)."""
    return (0,) if device.type == "cuda" else (1, 2)


def held_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, sync: torch.Tensor, qmax: float,
                perm: int, act: int, rows: int = HELD_ROWS, held: int = HELD_GROUPS, warps: int = 4,
                phase: int = 0) -> tuple:
    """(grid, args, key, num_warps) of the one-read rotating kernel (group 256, int8; see :func:`held_apply`):
    x, the codes, the scales (a view of ``(1 + held_parts) M`` floats) and the 64-group's Hadamard at
    ``args[0:4]``, the shared counters ``sync`` (zeroed; the launch leaves them so) at ``args[4]``."""
    m, k = x2d.shape[0], out_width(x2d, act)
    parts = held_parts(k, held)
    h = _hadamard(64, x2d.dtype, x2d.device)
    return ((cdiv(m, rows) * parts,),
            (x2d, out, scale, h, sync, m, k, x2d.stride(0), out.stride(0), qmax, parts, rows, held, MODE_INT8, perm,
             act, phase),
            (rows, held, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, parts, phase), warps)


def block_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
                 mode: int, qmax: float, perm: int, act: int, rows: int = 1, chunk: int | None = None,
                 warps: int = 4) -> tuple:
    """(grid, args, key, num_warps) of the block kernel: ``rows`` rows per program, ``chunk`` columns per step
    (a power of two; None: K's next power of two, one pass with the rows in registers)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    bk = chunk or next_power_of_2(max(k, 16))
    nch = cdiv(k, bk)
    static = static_scale if static_scale is not None else scale
    return ((cdiv(m, rows),), (x2d, out, scale, static, m, k, x2d.stride(0), out.stride(0), qmax, rows, bk, nch,
                               mode, perm, act),
            (rows, bk, nch, mode, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, static_scale is not None), warps)


def act_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
               group: int | None, mode: int, qmax: float, perm: int, act: int) -> tuple:
    """(grid, args, key, num_warps) of the activation kernel: x, output, scale and the scale it reads at
    ``args[0:4]`` (the dynamic scale itself when there is no static one)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    full = next_power_of_2(max(k, 16))
    block = full if full <= SINGLE_PASS_MAX else max(CHUNK, group or 0)
    static = static_scale if static_scale is not None else scale
    return ((m,), (x2d, out, scale, static, k, x2d.stride(0), out.stride(0), qmax, block, cdiv(k, block),
                   _stages(group), mode, perm, act),
            (block, cdiv(k, block), _stages(group), mode, perm, act, x2d.dtype, out.dtype, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, static_scale is not None),
            8 if block >= 4096 else 4)


def quantize_rows_int8(x2d: torch.Tensor, group: int | None = None, perm: int = 0, act: int = 0,
                       kernel: str = DEFAULT_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(Activate +) (rotate +) per-row int8: ``(q int8 [M,K], scale fp32 [M,1])``; ``perm`` > 0 stores each
    ``perm``-column block as its even columns then its odd ones (the W4A8 GEMM's order; K must be a multiple of
    ``perm``); ``act``: an ``acts.INPUT_ACTS`` code applied to x first (in fp32); ``kernel``: "rows" (a row
    per program, the rotation as an in-register butterfly) or "tiles" (row tiles, the rotation a tensor-core
    product, where :func:`tiles_apply`; else "rows") or "blocks" (unrotated: rows or chunks per program with a
    cheaper exact division; else "rows") or "auto" (:func:`pick_kernel`)."""
    if perm and out_width(x2d, act) % perm:
        raise ValueError(f"K={out_width(x2d, act)} is not a multiple of the permutation block {perm}")
    return _launch(x2d, group, MODE_INT8, torch.int8, 127.0, perm=perm, act=act, kernel=kernel)


def quantize_rows_fp8(x2d: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                      static_scale: torch.Tensor | None = None, act: int = 0,
                      kernel: str = DEFAULT_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 (dynamic) or saturating static-scale fp8: ``(q [M,K], scale fp32 [M,1])`` (static: the
    scalar written to every row, so GEMM epilogues read the same per-row layout either way); ``kernel`` as
    for :func:`quantize_rows_int8` (static scales always take "rows")."""
    qmax = float(torch.finfo(dtype).max)
    if static_scale is not None:
        return _launch(x2d, None, MODE_FP8_STATIC, dtype, qmax, static_scale.float().reshape(1), act=act,
                       kernel=kernel)
    return _launch(x2d, None, MODE_FP8, dtype, qmax, act=act, kernel=kernel)


def rotate_rows(x2d: torch.Tensor, group: int, act: int = 0, kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """(Activate +) group-wise regular-Hadamard rotation only, output in x's dtype (the small-batch convrot
    path); ``kernel`` as for :func:`quantize_rows_int8`."""
    return _launch(x2d, group, MODE_FLOAT, x2d.dtype, 1.0, act=act, kernel=kernel)[0]
