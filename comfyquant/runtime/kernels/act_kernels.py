"""Triton activation kernels: (group-wise regular-Hadamard rotation +) per-row quantization, the device code.

Five kernels. ``_act_kernel`` ("rows"): a row per program, the rotation the radix-4 butterfly of
``quant.hadamard.fast_hadamard`` in registers (H4/2 along each base-4 digit of the in-group index); any group,
fp32 rows, static fp8 scales. ``_act_tile_kernel`` ("tiles", "split"): tiles of rows, two passes (absmax, then
codes), the rotation a tensor-core product with the dense Hadamard of groups up to 64 (256: each quarter by the
64-group's, then one radix-4 stage across the quarters, elementwise); fp16/bf16 rows. ``_act_held_kernel``
("held"): the rotation of one group of 256 held in registers while a row block's programs exchange their
absmax parts (one read of x). ``_act_group_rows_kernel`` ("grows"): a row at a time, its groups of 256 the
tile's rows, the row rotated whole in registers (one read of x) up to 64 groups. ``_act_block_kernel``
("blocks"): unrotated only, rows in registers or in two unrolled passes over chunks, the division a reciprocal
and one FMA correction (bit-equal to ``div_rn``). Modes: ``int8`` (absmax/127, round-half-even), ``fp8``
(absmax/fp8_max, or a static scale), ``float`` (rotation only).
Which kernel a call takes, and its launch, is ``triton_quant``'s (the host side). The helpers the GEMM kernels
share (``input_act``, ``quant_codes``, ``quantize_rows``, the row-block tickets) live here too.
"""

from __future__ import annotations

import triton
import triton.language as tl

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 to the nearest integer, ties to even
MODE_INT8, MODE_FP8, MODE_FP8_STATIC, MODE_FLOAT = 0, 1, 2, 3
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
def _div(x, s, inv, SIGNED_ZERO: tl.constexpr = True):
    """``x / s`` rounded to nearest as ``div_rn`` rounds it, from ``inv = div_rn(1, s)``: a product and one FMA
    correction (Markstein: exact where the quotient is a normal float32; a zero or underflowing product keeps
    its own value, which rounds to the same code). ``div_rn`` per element is ~10 instructions, which at 2-3 bytes
    per element made the row kernel compute-bound. ``SIGNED_ZERO`` False (int8 codes): the select that keeps a
    zero quotient's sign is left out (the correction gives +0 for -0 / s; both are code 0), and the residual is
    ``fma(q, -s, x)`` (``-s`` once a row, not ``-q`` per element: the same value)."""
    q = x * inv
    if SIGNED_ZERO:
        y = tl.where(q == 0, q, tl.fma(tl.fma(-q, s, x), inv, q))
    else:
        y = tl.fma(tl.fma(q, -s, x), inv, q)
    return y


