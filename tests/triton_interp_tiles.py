"""Interpreter checks of the tile activation kernel (``triton_quant`` kernel="tiles"): row tiles in two passes,
the rotation a product with the dense group Hadamard instead of the in-register butterfly of kernel="rows".

Unrotated: int8 and fp8 codes and scales bit-equal to the row kernel's (the same fp32 math), ragged K and M.
Rotated oracles: int8 codes and row scales against ``reference.quantize_rows_int8`` of the float64 rotation of x (as x's
dtype holds it; with an input activation, of ``act(x)`` rounded to x's dtype, what the model's own module
returns): a code may move by 1 at a .5 tie, on <= 0.1% of codes (+1), scales to 1e-6; rotation only (MODE_FLOAT)
to x's dtype's rounding (fp16 2^-9). fp16 only here: bf16 ``tl.dot`` is wrong in Triton 3.6's interpreter
(``check_interpreter_limitations``); ``benchmarks/check_acts_gpu.py`` (``act_quant_int8_tiles``) runs bf16.
Each case also shows the butterfly kernel gives the same codes within that bound, and that an unrotated
quantization would not pass (the check can fail).
"""

from __future__ import annotations

import torch
from triton_interp import code_diff, record, record_refused, rel

F16, F32 = torch.float16, torch.float32


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 4 + 0.25)
    x[0, 3] = 30.0
    x[-1, -1] = -40.0
    return x.to(F16)


def check_plain_tiles() -> None:
    from comfyquant.runtime.kernels import triton_quant

    for i, (m, k) in enumerate([(1, 16), (5, 100), (70, 256), (3, 3072), (9, 1280), (2, 9000), (130, 64)]):
        for dt in (F32, F16):
            x = _x(m, k, seed=60 + i).to(dt)
            if m > 2:
                x[1] = 0
            for act in (0, 3):
                a = triton_quant.quantize_rows_int8(x, act=act, kernel="tiles")
                b = triton_quant.quantize_rows_int8(x, act=act, kernel="rows")
                record("tiles_int8_equals_rows", torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), m=m, k=k,
                       dtype=str(dt), act=act, tile=triton_quant._tile_width(k))
            a = triton_quant.quantize_rows_fp8(x, kernel="tiles")
            b = triton_quant.quantize_rows_fp8(x, kernel="rows")
            record("tiles_fp8_equals_rows", torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1]),
                   m=m, k=k, dtype=str(dt))
    wide = _x(5, 300, seed=70)[:, 17:273]  # rows further apart than K
    a = triton_quant.quantize_rows_int8(wide, kernel="tiles")
    b = triton_quant.quantize_rows_int8(wide.contiguous(), kernel="rows")
    record("tiles_strided_rows", torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))


