"""GPU checks of the activation quantizers and the paths built on them (``check_kernels_gpu --only`` runs
them): the row, tile, block and one-read rotating (``held``) quantization kernels' int8 / fp8 codes against
the torch reference and each other, the one-launch fused W8A8 path from 64 rows against the two-launch path,
the int8 block-scaled linear, and the W4A8 / int4-unpacked / W4A16 linears against the torch path and
comfy-kitchen."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gpu_check_record import record, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.quant.int8 import dequantize_blockwise, quantize_blockwise, quantize_rowwise
from comfyquant.runtime.kernels import reference, triton_int8, triton_quant
from comfyquant.runtime.kernels.dispatch import choose_backend, int4_rot_linear, int8_block_linear
from comfyquant.runtime.kernels.int4 import pack_int4


def codes_within(q: torch.Tensor, qr: torch.Tensor, max_diff: int) -> tuple[bool, int, float]:
    """(ok, largest |code difference|, fraction of codes that differ): ok when no code moved by more than
    ``max_diff`` and at most 0.1% moved."""
    diff = (q.int() - qr.int()).abs()
    frac = (diff > 0).float().mean().item()
    return diff.max().item() <= max_diff and frac <= 1e-3, int(diff.max().item()), frac


def check_act_quant() -> None:
    for m, k, g in [(1, 3072, None), (37, 3072, 256), (64, 15360, 256), (5, 15360, 1024), (9, 640, 16),
                    (3, 100, None), (17, 12288, None), (4, 5120, 64), (2, 16384, 16384)]:
        x = torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10
        x[0, min(7, k - 1)] = 60.0  # an outlier
        q, s = triton_quant.quantize_rows_int8(x, g)
        xr = x if g is None else fast_hadamard(x.double(), g).float()
        qr, sr = reference.quantize_rows_int8(xr)
        ok, mx, frac = codes_within(q, qr, 0 if g is None else 1)
        record("act_quant_int8", ok and rel(s, sr) < 1e-6, m=m, k=k, group=g, max_code_diff=mx, frac_diff=frac)
        if g is not None:
            xb = x.bfloat16()
            r = triton_quant.rotate_rows(xb, g)
            e = rel(r, fast_hadamard(xb.double(), g))
            record("rotate_rows_bf16", e <= 2**-8, m=m, k=k, group=g, rel=e)
    # the tile kernel (kernel="tiles"): unrotated codes bit-equal to the row kernel's (int8, fp8); the
    # tensor-core rotation: bf16/fp16 rows, groups 16/64/256, ragged row tiles, a folded GELU
    for m, k in [(1, 3072), (37, 3072), (4096, 3072), (300, 1280), (9, 15360), (5, 100), (2, 12288)]:
        x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).bfloat16()
        a, b = triton_quant.quantize_rows_int8(x, kernel="tiles"), triton_quant.quantize_rows_int8(x, kernel="rows")
        record("act_quant_int8_tiles_plain", torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), m=m, k=k)
        a, b = triton_quant.quantize_rows_fp8(x, kernel="tiles"), triton_quant.quantize_rows_fp8(x, kernel="rows")
        record("act_quant_fp8_tiles_plain", torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1]),
               m=m, k=k)
    # the block kernel ("auto" without a rotation) in every configuration block_config picks, against the row
    # kernel's div_rn per element: int8, fp8 and static fp8 codes, bf16 and fp32 rows, bit for bit
    st = torch.tensor([0.02], device="cuda")
    for m, k in [(4096, 1280), (1024, 768), (256, 5120), (4096, 3072), (16384, 5120), (2048, 12288),
                 (300, 15360), (256, 10240), (1500, 10240), (2048, 13824), (1, 4096)]:
        for dt in (torch.bfloat16, torch.float32):
            x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(dt)
            x[0, 7], x[-1, :16] = 60.0, -0.0
            pairs = ((triton_quant.quantize_rows_int8(x, kernel="blocks"), triton_quant.quantize_rows_int8(x, kernel="rows")),
                     (triton_quant.quantize_rows_fp8(x, kernel="blocks"), triton_quant.quantize_rows_fp8(x, kernel="rows")),
                     (triton_quant.quantize_rows_fp8(x, static_scale=st, kernel="blocks"),
                      triton_quant.quantize_rows_fp8(x, static_scale=st, kernel="rows")))
            ok = all(torch.equal(a[0].view(torch.int8), b[0].view(torch.int8)) and torch.equal(a[1], b[1])
                     for a, b in pairs)
            record("act_quant_blocks_vs_rows", ok, m=m, k=k, dtype=str(dt),
                   config=str(triton_quant.block_config(m, k)))
    for m, k, g, act in [(1, 3072, 256, 0), (37, 3072, 256, 0), (300, 15360, 256, 0), (9, 640, 16, 0),
                         (70, 5120, 64, 1), (4096, 3072, 256, 0)]:
        for dt in (torch.bfloat16, torch.float16):
            x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(dt)
            x[0, 7] = 60.0
            xa = torch.nn.functional.gelu(x, approximate="tanh") if act else x
            q, s = triton_quant.quantize_rows_int8(x, g, act=act, kernel="tiles")
            qr, sr = reference.quantize_rows_int8(fast_hadamard(xa.double(), g).float())
            ok, mx, frac = codes_within(q, qr, 1)
            record("act_quant_int8_tiles", ok and rel(s, sr) < 1e-6, m=m, k=k, group=g, act=act, dtype=str(dt),
                   max_code_diff=mx, frac_diff=frac)
            r = triton_quant.rotate_rows(x, g, kernel="tiles")
            e = rel(r, fast_hadamard(x.double(), g))
            record("rotate_rows_tiles", e <= (2**-8 if dt == torch.bfloat16 else 2**-10), m=m, k=k, group=g,
                   dtype=str(dt), rel=e)
    for m, k in [(1, 3072), (33, 5120), (8, 15360)]:
        x = torch.randn(m, k, device="cuda") * 3
        q, s = triton_quant.quantize_rows_fp8(x)
        qr, sr = reference.quantize_rows_fp8(x)
        # codes may differ from torch's software cast by one fp8 step at exact ties (hardware cvt.rn.satfinite)
        diff = (q.float() - qr.float()).abs()
        step = torch.maximum(qr.float().abs(), q.float().abs()) * 2**-3 + 2**-9
        mism = int((diff > 0).sum())
        ok = bool((diff <= step).all()) and mism <= max(1, q.numel() // 10000) and rel(s, sr) < 1e-6
        record("act_quant_fp8_rowwise", ok, m=m, k=k, mismatches=mism)
        st = torch.tensor(0.02, device="cuda")
        q, _ = triton_quant.quantize_rows_fp8(x, static_scale=st)
        qr = reference.quantize_static_fp8(x, st, torch.float8_e4m3fn)
        record("act_quant_fp8_static", torch.equal(q.float(), qr.float()), m=m, k=k)


def check_held_rotation() -> None:
    """The one-read rotating kernel (kernel="held", convrot 256, int8): the tile kernel's codes and scales bit for
    bit on bf16 / fp16 rows, from one row to 16,391 (30,000+ programs waiting on their row blocks), K 1,280-15,360
    (a half-empty last chunk at 1,280), in each launch configuration, with a folded GELU and the W4A8 column
    order; the shared counters zeroed after every launch; twice in a row the same; near the float64 rotation."""
    from comfyquant.runtime.kernels import scratch
    from comfyquant.runtime.kernels.launch import stream_id

    tq = triton_quant
    sync = scratch.split_workspace(torch.device("cuda")).counters(stream_id(torch.device("cuda")))
    for m, k, act, perm in [(1, 3072, 0, 0), (16, 1280, 0, 0), (300, 15360, 0, 0), (2048, 12288, 0, 0),
                            (4096, 3072, 0, 0), (4096, 12288, 1, 0), (16391, 15360, 0, 0), (1000, 5120, 0, 128)]:
        for dt in (torch.bfloat16, torch.float16):
            x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(dt)
            x[0, 7] = 60.0
            if m > 2:
                x[1] = 0
            want = tq.quantize_rows_int8(x, 256, perm=perm, act=act, kernel="tiles")
            got = [tq.quantize_rows_int8(x, 256, perm=perm, act=act, kernel="held") for _ in range(2)]
            for rows, held, warps in ((16, 1, 4), (64, 2, 8), (16, 2, 8)):
                q = torch.empty_like(want[0])
                s = scratch.row_scales(m, m * tq.held_parts(k, held), "cuda")
                grid, args, key, w = tq.held_launch(x, q, s, sync, 127.0, perm, act, rows, held, warps)
                tq._ACT_HELD(grid, args, x.device, num_warps=w, num_stages=1, key=key)
                got.append((q, s))
            torch.cuda.synchronize()
            same = all(torch.equal(q, want[0]) and torch.equal(s, want[1]) for q, s in got)
            record("held_rotation_vs_tiles", same and int(sync.abs().sum()) == 0
                   and tq.held_apply(x, 256, tq.MODE_INT8, act), m=m, k=k, act=act, perm=perm, dtype=str(dt))
            if perm == 0 and m <= 4096:
                xa = torch.nn.functional.gelu(x, approximate="tanh") if act else x
                qr, sr = reference.quantize_rows_int8(fast_hadamard(xa.double(), 256).float())
                ok, mx, frac = codes_within(got[0][0], qr, 1)
                record("held_rotation_f64", ok and rel(got[0][1], sr) < 1e-6, m=m, k=k, act=act, dtype=str(dt),
                       max_code_diff=mx, frac_diff=frac)


def check_group_rows() -> None:
    """The group-rows rotating kernel (kernel="grows", convrot 256): the tile kernel's int8 codes and scales bit for
    bit on bf16 / fp16 rows (one pass on rows up to 16,384 wide, steps of 64 groups beyond, and each timed
    configuration: a row per program, programs striding over the rows with their loads pipelined or not), with a
    folded GELU, a gated SwiGLU and the W4A8 column order; the rotation alone (MODE_FLOAT) equal to the tile
    kernel's; near the float64 rotation."""
    tq = triton_quant
    for m, k, act, perm in [(1, 3072, 0, 0), (1024, 15360, 0, 0), (4096, 3072, 0, 0), (4096, 12288, 1, 0),
                            (4099, 13824, 0, 0), (2048, 20480, 0, 0), (1000, 5120, 0, 128), (300, 1280, 4, 0)]:
        for dt in (torch.bfloat16, torch.float16):
            x = (torch.randn(m, 2 * k if act == 4 else k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(dt)
            x[0, 7] = 60.0
            if m > 2:
                x[1] = 0
            want = tq.quantize_rows_int8(x, 256, perm=perm, act=act, kernel="tiles")
            got = [tq.quantize_rows_int8(x, 256, perm=perm, act=act, kernel="grows")]
            gb, one, warps = tq.group_rows_config(k)
            for cfg, programs, stages in (((gb, one, 12 - warps), None, 1), ((16, k <= 4096, 4), None, 1),
                                          ((64, k <= 16384, 8), None, 1), ((gb, one, warps), 264, 2),
                                          ((gb, one, warps), 396, 1), ((gb, one, warps), 264, 3)):
                q, s = torch.empty_like(want[0]), torch.empty_like(want[1])
                grid, args, key, w = tq.group_rows_launch(x, q, s, tq.MODE_INT8, 127.0, perm, act, cfg, programs)
                tq._ACT_GROWS(grid, args, x.device, num_warps=w, num_stages=stages, key=key)
                got.append((q, s))
            torch.cuda.synchronize()
            same = all(torch.equal(q, want[0]) and torch.equal(s, want[1]) for q, s in got)
            record("group_rows_vs_tiles", same and tq.group_rows_apply(x, 256, tq.MODE_INT8, act), m=m, k=k, act=act,
                   perm=perm, dtype=str(dt))
            if perm == 0:
                rot = tq.rotate_rows(x, 256, act=act, kernel="grows")
                record("group_rows_rotate_only", torch.equal(rot, tq.rotate_rows(x, 256, act=act, kernel="tiles")),
                       m=m, k=k, act=act, dtype=str(dt))
            if perm == 0 and act in (0, 1) and m <= 4096:
                xa = torch.nn.functional.gelu(x, approximate="tanh") if act else x
                qr, sr = reference.quantize_rows_int8(fast_hadamard(xa.double(), 256).float())
                ok, mx, frac = codes_within(got[0][0], qr, 1)
                record("group_rows_f64", ok and rel(got[0][1], sr) < 1e-6, m=m, k=k, act=act, dtype=str(dt),
                       max_code_diff=mx, frac_diff=frac)


def check_fused_rows() -> None:
    """The one-launch path from 64 rows (the row-block kernel, ``triton_gemm.fused_rows``) on fp32 and fp16
    activations too (ComfyUI runs T5 in fp32), with and without an input activation: the two-launch path's output
    bit for bit on the first launch, a second launch (on the counters the first left), its plan and a CUDA-graph
    replay of the plan; the error against float64 (activated x times the dequantized weight) is recorded."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels import triton_plans

    acts = {0: lambda x: x, 1: lambda x: F.gelu(x, approximate="tanh"), 3: F.silu}
    bf = torch.bfloat16
    for m, k, n, dt, act, wide in [(256, 4096, 4096, torch.float32, 0, False), (77, 4096, 4096, torch.float32, 0, False),
                                   (256, 4096, 4096, torch.float32, 1, False), (1000, 768, 3072, torch.float32, 0, False),
                                   (300, 15360, 3072, torch.float32, 0, False), (256, 1280, 1280, torch.float16, 3, False),
                                   (64, 640, 640, torch.float32, 0, False),
                                   # wide layers (more column tiles than quantizing programs, ``rows_shape``'s wide)
                                   (256, 1280, 10240, bf, 0, True), (1024, 3072, 9216, bf, 1, True),
                                   (300, 4096, 10240, torch.float32, 0, True)]:
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = quantize_rowwise(w)
        bias = torch.randn(n, device="cuda").bfloat16()
        x = (torch.randn(m, k, device="cuda") * 3).to(dt)
        x[0, 5] = 50.0
        two = triton_int8.int8_linear(x, q, s, bias, None, dt, act=act)
        one, again = (triton_int8.fused_linear(x, q, s, bias, dt, act=act, wide=wide) for _ in range(2))
        plan = triton_plans.plan_fused(x, q, s, bias, dt, act, wide=wide)
        planned = plan(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = plan(x)
        graph.replay()
        torch.cuda.synchronize()
        ref = acts[act](x.double()) @ (q.double() * s.double().reshape(-1, 1)).t() + bias.double()
        same = {"first": torch.equal(one, two), "second": torch.equal(again, two),
                "plan": torch.equal(planned, two), "graph": torch.equal(graphed, two)}
        # the same codes and exact int32 sums; a float32 output shows the epilogue's multiplication order, which
        # differs where the two-launch path takes another GEMM kernel (runs 74 / 77: m = 256 fp32 after the
        # earlier checks had calibrated the device, bit-equal when run alone): agreement to 1e-6 then
        close = all(rel(y, two) < 1e-6 for y in (one, again, planned, graphed))
        record("fused_rows_equals_two_launch", all(same.values()) or (dt == torch.float32 and close), m=m, k=k,
               n=n, dtype=str(dt), act=act, wide=wide, rel=rel(one, ref), rel_vs_two_launch=rel(one, two), **same)
        if wide:  # four streams launching at once (their programs share the SMs): no wait outlives its launch
            streams = [torch.cuda.Stream() for _ in range(4)]
            outs = []
            for st in streams:
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    outs.append([plan(x) for _ in range(8)])
            for st in streams:
                torch.cuda.current_stream().wait_stream(st)
            torch.cuda.synchronize()
            record("fused_rows_wide_streams", all(torch.equal(y, planned) for ys in outs for y in ys), m=m, k=k,
                   n=n)


def check_block() -> None:
    for m, k, n, b in [(300, 3072, 1000, 128), (5, 200, 70, 64)]:
        x = torch.randn(m, k, device="cuda").bfloat16()
        w = torch.randn(n, k, device="cuda")
        q, s = quantize_blockwise(w, b)
        wd = dequantize_blockwise(q, s, b, dtype=torch.float64)
        # the reference (one _int_mm per K block, per-row int8 activations): exact up to float32 sums
        y = int8_block_linear(x, q, s, block=b, out_dtype=torch.float32, backend="torch")
        qx, sx = reference.quantize_rows_int8(x.float())
        e = rel(y, (qx.double() * sx.double()) @ wd.t())
        record("int8_block_linear", e < 1e-5, m=m, k=k, n=n, block=b, rel=e)
        # what auto runs on a GPU since 2026-12-04: the block dequantize kernel + cuBLAS bf16 (weight-only)
        choice = choose_backend(x, kind="int8_block", n=n, k=k, opts=(b,)).name
        y = int8_block_linear(x, q, s, block=b, out_dtype=torch.float32)
        e = rel(y, x.double() @ wd.t())
        record("int8_block_linear_auto", choice == "dequant" and e <= 2 ** -7, m=m, k=k, n=n, block=b, rel=e,
               backend=choice)


def check_w4a8() -> None:
    try:
        from comfy_kitchen.backends.cuda import convrot_w4a4_linear as ck_w4a4
    except Exception as e:  # recorded: the comparison is skipped, visibly
        ck_w4a4 = None
        record("ck_convrot_w4a4_import", True, note=f"comfy-kitchen CUDA not importable: {e}"[:200])
    for m, k, n, g in [(1, 3072, 3072, 256), (77, 1280, 640, 16), (300, 5120, 1000, 64), (4096, 3072, 9216, 256),
                       (1024, 15360, 3072, 256)]:
        x = torch.randn(m, k, device="cuda").bfloat16()
        v = torch.randint(-7, 8, (n, k), device="cuda")
        packed, sw = pack_int4(v), torch.rand(n, device="cuda") * 0.01 + 0.001
        bias = torch.randn(n, device="cuda").bfloat16()
        y = int4_rot_linear(x, packed, sw, bias, convrot_group=g, backend="triton")
        yr = int4_rot_linear(x, packed, sw, bias, convrot_group=g, backend="torch")
        e = rel(y, yr)
        info = {}
        if ck_w4a4 is not None:
            yc = ck_w4a4(x, packed, sw, bias, convrot_groupsize=g, linear_dtype="int8")
            info["rel_vs_comfy_kitchen_cuda"] = rel(y, yc)
        ok = bool(torch.isfinite(y).all()) and e <= 2**-7 and info.get("rel_vs_comfy_kitchen_cuda", 0) <= 2**-6
        record("w4a8_linear", ok, m=m, k=k, n=n, group=g, rel_vs_torch_path=e, **info)
        # every operand order (the weight as wgmma's register operand, both nibbles per MMA): the same integer
        # sums, so the same bits as the plain order
        from comfyquant.runtime.kernels import triton_int8 as ti

        plain = ti.w4a8_linear(x, packed, sw, bias, g, torch.bfloat16, order="plain")
        for order in ("swapped", "joined"):
            same = torch.equal(ti.w4a8_linear(x, packed, sw, bias, g, torch.bfloat16, order=order), plain)
            record(f"w4a8_linear_{order}", same, m=m, k=k, n=n, group=g)
        # int4 unpacked per call onto the W8A8 GEMM (the automatic path from 256 rows): the same bits again,
        # the general path, its plan (on another input, after the first call compiled it) and the dispatcher's
        from comfyquant.runtime.kernels import triton_unpack as tu

        unp = tu.w4_unpacked_linear(x, packed, sw, bias, g, torch.bfloat16)
        x2 = torch.randn(m, k, device="cuda").bfloat16()
        plan = tu.plan_w4_unpacked(x, packed, sw, bias, g, torch.bfloat16)
        want2 = ti.w4a8_linear(x2, packed, sw, bias, g, torch.bfloat16, order="plain")
        # the dispatcher: W4A8 or unpacked (bit-equal) above W4A16_MAX_ROWS; weight-only below (checked next)
        from comfyquant.runtime.kernels.builtin import W4A16_MAX_ROWS

        auto_ok = m <= W4A16_MAX_ROWS or torch.equal(int4_rot_linear(x2, packed, sw, bias, convrot_group=g), want2)
        record("w4_unpacked_linear", torch.equal(unp, plain) and plan is not None and torch.equal(plan(x2), want2)
               and auto_ok, m=m, k=k, n=n, group=g, planned=plan is not None)
        # weight-only on the packed codes (the automatic path at 1-16 rows): bit-equal to the weight-only kernel
        # on the unpacked int8 codes (same tiles and sums), and within bf16 rounding of the W4A8 result
        from comfyquant.quant.int4 import unpack_int4

        for rows in (1, 16):
            xs = x[:rows]
            y16 = ti.w8a16_linear(xs, packed, sw, bias, g, torch.bfloat16, packed=True)
            y8 = ti.w8a16_linear(xs, unpack_int4(packed), sw, bias, g, torch.bfloat16)
            # the same codes and tiles; run 75 found 2 of 6 shapes at 16 rows off by float32 summation order
            # (1e-3 apart, both as close to the reference): bit-equality is recorded, agreement checked
            same = torch.equal(y16, y8) or rel(y16, y8) < 2**-10
            e16 = rel(y16, int4_rot_linear(xs, packed, sw, bias, convrot_group=g, backend="torch"))
            from comfyquant.runtime.kernels.dispatch import choose_backend

            pick = choose_backend(xs, kind="int4_rot", n=n, k=k, opts=(g,)).name  # one row: long K, N < 8192 only
            want_auto = y16 if pick == "triton_w4a16" else ti.w4a8_linear(xs, packed, sw, bias, g, torch.bfloat16)
            auto16 = int4_rot_linear(xs, packed, sw, bias, convrot_group=g)
            again = torch.equal(y16, ti.w8a16_linear(xs, packed, sw, bias, g, torch.bfloat16, packed=True))
            record("w4a16_linear", same and e16 <= 2**-6 and torch.equal(auto16, want_auto), m=rows, k=k, n=n,
                   group=g, rel_vs_w4a8_reference=e16, auto=pick, packed_equals_unpacked=torch.equal(y16, y8),
                   packed_vs_unpacked=rel(y16, y8),
                   auto_equals_pick=torch.equal(auto16, want_auto), repeat_equal=again,
                   auto_rel=rel(auto16, want_auto))