@triton.jit
def rne_int8(y):
    """int8 ``round_half_even(y)`` for ``|y| <= 127``: ``y + 1.5 * 2**23`` rounds it to an integer held in the
    float's low mantissa bits, so its bit pattern's low byte is the two's complement code. One add and a
    truncation, where add, subtract and a float-to-int conversion (a quarter-rate instruction) took three."""
    return (y + RNE_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def quant_codes(x, scale, inv, qmax, MODE: tl.constexpr):
    """int8 (MODE 0: round half to even, as int8) or fp8 (clamped fp32; the store's cast rounds) codes of ``x`` at
    ``scale``, ``inv = div_rn(1, scale)``."""
    if MODE == 0:
        codes = rne_int8(_div(x, scale, inv, False))
    else:
        codes = tl.clamp(_div(x, scale, inv), -qmax, qmax)
    return codes


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
def _read_norm(x_row, o, K, BLOCK: tl.constexpr, STAGES: tl.constexpr, ACT: tl.constexpr, nw_ptr,
               NORM: tl.constexpr, row, eps, GR):
    """:func:`_read` with a folded norm: (elements ``o`` times the norm's weight (``NORM`` 2) or column scale (3),
    or (4 / 5, the whole row in ``o``) the modulated LayerNorm / RMSNorm of row ``row`` (:func:`layer_mod`), then
    rotated; the sum of squares of the elements before the weight (``NORM`` 1 / 2, else 0))."""
    x = _load_act(x_row + o, o < K, K, ACT)
    ss = tl.zeros((), dtype=tl.float32)
    if NORM == 1 or NORM == 2:
        ss = tl.sum(x * x, axis=0)
    if NORM == 2 or NORM == 3:
        x = x * tl.load(nw_ptr + o, mask=o < K, other=0.0).to(tl.float32)
    if NORM >= 4:
        x = tl.reshape(layer_mod(tl.reshape(x, (1, BLOCK)), row + tl.zeros((1,), tl.int64), o, (o < K)[None, :], K,
                                 nw_ptr, eps, GR, NORM == 5), (BLOCK,))
    return _rotate(x, BLOCK, STAGES), ss


@triton.jit
def _act_kernel(x_ptr, out_ptr, s_ptr, static_s_ptr, K, stride_xm, stride_om, qmax,
                BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, STAGES: tl.constexpr, MODE: tl.constexpr,
                PERM: tl.constexpr, ACT: tl.constexpr, nw_ptr, eps, GR, NORM: tl.constexpr):
    """A row per program. ``NORM`` (dynamic scales or the rotation alone, no input activation): an RMSNorm (1: no
    weight, 2: with one) or a column scale (3) folded in as :func:`quantize_rows` folds it into the block kernel.
    The rotation is linear and acts within the row, so ``H(x * w * r) = r * H(x * w)`` for the row's factor ``r``:
    the codes are those of ``H(x * w)`` and the stored scale takes ``r``; the rotation alone (``MODE`` 3) writes
    ``r * H(x * w)``, with ``r`` from a first pass over the row when it is read in chunks. ``NORM`` 4 / 5 (the row in
    one block): a modulated LayerNorm (groups of ``GR`` rows) applied before the rotation, which then rotates the
    normed row (the shift leaves no factor to move past it)."""
    tl.static_assert(NORM < 4 or NUM_CHUNKS == 1, "a modulated norm needs the row in one block")
    RMS: tl.constexpr = NORM == 1 or NORM == 2
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    o_row = out_ptr + row * stride_om
    if MODE == 3:  # rotation only
        r = tl.full((), 1.0, tl.float32)
        if RMS and NUM_CHUNKS > 1:
            ss = tl.zeros((), dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                o = c * BLOCK + offs
                ss += _read_norm(x_row, o, K, BLOCK, 0, ACT, nw_ptr, 1, row, eps, GR)[1]
            r = tl.math.rsqrt(ss / K + eps)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x, ss_c = _read_norm(x_row, o, K, BLOCK, STAGES, ACT, nw_ptr, NORM, row, eps, GR)
            if RMS:
                if NUM_CHUNKS == 1:
                    r = tl.math.rsqrt(ss_c / K + eps)
                x = x * r
            tl.store(o_row + o, x.to(out_ptr.dtype.element_ty), mask=o < K)
    elif MODE == 2:  # fp8 with a static scale
        scale = tl.load(static_s_ptr).to(tl.float32)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read(x_row, o, K, BLOCK, STAGES, ACT)
            tl.store(o_row + o, _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty), mask=o < K)
        tl.store(s_ptr + row, scale)  # per row like the dynamic modes: a GEMM epilogue reads one layout
    elif NUM_CHUNKS == 1:
        x, ss = _read_norm(x_row, offs, K, BLOCK, STAGES, ACT, nw_ptr, NORM, row, eps, GR)
        amax = tl.max(tl.abs(x), axis=0)
        scale = scale_of(amax, qmax)
        tl.store(o_row + _dst(offs, PERM), _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty),
                 mask=offs < K)
        if RMS:
            scale = scale * tl.math.rsqrt(ss / K + eps)
        tl.store(s_ptr + row, scale)
    else:
        amax = tl.zeros((), dtype=tl.float32)
        ss = tl.zeros((), dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x, ss_c = _read_norm(x_row, o, K, BLOCK, STAGES, ACT, nw_ptr, NORM, row, eps, GR)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
            ss += ss_c
        scale = scale_of(amax, qmax)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK + offs
            x = _read_norm(x_row, o, K, BLOCK, STAGES, ACT, nw_ptr, 3 if NORM >= 2 else 0, row, eps, GR)[0]  # no sum
            tl.store(o_row + _dst(o, PERM), _quantize(x, scale, qmax, MODE).to(out_ptr.dtype.element_ty),
                     mask=o < K)
        if RMS:
            scale = scale * tl.math.rsqrt(ss / K + eps)
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
def _rowmax4(y0, y1, y2, y3):
    """Each tile row's absmax over a group's four rotated quarters (:func:`_quarters`): the elementwise maximum of
    the four first, then one reduction (four reductions took four rounds of shuffles and shared memory)."""
    return tl.max(_absmax4(y0, y1, y2, y3), axis=1)


@triton.jit
def _absmax4(y0, y1, y2, y3):
    """The elementwise absmax of four equally shaped tiles."""
    return tl.maximum(tl.maximum(tl.abs(y0), tl.abs(y1)), tl.maximum(tl.abs(y2), tl.abs(y3)))


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
                a = _rowmax4(y0, y1, y2, y3)
            else:
                a = _rowmax(_tile(x_tile + c0, rmask, cmask, h, K, ROT, ACT))
            amax = tl.maximum(amax, a)
    return amax


@triton.jit
def _act_tile_kernel(x_ptr, out_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_om, qmax,
                     C: tl.constexpr, STEP: tl.constexpr, BM: tl.constexpr, ROT: tl.constexpr, MODE: tl.constexpr,
                     PERM: tl.constexpr, ACT: tl.constexpr, UNROLL: tl.constexpr, KC, P, SPLIT: tl.constexpr,
                     BACK: tl.constexpr):
    """``BM`` rows per program, ``STEP`` columns at a time (ROT 0: no rotation, STEP = C; 1: a group of ``C``
    times its Hadamard, STEP = C; 2: a group of ``STEP = 4C`` as :func:`_quarters`), ``UNROLL`` steps per loop
    iteration (their loads in flight together: short programs are latency-bound): per-row int8/fp8 in two
    passes over the rows (absmax, then codes; the second read hits L2 only while the resident programs' rows
    fit it: not at 16 rows x 12,288 columns), or the rotated values (MODE_FLOAT).

    ``SPLIT`` (launched for int8 codes; too few row blocks to fill the GPU): program ``(rows, p)`` takes columns
    ``[p KC, (p + 1) KC)``, in two launches: SPLIT 1 writes its part of the rows' absmax to ``s[M + p M + r]``
    (the scales' buffer holds ``(1 + P) M`` floats), SPLIT 2 takes the maximum of the ``P`` parts, scales and
    quantizes its columns (program 0 stores the scales). The codes do not depend on ``UNROLL`` or the split:
    each step's arithmetic is the same and a maximum is order-free.

    ``BACK``: the codes pass walks its columns from the end (``bench_rotation.py --back``): its first re-reads are
    the lines the absmax pass read last, which may still be in L2 where the resident programs' rows overflow it
    (run 106: 16 x 12,288-column programs, ~100 MB resident against a 50 MB L2). Same codes; run 109 timed the
    rotating pass 1.01-1.03x faster with it (8 of 8 rows), so rotating launches take it by default."""
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
            scale = scale_of(amax, qmax)
            tl.store(s_ptr + rows, scale, mask=rmask & (p == 0))
        if BACK:
            n_it = tl.cdiv(k_end - k_lo, STEP * UNROLL)
            for i in range(n_it):
                _codes_step(x_tile, o_rows, k_lo + (n_it - 1 - i) * (STEP * UNROLL), cols, rmask, h, K, scale, qmax,
                            C, STEP, ROT, MODE, PERM, ACT, UNROLL)
        else:
            for c00 in range(k_lo, k_end, STEP * UNROLL):
                _codes_step(x_tile, o_rows, c00, cols, rmask, h, K, scale, qmax, C, STEP, ROT, MODE, PERM, ACT, UNROLL)


@triton.jit
def _codes_step(x_tile, o_rows, c00, cols, rmask, h, K, scale, qmax, C: tl.constexpr, STEP: tl.constexpr,
                ROT: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr, ACT: tl.constexpr, UNROLL: tl.constexpr):
    """The tile kernel's codes (or rotated values) for ``UNROLL`` steps of ``STEP`` columns from ``c00``."""
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
    """Wait until the ``n`` programs sharing ``flag`` have arrived (:func:`block_wait`, every one arriving)."""
    block_wait(flag, 1, n, n)


@triton.jit
def block_wait(flag, arrival, need, total):
    """Add ``arrival`` (1: this program arrives, 0: it only waits) and wait until ``need`` programs sharing
    ``flag`` have arrived: every thread's stores are made before the arrival is released, the wait acquires. The
    counter counts arrivals, then the ``total`` programs' departures, and the last departure resets it (zero
    before and after a launch); departures start only once every arrival is in, so they never pass for one."""
    tl.debug_barrier()
    tl.atomic_add(flag, arrival, sem="release", scope="gpu")
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    while seen < need:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    if tl.atomic_add(flag, 1, sem="relaxed", scope="gpu") == need + total - 1:
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
    amax = _rowmax4(y0, y1, y2, y3)
    if HELD == 2:
        c1 = c0 + STEP
        cm1 = c1 + cols < K
        z0, z1, z2, z3 = _quarters(x_tile + c1, rmask, cm1, h, K, C, ACT)
        amax = tl.maximum(amax, _rowmax4(z0, z1, z2, z3))
    if PHASE != 2:
        tl.store(s_ptr + M + p * M + rows, amax, mask=rmask)
    if PHASE == 0:
        block_barrier(sync_ptr + 1 + pid_m, P)
    if PHASE != 1:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for j in range(P):  # L2 loads: the other programs wrote them
            amax = tl.maximum(amax, tl.load(s_ptr + M + j * M + rows, mask=rmask, other=0.0, cache_modifier=".cg"))
        scale = scale_of(amax, qmax)
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
def _group_step(x_row, o_row, g0, gi, G, cols, h, K, scale, qmax, C: tl.constexpr, MODE: tl.constexpr,
                PERM: tl.constexpr, ACT: tl.constexpr, STORE: tl.constexpr):
    """Groups ``g0 .. g0 + GB`` of one row rotated (:func:`_quarters`, the groups as the tile's rows): their
    absmax, and with ``STORE`` their codes at ``scale`` (or the rotated values, MODE_FLOAT) stored."""
    gmask = g0 + gi < G
    base = (g0 + gi)[:, None] * (4 * C) + cols[None, :]
    y0, y1, y2, y3 = _quarters(x_row + base, gmask, cols < C, h, K, C, ACT)
    if STORE:
        _gput4(o_row, base, y0, y1, y2, y3, scale, qmax, gmask, C, MODE, PERM)
    return _amax4(y0, y1, y2, y3)


@triton.jit
def scale_of(amax, qmax):
    """The quantization scale of rows whose absmax is ``amax``: ``amax / qmax`` correctly rounded, 1 for an
    all-zero row (its codes are zero whatever the scale); a scalar or a vector of rows."""
    return tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)