def check_dot_rotation() -> None:
    from comfyquant.quant.hadamard import fast_hadamard
    from comfyquant.runtime.kernels import reference, triton_quant
    from comfyquant.runtime.kernels.acts import apply_input_act

    # M: one row, a ragged tile (70 = 64 + 6), several tiles; K: one group and several; every dot group size
    for i, (m, k, g) in enumerate([(1, 16, 16), (5, 64, 64), (70, 256, 256), (3, 768, 256), (130, 192, 64),
                                   (2, 512, 16)]):
        x = _x(m, k, seed=i)
        if m > 2:
            x[1] = 0  # an all-zero row: scale 1, codes 0
        for act in (0, 1):
            xa = apply_input_act(x, "gelu_tanh") if act else x
            qr, sr = reference.quantize_rows_int8(fast_hadamard(xa.double(), g).float())
            q, s = triton_quant.quantize_rows_int8(x, g, act=act, kernel="tiles")
            mx, n, ok = code_diff(q, qr)
            qb, _ = triton_quant.quantize_rows_int8(xa, g, kernel="rows")
            qn, _ = reference.quantize_rows_int8(xa.float())  # not rotated: must fail the bound
            record("dot_rotation_int8", ok and rel(s, sr) < 1e-6 and code_diff(qb, qr)[2]
                   and not code_diff(qn, qr)[2], m=m, k=k, convrot=g, act=act, max_code_diff=mx, codes_diff=n)
        r = triton_quant.rotate_rows(x, g, kernel="tiles")
        e = rel(r, fast_hadamard(x.double(), g))
        record("dot_rotation_float", r.dtype == F16 and e <= 2 ** -9, m=m, k=k, convrot=g, rel=e)
    # 16-row programs (dot_rows: where 64-row ones would leave SMs idle, 4x the programs) give the 64-row
    # programs' codes: rows are independent
    for g in (16, 64, 256):
        x = _x(70, 512, seed=50 + g)
        got = {}
        for rows in (16, 64):
            q, s = torch.empty((70, 512), dtype=torch.int8), torch.empty((70, 1))
            grid, args, key, warps = triton_quant.tile_launch(x, q, s, g, triton_quant.MODE_INT8, 127.0, 0, 0,
                                                              rows=rows)
            triton_quant._ACT_TILES(grid, args, x.device, num_warps=warps, num_stages=2, key=key)
            got[rows] = grid, q, s
        (g16, q16, s16), (g64, q64, s64) = got[16], got[64]
        record("dot_rotation_16_row_programs", g16 == (5,) and g64 == (2,) and torch.equal(q16, q64)
               and torch.equal(s16, s64) and triton_quant.dot_rows(70, 132) == 16
               and triton_quant.dot_rows(64 * 132, 132) == 64, convrot=g)
    # steps unrolled per loop iteration (their loads in flight together) and other warp counts: the same codes,
    # also where the unrolled steps overrun K (5 groups of 256 in steps of 2 and 4) and on an unrotated tile
    for g, k in ((256, 1280), (64, 448), (None, 1000)):
        x = _x(37, k, seed=80 + k)
        got = []
        for rows, warps, unroll in ((16, 4, 1), (16, 8, 2), (32, 4, 4)):
            q, s = torch.empty((37, k), dtype=torch.int8), torch.empty((37, 1))
            grid, args, key, w = triton_quant.tile_launch(x, q, s, g, triton_quant.MODE_INT8, 127.0, 0, 0,
                                                          rows=rows if g else None, warps=warps, unroll=unroll)
            triton_quant._ACT_TILES(grid, args, x.device, num_warps=w, num_stages=2, key=key)
            got.append((q, s))
        want_q, want_s = triton_quant.quantize_rows_int8(x, g, kernel="tiles")
        record("dot_rotation_unrolled", all(torch.equal(q, want_q) and torch.equal(s, want_s) for q, s in got)
               and bool((want_q != 0).any()), convrot=g, k=k)
    # the split form (rows too few to fill the GPU: two launches over column chunks, absmax parts then codes):
    # the tile kernel's codes and scales, with an activation and in the W4A8 order too, and picked by "auto"
    for m, k, g, act, perm in ((70, 1280, 256, 0, 0), (100, 448, 64, 1, 0), (65, 512, 16, 0, 0),
                               (64, 1024, 256, 0, 128)):
        x = _x(m, k, seed=90 + g)
        chunks = triton_quant.split_chunks(m, k, g, 132)
        a = triton_quant.quantize_rows_int8(x, g, perm=perm, act=act, kernel="split")
        b = triton_quant.quantize_rows_int8(x, g, perm=perm, act=act, kernel="tiles")
        record("dot_rotation_split", chunks > 1 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               and triton_quant.scale_floats(x, g, triton_quant.MODE_INT8, act, "split") == m * (1 + chunks),
               m=m, k=k, convrot=g, act=act, perm=perm, chunks=chunks)
    # the codes pass walked from the row's end (BACK, the rotating launches' default since run 109) against the
    # forward walk: the same codes and scales, whole and in the split form, unrolled with a ragged last step
    # (768 = 2 x 256 + 256) and with an activation
    for m, k, g, act, unroll, chunks in ((70, 768, 256, 0, 2, 1), (33, 1280, 256, 1, 1, 1), (20, 320, 64, 0, 2, 1),
                                         (70, 1280, 256, 0, 2, 2)):
        x = _x(m, k, seed=110 + k)
        want_q, want_s = triton_quant.quantize_rows_int8(x, g, act=act, kernel="tiles")  # BACK: the default
        q = torch.empty_like(want_q)
        s = torch.empty(m * (1 + chunks) if chunks > 1 else m, dtype=F32)
        for phase in ((1, 2) if chunks > 1 else (0,)):
            grid, args, key, w = triton_quant.tile_launch(x, q, s, g, triton_quant.MODE_INT8, 127.0, 0, act, 16, 4,
                                                          unroll, chunks, phase, back=False)
            triton_quant._ACT_TILES(grid, args, x.device, num_warps=w, num_stages=2, key=key)
        record("dot_rotation_back_equals_forward", torch.equal(q, want_q) and torch.equal(s[:m], want_s.reshape(-1))
               and bool((want_q != 0).any()), m=m, k=k, convrot=g, act=act, unroll=unroll, chunks=chunks)
    # "auto" takes it for long rows only (the row kernel is faster on short ones: run 42)
    picks = {(m, k): triton_quant.pick_kernel(torch.empty((m, k), dtype=F16), 256, triton_quant.MODE_INT8,
                                              grows=False)
             for m, k in ((64, 12288), (1024, 5120), (256, 5120), (63, 12288), (2112, 3072), (1024, 1280),
                          (4096, 5120), (1024, 15360))}
    record("dot_rotation_split_picked", picks == {(64, 12288): "split", (1024, 5120): "held", (256, 5120): "rows",
                                                  (63, 12288): "rows", (2112, 3072): "held", (1024, 1280): "rows",
                                                  (4096, 5120): "tiles", (1024, 15360): "split"}, picks=str(picks))
    # the W4A8 order (evens then odds per 128 columns) from the same kernel
    x = _x(5, 512, seed=40)
    q, s = triton_quant.quantize_rows_int8(x, 256, kernel="tiles")
    qp, sp = triton_quant.quantize_rows_int8(x, 256, perm=128, kernel="tiles")
    blocks = q.reshape(5, 4, 128)
    want = torch.cat((blocks[..., 0::2], blocks[..., 1::2]), dim=-1).reshape(5, 512)
    record("dot_rotation_perm128_order", torch.equal(qp, want) and torch.equal(sp, s))
    # where the dot kernel does not apply it is the butterfly's result exactly (fp32 rows, a 1024 group)
    for x2, g in ((_x(3, 256, 41).float(), 64), (_x(2, 2048, 42), 1024)):
        a = triton_quant.quantize_rows_int8(x2, g, kernel="tiles")
        b = triton_quant.quantize_rows_int8(x2, g, kernel="rows")
        record("dot_rotation_falls_back", not triton_quant.tiles_apply(x2, g, triton_quant.MODE_INT8)
               and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), dtype=str(x2.dtype), convrot=g)
    record_refused("unknown_rotation_refused", lambda: triton_quant.quantize_rows_int8(_x(1, 64, 43), 16, kernel="fast"))