@triton.jit
def _amax4(y0, y1, y2, y3):
    """The absmax of a group step's four rotated quarters (one row's: a scalar)."""
    return tl.max(_absmax4(y0, y1, y2, y3))


@triton.jit
def _gput4(o_row, base, y0, y1, y2, y3, scale, qmax, gmask, C: tl.constexpr, MODE: tl.constexpr,
           PERM: tl.constexpr):
    """Store a group step's four ``[groups, C]`` quarters of one row (quarter ``i`` at column offsets ``base + i
    C`` from the row's pointer ``o_row``): codes at the row's scalar ``scale`` (int8 / fp8), or the values
    themselves (MODE_FLOAT)."""
    if MODE == 0 and y0.shape[0] < 64:  # (mma.sync tiles: one layout conversion for the four, not four)
        y = tl.join(tl.join(y0, y1), tl.join(y2, y3))  # [.., C, 2, 2]: quarter 2 * j + i at [.., i, j]
        q = tl.arange(0, 2)
        offs = base[:, :, None, None] + (q[:, None] + 2 * q[None, :])[None, None, :, :] * C
        tl.store(o_row + _dst(offs, PERM), _quantize(y, scale, qmax, MODE), mask=gmask[:, None, None, None])
    else:
        _gput(o_row, base, y0, scale, qmax, gmask, MODE, PERM)
        _gput(o_row, base + C, y1, scale, qmax, gmask, MODE, PERM)
        _gput(o_row, base + 2 * C, y2, scale, qmax, gmask, MODE, PERM)
        _gput(o_row, base + 3 * C, y3, scale, qmax, gmask, MODE, PERM)