def check_held_rotation() -> None:
    """The one-read rotating kernel (kernel="held": programs hold their chunk of 256-column groups rotated in
    registers and share their rows' absmax parts; on the CPU its parts and codes launch apart): the tile
    kernel's codes and scales bit for bit, with ragged M, a K that leaves the last chunk half empty, a zero row,
    an input activation, the W4A8 column order, one and two groups held and 64-row programs; the scales'
    buffer sized for its parts; its launch leaves the shared counters zeroed; the calls it does not take."""
    from comfyquant.runtime.kernels import scratch, triton_quant
    from comfyquant.runtime.kernels.launch import stream_id

    tq = triton_quant
    for m, k, act, perm in ((37, 1280, 0, 0), (16, 512, 0, 0), (70, 768, 1, 0), (5, 1024, 0, 128), (1, 256, 0, 0)):
        x = _x(m, k, seed=300 + m)
        if m > 2:
            x[1] = 0
        # the tile kernel's programs of as many rows (the interpreter's fp16 products of 64-row tiles may round an
        # activated row's absmax 1 ulp apart from 16-row ones; the GPU's do not: check_held_rotation)
        want_q, want_s = torch.empty((m, k), dtype=torch.int8), torch.empty((m, 1))
        grid, args, key, warps = tq.tile_launch(x, want_q, want_s, 256, tq.MODE_INT8, 127.0, perm, act,
                                                rows=tq.HELD_ROWS)
        tq._ACT_TILES(grid, args, x.device, num_warps=warps, num_stages=2, key=key)
        q, s = tq.quantize_rows_int8(x, 256, perm=perm, act=act, kernel="held")
        record("held_rotation", tq.held_apply(x, 256, tq.MODE_INT8, act) and torch.equal(q, want_q)
               and torch.equal(s, want_s) and bool((q != 0).any())
               and tq.scale_floats(x, 256, tq.MODE_INT8, act, "held") == m * (1 + tq.held_parts(k)),
               m=m, k=k, act=act, perm=perm, parts=tq.held_parts(k))
        for rows, held in ((16, 1), (64, 1), (64, 2)):
            # against the tile kernel's programs of as many rows (the interpreter's fp16 products of 64-row tiles
            # may round an activated row's absmax 1 ulp apart from 16-row ones; the GPU's do not)
            tq_, ts_ = torch.empty_like(q), torch.empty((m, 1))
            grid, args, key, warps = tq.tile_launch(x, tq_, ts_, 256, tq.MODE_INT8, 127.0, perm, act, rows=rows)
            tq._ACT_TILES(grid, args, x.device, num_warps=warps, num_stages=2, key=key)
            parts = tq.held_parts(k, held)
            q2, s2 = torch.empty_like(q), torch.empty(m * (1 + parts))[:m].view(m, 1)
            sync = scratch.split_workspace(x.device).counters(stream_id(x.device))
            for phase in (1, 2):
                grid, args, key, warps = tq.held_launch(x, q2, s2, sync, 127.0, perm, act, rows, held, phase=phase)
                tq._ACT_HELD(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
            record("held_rotation_config", torch.equal(q2, tq_) and torch.equal(s2, ts_)
                   and int(sync.abs().sum()) == 0, m=m, k=k, rows=rows, held=held)
    # calls it does not take: other groups, fp32 rows, fp8 / rotation-only modes; they fall back to the tile
    # kernel's result (or the row kernel's) unchanged
    x = _x(20, 512, seed=320)
    refused = {"group64": tq.held_apply(x, 64, tq.MODE_INT8), "fp32": tq.held_apply(x.float(), 256, tq.MODE_INT8),
               "float": tq.held_apply(x, 256, tq.MODE_FLOAT), "fp8": tq.held_apply(x, 256, tq.MODE_FP8),
               "none": tq.held_apply(x, None, tq.MODE_INT8)}
    a = tq.quantize_rows_int8(x, 64, kernel="held")
    b = tq.quantize_rows_int8(x, 64, kernel="tiles")
    record("held_rotation_refusals", not any(refused.values()) and torch.equal(a[0], b[0])
           and torch.equal(a[1], b[1]), refused=str(refused))


def check_group_rows() -> None:
    """The group-rows rotating kernel (kernel="grows": a row per program, its groups of 256 the tile's rows): the
    tile kernel's codes and scales bit for bit (16-row programs), in one pass (the row's groups rounded up to a
    power of two, a masked tail: 5 of 8) and in steps over longer rows (two-pass, a step half empty), with ragged
    M, a zero row, an input activation (gated too), the W4A8 column order and the rotation alone (MODE_FLOAT);
    with a row per program and with two programs striding over the rows; where "auto" takes it; the calls it does
    not take fall back unchanged."""
    tq = triton_quant_module()
    for m, k, act, perm, cfg in ((7, 1280, 0, 0, None), (3, 4096, 0, 0, (4, False, 4)), (5, 2304, 1, 0, (16, True, 4)),
                                 (4, 1280, 4, 0, (2, False, 4)), (6, 1024, 0, 128, None), (1, 256, 0, 0, (16, False, 4))):
        x = _x(m, 2 * k if act == 4 else k, seed=400 + m)
        if m > 2:
            x[1] = 0
        want_q, want_s = torch.empty((m, k), dtype=torch.int8), torch.empty((m, 1))
        grid, args, key, warps = tq.tile_launch(x, want_q, want_s, 256, tq.MODE_INT8, 127.0, perm, act, rows=16)
        tq._ACT_TILES(grid, args, x.device, num_warps=warps, num_stages=2, key=key)
        for programs in (None, 2):  # a row per program; two programs striding over the rows
            q, s = torch.empty_like(want_q), torch.empty((m, 1))
            grid, args, key, warps = tq.group_rows_launch(x, q, s, tq.MODE_INT8, 127.0, perm, act, cfg, programs)
            tq._ACT_GROWS(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
            record("group_rows_rotation", tq.group_rows_apply(x, 256, tq.MODE_INT8, act) and torch.equal(q, want_q)
                   and torch.equal(s, want_s) and bool((q != 0).any()) and grid == (min(m, programs or m),),
                   m=m, k=k, act=act, perm=perm, cfg=str(cfg), programs=programs)
        if perm == 0:
            want_r = tq.rotate_rows(x, 256, act=act, kernel="tiles")
            got_r = tq.rotate_rows(x, 256, act=act, kernel="grows")
            record("group_rows_rotate_only", torch.equal(got_r, want_r) and got_r.dtype == x.dtype, m=m, k=k, act=act)
    # "auto" (H200 run 126, H100 runs 127 / 141, H200 runs 147-148): rows of more than 32 groups from 256 rows
    # (strided from 1,024, to 16,384 x 15,360), rows of 12-32 groups (3,072-8,192 columns) from 256 rows; not
    # 32,760 x 13,824
    picks = {(m, k): tq.pick_kernel(torch.empty((m, k), dtype=F16, device="meta"), 256, tq.MODE_INT8)
             for m, k in ((1024, 15360), (256, 12288), (4096, 13824), (255, 15360), (16384, 12288), (4096, 3072),
                          (4096, 8192), (4096, 5120), (1024, 5120), (32760, 13824))}
    record("group_rows_picked", picks == {(1024, 15360): "grows", (256, 12288): "grows", (4096, 13824): "grows",
                                          (255, 15360): "split", (16384, 12288): "grows", (4096, 3072): "grows",
                                          (4096, 8192): "grows", (4096, 5120): "grows", (1024, 5120): "grows",
                                          (32760, 13824): "tiles"}, picks=str(picks))
    # ... launched as the schedule says: a row a program at 256 rows; two programs an SM, 3 stages, from 1,024;
    # rows of two passes (80 groups) a row a program; rows of 12-32 groups two warps, eight programs an SM (no more
    # than the rows), 3 stages, a row a tile
    launches = {}
    for m, k in ((256, 12288), (1024, 15360), (4096, 5120), (1024, 20480), (1024, 3072), (16384, 3072),
                 (256, 3072)):
        x = torch.zeros(m, k, dtype=F16)
        q, s = torch.empty(m, k, dtype=torch.int8), torch.empty(m, 1)
        (fk, grid, args, _key, warps, stages), = tq.launch_for(x, q, s, None, 256, tq.MODE_INT8, 127.0, 0, 0,
                                                               "auto", None)
        launches[(m, k)] = (fk is tq._ACT_GROWS, grid[0], stages, args[10], warps)
    record("group_rows_schedule_launched", launches == {(256, 12288): (True, 256, 1, 64, 4),
                                                        (1024, 15360): (True, 264, 3, 64, 4),
                                                        (4096, 5120): (True, 1056, 3, 32, 2),
                                                        (1024, 20480): (True, 1024, 1, 64, 4),
                                                        (1024, 3072): (True, 1024, 3, 16, 2),
                                                        (16384, 3072): (True, 1056, 3, 16, 2),
                                                        (256, 3072): (True, 256, 3, 16, 2)}, got=str(launches))
    record("group_rows_not_picked_for_rotation_alone",
           tq.pick_kernel(torch.empty((1024, 15360), dtype=F16), 256, tq.MODE_FLOAT) != "grows")
    record("group_rows_config", tq.group_rows_config(3072) == (16, True, 4) and tq.group_rows_config(15360) ==
           (64, True, 4) and tq.group_rows_config(20480) == (64, False, 4))
    x = _x(20, 512, seed=420)
    refused = {"group64": tq.group_rows_apply(x, 64, tq.MODE_INT8), "fp32": tq.group_rows_apply(x.float(), 256,
               tq.MODE_INT8), "fp8": tq.group_rows_apply(x, 256, tq.MODE_FP8), "none": tq.group_rows_apply(x, None,
               tq.MODE_INT8)}
    a = tq.quantize_rows_int8(x, 64, kernel="grows")
    b = tq.quantize_rows_int8(x, 64, kernel="tiles")
    record("group_rows_refusals", not any(refused.values()) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]),
           refused=str(refused))
    record_refused("group_rows_short_pass_refused", lambda: tq.group_rows_launch(
        _x(2, 1280, 421), torch.empty((2, 1280), dtype=torch.int8), torch.empty((2, 1)), tq.MODE_INT8, 127.0, 0, 0,
        (4, True, 4)))


def triton_quant_module():
    from comfyquant.runtime.kernels import triton_quant

    return triton_quant


GROUPS = {"act_tiles": check_plain_tiles, "dot_rotation": check_dot_rotation, "held_rotation": check_held_rotation,
          "group_rows": check_group_rows}