@triton.jit
def _gput(o_row, offs, y, scale, qmax, gmask, MODE: tl.constexpr, PERM: tl.constexpr):
    """Store one ``[groups, C]`` quarter of a row at column offsets ``offs`` (see :func:`_gput4`)."""
    if MODE != 3:
        y = _quantize(y, scale, qmax, MODE)
    tl.store(o_row + _dst(offs, PERM), y.to(o_row.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _act_group_rows_kernel(x_ptr, out_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_om, qmax, NPROG,
                           GB: tl.constexpr, ONE: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr,
                           ACT: tl.constexpr):
    """Rotated (group 256) per-row codes (or the rotated values, MODE_FLOAT) a row at a time, the row's groups as
    the rows of the tensor-core tile: ``GB`` groups of 256 at a time, each as four ``[GB, 64]`` quarters
    (:func:`_quarters`). Program ``p`` takes rows ``p, p + NPROG, ...`` (``NPROG`` = M: a row per program; fewer:
    the 64-group's Hadamard loaded once for many rows, and the next row's loads pipelined under this one's
    arithmetic). ``ONE`` (the row is at most ``GB`` groups: every Flux / Wan width up to 16,384 at GB 64): x read
    once, rotated into registers, its absmax taken and its codes stored from them; else two passes over the row
    (absmax, then codes), the second from L2 (a row is 60 KB or less at 15,360 columns, where the tile kernel's
    16-row programs hold 0.5 MB each and re-read from HBM). The codes are the tile kernel's: the same per-group
    arithmetic, and a maximum is order-free."""
    C: tl.constexpr = 64
    cols = tl.arange(0, C)
    gi = tl.arange(0, GB)
    h = tl.load(h_ptr + cols[:, None] * C + cols[None, :])
    G = K // (4 * C)
    for r in range(tl.program_id(0), M, NPROG):
        row = tl.zeros((), tl.int64) + r  # (the interpreter hands the loop a Python int)
        x_row = x_ptr + row * stride_xm
        o_row = out_ptr + row * stride_om
        if ONE:
            gmask = gi < G
            base = gi[:, None] * (4 * C) + cols[None, :]
            y0, y1, y2, y3 = _quarters(x_row + base, gmask, cols < C, h, K, C, ACT)
            scale = tl.full((), 1.0, tl.float32)
            if MODE != 3:
                amax = _amax4(y0, y1, y2, y3)
                scale = scale_of(amax, qmax)
                tl.store(s_ptr + row, scale)
            _gput4(o_row, base, y0, y1, y2, y3, scale, qmax, gmask, C, MODE, PERM)
        else:
            scale = tl.full((), 1.0, tl.float32)
            if MODE != 3:
                amax = tl.zeros((), dtype=tl.float32)
                for g0 in range(0, G, GB):
                    amax = tl.maximum(amax, _group_step(x_row, o_row, g0, gi, G, cols, h, K, scale, qmax, C, MODE,
                                                        PERM, ACT, False))
                scale = scale_of(amax, qmax)
                tl.store(s_ptr + row, scale)
            n_it = tl.cdiv(G, GB)
            for i in range(n_it):  # from the row's end: the lines read last are the likeliest still in L2
                _group_step(x_row, o_row, (n_it - 1 - i) * GB, gi, G, cols, h, K, scale, qmax, C, MODE, PERM, ACT,
                            True)


@triton.jit
def _act_block_kernel(x_ptr, out_ptr, s_ptr, static_s_ptr, M, K, stride_xm, stride_om, qmax,
                      R: tl.constexpr, BK: tl.constexpr, NCH: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr,
                      ACT: tl.constexpr, nw_ptr, eps, GR, NORM: tl.constexpr):
    """Unrotated per-row int8 / fp8 (dynamic or static scale) of ``R`` rows per program: :func:`quantize_rows`."""
    quantize_rows(x_ptr, out_ptr, s_ptr, static_s_ptr, tl.program_id(0) * R + tl.arange(0, R), M, K, stride_xm,
                  stride_om, qmax, BK, NCH, MODE, PERM, ACT, nw_ptr, eps, GR, NORM)


@triton.jit
def layer_mod(x, rows, cols, mask, K, mod_ptr, eps, GR, RMS: tl.constexpr):
    """Rows ``x [R, BK]`` (zero past K) as ``layer_norm(x, eps) * (1 + scale[g]) + shift[g]``, ``g = row // GR``,
    the group's shift and scale the two halves of ``mod_ptr``'s ``[G, 2K]`` row (``acts.ModulatedNorm``): mean,
    then the variance of the centred values (two passes over registers, as torch's layer_norm takes them), zero
    past K. ``RMS``: ``rms_norm(x, eps)`` in place of the LayerNorm (no mean taken out)."""
    if RMS:
        xc = tl.where(mask, x, 0.0)
    else:
        mean = tl.sum(x, axis=1) / K
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / K + eps)
    m_rows = mod_ptr + (rows // GR).to(tl.int64)[:, None] * (2 * K) + cols[None, :]
    shift = tl.load(m_rows, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(m_rows + K, mask=mask, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * (1.0 + scale) + shift


@triton.jit
def rms_weighted(x, nw_ptr, o, K, NORM: tl.constexpr):
    """``x`` times a folded RMSNorm's weight at columns ``o`` (``NORM`` 2), or a column scale's (3), else x."""
    if NORM == 2 or NORM == 3:
        x = x * tl.load(nw_ptr + o, mask=o < K, other=0.0).to(tl.float32)[None, :]
    return x


@triton.jit
def rms_part(x, ss, nw_ptr, o, K, NORM: tl.constexpr):
    """(x times the folded RMSNorm's weight, the rows' sum of squares of x so far plus this chunk's) for
    ``NORM`` 1 (no weight) / 2 (a weight); 3 (a column scale): x times it, ``ss`` as it is; 0: both as they are."""
    if NORM == 1 or NORM == 2:
        ss = ss + tl.sum(x * x, axis=1)
    return rms_weighted(x, nw_ptr, o, K, NORM), ss


@triton.jit
def quantize_rows(x_ptr, out_ptr, s_ptr, static_s_ptr, rows, M, K, stride_xm, stride_om, qmax, BK: tl.constexpr,
                  NCH: tl.constexpr, MODE: tl.constexpr, PERM: tl.constexpr, ACT: tl.constexpr, nw_ptr, eps, GR,
                  NORM: tl.constexpr):
    """Codes and scales of the rows ``rows`` (those < M), ``BK`` columns at a time: one pass with the rows in
    registers when ``NCH == 1``, else two unrolled passes over ``NCH`` chunks (absmax, then codes; the re-read
    hits L2); :func:`_div` instead of a division per element. The block kernel's body, and the one-launch W8A8
    kernel's (``triton_gemm.fused_rows``) share of its row block: the same codes from either.

    ``NORM`` (dynamic scales, no input activation): an RMSNorm ``x * rsqrt(mean(x²) + eps) * w`` folded in. Its
    per-row factor cancels out of per-row codes, so the codes are those of ``x * w`` and the stored scale is
    their absmax / qmax times ``rsqrt(mean(x²) + eps)``, the sum of squares taken in the absmax pass: the GEMM
    epilogue, which multiplies by the row scale anyway, applies the norm. ``NORM`` 3: a column scale alone (a
    SmoothQuant layer's ``x * pre_quant_scale``), codes of ``x * w`` with their own scale. ``NORM`` 4 / 5 (rows in
    registers, ``NCH == 1``): a modulated LayerNorm (:func:`layer_mod`, groups of ``GR`` rows), applied to the
    values before their absmax: codes and scales of the normed rows."""
    tl.static_assert(NORM < 4 or (NCH == 1 and MODE != 2), "a modulated norm needs the rows in registers")
    R: tl.constexpr = rows.shape[0]
    rmask = rows < M
    cols = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
    ss = tl.zeros((R,), dtype=tl.float32)
    if MODE == 2:
        scale = tl.zeros((R,), dtype=tl.float32) + tl.load(static_s_ptr).to(tl.float32)
    elif NCH == 1:
        mask = rmask[:, None] & (cols < K)[None, :]
        if NORM >= 4:
            x = layer_mod(_load_act(x_rows + cols[None, :], mask, K, ACT), rows, cols, mask, K, nw_ptr, eps, GR,
                          NORM == 5)
        else:
            x, ss = rms_part(_load_act(x_rows + cols[None, :], mask, K, ACT), ss, nw_ptr, cols, K, NORM)
        amax = tl.max(tl.abs(x), axis=1)
        scale = scale_of(amax, qmax)
    else:
        amax = tl.zeros((R,), dtype=tl.float32)
        for c in tl.static_range(NCH):
            o = c * BK + cols
            x, ss = rms_part(_load_act(x_rows + o[None, :], rmask[:, None] & (o < K)[None, :], K, ACT), ss, nw_ptr,
                            o, K, NORM)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = scale_of(amax, qmax)
    inv = tl.math.div_rn(tl.full((R,), 1.0, tl.float32), scale)
    if NCH == 1 and MODE != 2:
        y = quant_codes(x, scale[:, None], inv[:, None], qmax, MODE)
        tl.store(o_rows + _dst(cols, PERM)[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for c in tl.static_range(NCH):
            o = c * BK + cols
            mask = rmask[:, None] & (o < K)[None, :]
            x = rms_weighted(_load_act(x_rows + o[None, :], mask, K, ACT), nw_ptr, o, K, NORM)
            y = quant_codes(x, scale[:, None], inv[:, None], qmax, MODE)
            tl.store(o_rows + _dst(o, PERM)[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if NORM == 1 or NORM == 2:
        scale = scale * tl.math.rsqrt(ss / K + eps)
    tl.store(s_ptr + rows, scale, mask=rmask)
