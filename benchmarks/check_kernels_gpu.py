"""GPU accuracy checks for every kernel (run on the H100/H200): float64 references on fresh random inputs.

Bounds (stated, asserted):
* activation quant kernels: the int8 codes equal the torch reference on the same (fp32) input exactly for the
  plain path; with the rotation, fp32 butterflies in another order may move a code by 1 at a .5 tie
  (asserted: max |diff| <= 1, <= 0.1% of codes); fp8 codes equal the torch cast exactly.
* int32 GEMM: bit-for-bit equal to ``torch._int_mm`` on random int8 inputs (any shape; padding handled).
* persistent-grid W8A8 GEMM (``TileConfig.persistent`` 1, 2): the scaled bf16 output bit-equal to the
  one-program-per-tile kernel's with the same tile (same per-tile arithmetic), and the pick uses it.
* W8A8 linear: ``rel <= 1.5 * (eps_x + eps_w) + 2^-7`` vs the float64 product of the unquantized inputs, where
  eps are the measured relative quantization errors of x (per row) and W; and ``rel <= 2^-7`` vs the torch
  reference path on the same inputs (bf16 output rounding).
* W8A16 / fp8: vs float64 of the dequantized weight (bf16 output): ``rel <= 2^-7``; fp8 vs unquantized < 0.08.
* Triton FP8 W8A8 (kind fp8, backend ``triton``): vs float64 of its own fp8 codes and scales ``rel <= 2^-7``
  (bf16 output), vs the unquantized product the W8A8 bound; in fp32 output its accumulation error at most
  twice ``_scaled_mm``'s (cuBLAS without fast accumulation) on the same codes.
* fused W8A8 (quantization inside the GEMM, the two-launch path's codes): the same bound as W8A8; dequant + cuBLAS:
  vs float64 of the dequantized weight ``rel <= 2^-7``.
* W4A8 (int4_rot): vs the torch reference path on the same inputs ``rel <= 2^-7`` (identical integer math,
  bf16 output), and vs comfy-kitchen's CUDA ``convrot_w4a4_linear(linear_dtype="int8")`` ``rel <= 2^-6``.
* CUDA graphs: ``cuda_graphs.capture`` of a quantized block replays within ``2^-7`` of its eager output.
Before every check the allocator's free memory is filled with NaN, so an output element never written fails.
Writes a JSON report to $OUT (or --out) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from gpu_check_record import RESULTS, poison, record, rel

from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.quant.hadamard import choose_group_size, fast_hadamard, rotate_weight
from comfyquant.quant.int8 import (
    dequantize_blockwise,
    quantize_blockwise,
    quantize_rowwise,
    quantize_tensorwise,
)
from comfyquant.runtime.kernels import reference, triton_int8, triton_quant
from comfyquant.runtime.kernels.dispatch import (
    choose_backend,
    fp8_linear,
    int4_rot_linear,
    int8_block_linear,
    int8_linear,
)
from comfyquant.runtime.kernels.int4 import pack_int4


def inputs(m: int, k: int, how: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random activations with the requested memory layout (values never all zero)."""
    if how == "contig":
        return torch.randn(m, k, device="cuda").to(dtype)
    if how == "transposed":
        return torch.randn(k, m, device="cuda").to(dtype).t()
    if how == "row_stride":  # a column slice: rows further apart than K
        return torch.randn(m, k + 24, device="cuda").to(dtype)[:, 5:5 + k]
    if how == "3d":
        return torch.randn(2, -(-m // 2), k, device="cuda").to(dtype)
    raise ValueError(how)


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


def check_linear() -> None:
    for m, k, n, how, scale_kind in [
        (1, 3072, 3072, "contig", "row"), (16, 3072, 9216, "transposed", "row"), (77, 100, 70, "row_stride", "row"),
        (256, 5120, 13824, "3d", "tensor"), (4096, 3072, 3072, "contig", "row"), (1000, 12288, 3072, "3d", "row"),
        (33, 640, 640, "transposed", "tensor"),
    ]:
        x = inputs(m, k, how)
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        q, s = quantize_rowwise(w) if scale_kind == "row" else quantize_tensorwise(w)
        ref64 = x.double() @ w.double().t() + bias.double()
        x2d = x.reshape(-1, k).float()
        qx, sx = reference.quantize_rows_int8(x2d)
        eps = rel(qx.double() * sx.double(), x2d) + rel(q.double() * s.double(), w)
        ref_path = int8_linear(x, q, s, bias, backend="torch")
        # the one-launch kernel quantizes x as the activation kernel does: the two-launch output, bit for bit
        fused, two = int8_linear(x, q, s, bias, backend="triton_fused"), int8_linear(x, q, s, bias, backend="triton")
        record("w8a8_fused_equals_two_launch", torch.equal(fused, two), m=m, k=k, n=n, layout=how,
               max_diff=float((fused.float() - two.float()).abs().max()))
        for backend in ("triton", "triton_fused", "triton_fused_kblock", "triton_w8a16", "dequant"):
            y = int8_linear(x, q, s, bias, backend=backend)
            finite = bool(torch.isfinite(y).all())
            if backend == "triton_fused_kblock":  # per-row-and-128-column activation scales: its own reference
                want = reference.int8_linear_kblock_ref(x, q, s, bias, torch.float32)
                e, e_ref = rel(y, ref64), rel(y, want)
                ok = finite and e <= 1.5 * eps + 2**-7 and e_ref <= 2**-7
                record(f"w8a8_linear_{backend}", ok, m=m, k=k, n=n, layout=how, scale=scale_kind, rel=e,
                       bound=1.5 * eps + 2**-7, rel_vs_reference=e_ref)
            elif backend in ("triton", "triton_fused"):
                e, e_ref = rel(y, ref64), rel(y, ref_path)
                ok = finite and e <= 1.5 * eps + 2**-7 and e_ref <= 2**-7
                record(f"w8a8_linear_{backend}", ok, m=m, k=k, n=n, layout=how, scale=scale_kind, rel=e,
                       bound=1.5 * eps + 2**-7, rel_vs_torch_path=e_ref)
            else:
                exact = x.double() @ (q.double() * s.double()).t() + bias.double()
                e = rel(y, exact)
                record(f"{backend}_linear", finite and e <= 2**-7, m=m, k=k, n=n, layout=how, rel=e)
        # convrot: rotated weight, activations rotated in the kernel
        g = choose_group_size(k)
        if g is not None:
            qr, sr = quantize_rowwise(rotate_weight(w, g))
            xr = fast_hadamard(x2d.double(), g)
            qxr, sxr = reference.quantize_rows_int8(xr.float())
            eps_r = rel(qxr.double() * sxr.double(), xr) + rel(qr.double() * sr.double(), rotate_weight(w.double(), g))
            for backend in ("triton", "triton_w8a16"):
                y = int8_linear(x, qr, sr, bias, convrot_group=g, backend=backend)
                e = rel(y, ref64)
                bound = (1.5 * eps_r + 2**-7) if backend == "triton" else 2 * rel(qr.double() * sr.double(),
                                                                                   rotate_weight(w.double(), g)) + 2**-7
                record(f"convrot_{backend}", bool(torch.isfinite(y).all()) and e <= bound, m=m, k=k, n=n,
                       group=g, rel=e, bound=bound)
        if k % 16 == 0 and n % 16 == 0:
            qf, sf = quantize_fp8(w)
            for static in (False, True):
                isc = (x.float().abs().amax() / 448).reshape(()) if static else None
                y = fp8_linear(x, qf, sf, bias, input_scale=isc, backend="scaled_mm")
                yr = fp8_linear(x, qf, sf, bias, input_scale=isc, backend="torch")
                e_ref, e64 = rel(y, yr), rel(y, ref64)
                record("fp8_scaled_mm", e_ref <= 2**-7 and e64 < 0.08, m=m, k=k, n=n, static=static,
                       rel_vs_torch_path=e_ref, rel=e64)
            for backend in ("triton_w8a16", "dequant"):  # weight-only fp8 paths
                y = fp8_linear(x, qf, sf, bias, backend=backend)
                e = rel(y, x.double() @ (qf.double() * sf.double()).t() + bias.double())
                record(f"fp8_{backend}_linear", bool(torch.isfinite(y).all()) and e <= 2**-7, m=m, k=k, n=n, rel=e)
        # the automatic choice (what QuantLinear uses), eager and (twice) through the custom op compiled
        y_auto = int8_linear(x, q, s, bias)
        e_auto = rel(y_auto, ref64)
        info = {}
        if m == 16:
            y_comp = torch.compile(lambda t, q=q, s=s, b=bias: int8_linear(t, q, s, b), fullgraph=True)(x)
            info["rel_compiled_vs_auto_bound"] = rel(y_comp, ref64)
            e_auto = max(e_auto, info["rel_compiled_vs_auto_bound"])
        record("auto_backend", e_auto <= 1.5 * eps + 2**-7, m=m, k=k, n=n, rel=e_auto, **info)


def check_fused_rows() -> None:
    """The one-launch path from 64 rows (the row-block kernel, ``triton_gemm.fused_rows``) on fp32 and fp16
    activations too (ComfyUI runs T5 in fp32), with and without an input activation: the two-launch path's output
    bit for bit on the first launch, a second launch (on the counters the first left), its plan and a CUDA-graph
    replay of the plan; the error against float64 (activated x times the dequantized weight) is recorded."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels import triton_plans

    acts = {0: lambda x: x, 1: lambda x: F.gelu(x, approximate="tanh"), 3: F.silu}
    for m, k, n, dt, act in [(256, 4096, 4096, torch.float32, 0), (77, 4096, 4096, torch.float32, 0),
                             (256, 4096, 4096, torch.float32, 1), (1000, 768, 3072, torch.float32, 0),
                             (300, 15360, 3072, torch.float32, 0), (256, 1280, 1280, torch.float16, 3),
                             (64, 640, 640, torch.float32, 0)]:
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = quantize_rowwise(w)
        bias = torch.randn(n, device="cuda").bfloat16()
        x = (torch.randn(m, k, device="cuda") * 3).to(dt)
        x[0, 5] = 50.0
        two = triton_int8.int8_linear(x, q, s, bias, None, dt, act=act)
        one, again = (triton_int8.fused_linear(x, q, s, bias, dt, act=act) for _ in range(2))
        plan = triton_plans.plan_fused(x, q, s, bias, dt, act)
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
               n=n, dtype=str(dt), act=act, rel=rel(one, ref), rel_vs_two_launch=rel(one, two), **same)


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


def check_cuda_graphs() -> None:
    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.cuda_graphs import capture

    net = nn.Sequential(nn.Linear(3072, 3072), nn.GELU(), nn.Linear(3072, 3072)).cuda().bfloat16()
    quantize_(net, QuantizeConfig(format="int8"))
    g = capture(net)
    with torch.no_grad():
        for m in (1024, 1024, 1024, 1024, 77, 77, 77, 1024):
            x = torch.randn(m, 3072, device="cuda").bfloat16()
            # the capture picks backends by GPU time alone (another path than eager may run): both are int8
            # approximations of the same layers, each within ~1% of the float result
            e = rel(g(x), net(x))
            record("cuda_graphs_replay", e <= 0.03, m=m, graphs=g.graphs, rel=e)


def check_siblings() -> None:
    """Sibling projections as one GEMM (``runtime.siblings``) on the GPU: a T5-width attention's q / k / v
    (M 256 and 1024, int8 on the Triton / Gluon W8A8 path pinned, and the automatic backend) fused against the
    same module unfused: bit-equal with the W8A8 backend pinned (int32 sums and one epilogue per element,
    whichever tile runs), within int8 error of each other with the automatic choice (a wider N may pick
    another backend); the fused GEMM ran; the weights share one storage; and a CUDA-graph capture after the
    warm-up steps replays the fused module's output."""
    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.cuda_graphs import capture
    from comfyquant.runtime.siblings import fuse_sibling_projections

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(4096, 4096, bias=False) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.q(x), self.k(x) * 0.5, self.v(x)], -1)

    for backend in ("triton", None):
        torch.manual_seed(7)
        plain = Attn().cuda().bfloat16()
        fused = Attn().cuda().bfloat16()
        fused.load_state_dict(plain.state_dict())
        for net in (plain, fused):
            quantize_(net, QuantizeConfig(format="int8", min_features=1, backend=backend))
        groups = fuse_sibling_projections(fused)
        with torch.no_grad():
            for m in (256, 1024):
                x = torch.randn(1, m, 4096, device="cuda").bfloat16()
                want = plain(x)
                for _ in range(3):  # an observed round, then fused rounds
                    got = fused(x)
                group = fused.q.sibling[0]
                shared = fused.q.weight.qdata.untyped_storage().data_ptr() == \
                    fused.v.weight.qdata.untyped_storage().data_ptr()
                ok = (torch.equal(got, want) if backend else rel(got, want) < 0.02) and group.fused_calls >= 2
                record("siblings_fused", ok and shared and groups == [": q,k,v"], m=m, backend=str(backend),
                       fused_calls=group.fused_calls, shared=shared, rel=rel(got, want))
            # dynamic LoRAs on q and v: one stacked low-rank term in the fused GEMM's epilogue (not yet run on
            # a GPU when written: the tenth session's device time was spent)
            from comfyquant.lora.sidepath import LoRASidePath, SideEntry

            for name in ("q", "v"):
                side = LoRASidePath()
                side.add(1, SideEntry(down=(torch.randn(16, 4096, device="cuda") * 0.02).bfloat16(),
                                      up=(torch.randn(4096, 16, device="cuda") * 0.02).bfloat16()))
                getattr(fused, name).adapter, getattr(plain, name).adapter = side, side.copy()
            x = torch.randn(1, 1024, 4096, device="cuda").bfloat16()
            want = plain(x)
            for _ in range(2):
                got = fused(x)
            term = getattr(fused.q.sibling[0], "_term", None)
            record("siblings_lora_term", term is not None and rel(got, want) < 0.01, backend=str(backend),
                   rel=rel(got, want))
            for name in ("q", "v"):
                getattr(fused, name).adapter = getattr(plain, name).adapter = None
            g = capture(fused)
            x = torch.randn(1, 256, 4096, device="cuda").bfloat16()
            outs = [g(x) for _ in range(4)]  # two eager warm-up calls, then capture and replay
            want = fused(x)
            e = max(rel(o, want) for o in outs)
            record("siblings_cuda_graphs", e <= (0.0 if backend else 0.02), backend=str(backend), graphs=g.graphs,
                   rel=e)


def check_fp8_triton() -> None:
    """The Triton FP8 W8A8 GEMM: e4m3fn and e5m2 weights, tensor and row weight scales, dynamic and static
    activation scales, ragged K (pointer kernel, masked tails) and K % 16 == 0 (TMA kernel on Hopper)."""
    for m, k, n, how in [(1, 3072, 3072, "contig"), (77, 100, 70, "row_stride"), (256, 5120, 13824, "3d"),
                         (4096, 3072, 3072, "contig"), (1000, 12288, 3072, "transposed"), (33, 200, 640, "contig")]:
        x = inputs(m, k, how)
        x2d = x.reshape(-1, k)
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        for wdt in (torch.float8_e4m3fn, torch.float8_e5m2):
            qf, sf = quantize_fp8(w, wdt)
            for scale_kind in ("tensor", "row"):
                sw = sf if scale_kind == "tensor" else (torch.rand(n, 1, device="cuda") + 0.5) * sf
                w_deq = qf.double() * sw.double().reshape(-1, 1)
                for static in (False, True):
                    isc = (x.float().abs().amax() / torch.finfo(wdt).max).reshape(()) if static else None
                    y = fp8_linear(x, qf, sw, bias, input_scale=isc, backend="triton")
                    qx, sx = triton_quant.quantize_rows_fp8(x2d, wdt, isc)
                    xq = qx.double() * sx.double()
                    own = (xq @ w_deq.t() + bias.double()).reshape(y.shape)
                    ref64 = x.double() @ (w.double() * sw.double().reshape(-1, 1) / sf.double()).t() + bias.double()
                    bound = 1.5 * (rel(xq, x2d) + rel(w_deq, w * sw / sf)) + 2**-7
                    e_own, e64 = rel(y, own), rel(y, ref64)
                    record("fp8_triton_linear", bool(torch.isfinite(y).all()) and e_own <= 2**-7 and e64 <= bound,
                           m=m, k=k, n=n, layout=how, weight=str(wdt), scale=scale_kind, static=static, rel=e64,
                           bound=bound, rel_vs_own_codes=e_own)
        if k % 16 == 0 and n % 16 == 0 and m > 16:  # accumulation precision vs cuBLAS on the same codes (fp32 out)
            qf, sf = quantize_fp8(w)
            isc = (x.float().abs().amax() / 448).reshape(())
            qx, _ = triton_quant.quantize_rows_fp8(x2d, qf.dtype, isc)
            exact = (qx.double() * isc.double()) @ (qf.double() * sf.double()).t()
            y = triton_int8.fp8_linear(x2d, qf, sf, None, isc, torch.float32)
            errs = {fast: rel(torch._scaled_mm(qx, qf.t(), scale_a=isc.float(), scale_b=sf.float(),
                                               out_dtype=torch.float32, use_fast_accum=fast), exact)
                    for fast in (False, True)}
            e = rel(y, exact)
            record("fp8_triton_fp32_accumulation", e <= 2 * errs[False] + 1e-6, m=m, k=k, n=n, rel=e,
                   rel_scaled_mm=errs[False], rel_scaled_mm_fast_accum=errs[True])


def check_fp8_low_rank_choice() -> None:
    """The automatic fp8 choice on this device (its measured costs): a rank-32 low-rank term at M=4096 on the
    Flux qkv / mlp0 shapes takes the fusing Triton GEMM (without a term the Gluon fp8 GEMM, also "triton", has
    been the choice since the fifteenth session; ``_scaled_mm`` before)."""

    for k, n in ((3072, 9216), (3072, 12288)):
        x = torch.randn(4096, k, device="cuda").bfloat16()
        plain = choose_backend(x, kind="fp8", n=n, k=k)
        lora = choose_backend(x, kind="fp8", n=n, k=k, low_rank=32)
        record("fp8_low_rank_choice", plain.name in ("scaled_mm", "triton") and lora.name == "triton", k=k, n=n,
               plain=plain.name, with_low_rank=lora.name, reason=lora.reason)


def check_low_rank_epilogue() -> None:
    """Dynamic LoRAs added in the GEMM epilogue (every fusing backend, TMA and pointer W8A8 paths included):
    the layer with its side path equals the same backend without it plus the float64 low-rank term."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.nn import linear

    cases = {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"), "int8-rot": ("triton", "triton_w8a16"),
             "fp8": ("triton", "triton_w8a16", "scaled_mm"), "int4-rot": ("triton",)}
    for m, k, n, rank in [(5, 3072, 3072, 32), (300, 3072, 9216, 20), (4096, 3072, 3072, 96), (70, 200, 70, 8)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        x = torch.randn(m, k, device="cuda").bfloat16()
        bias = torch.randn(n, device="cuda").bfloat16()
        side = LoRASidePath()
        d = (torch.randn(rank, k, device="cuda") * 0.05).bfloat16()  # a term that is ~5-10% of the output
        u = (torch.randn(n, rank, device="cuda") * 0.05).bfloat16()
        side.add(1, SideEntry(down=d, up=u))
        term = (x.double() @ d.double().t()) @ u.double().t()
        for fmt, backends in cases.items():
            if k % 128 and fmt in ("int8-rot", "int4-rot"):
                continue
            lin = QuantLinear(k, n, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
            for backend in backends:
                if backend == "scaled_mm" and (k % 16 or n % 16):  # refused with a UserError (its own test)
                    continue
                lin.set_backend(backend)
                with torch.no_grad():
                    plain = linear(x, lin.qweight, lin.bias).double()
                    lin.adapter = side
                    y = lin(x)
                    lin.adapter = None
                e = rel(y, plain + term)
                record(f"low_rank_{fmt}_{backend}", bool(torch.isfinite(y).all()) and e <= 2**-7, m=m, k=k, n=n,
                       rank=rank, rel=e)


def check_input_act() -> None:
    """Folded input activations (every fusing backend; the gated swiglu / geglu / gated_gelu_tanh: the quantizers
    fuse them, the others apply them first): the layer with ``input_act`` equals the same backend on the
    activation computed by torch first (which rounds it to bf16; the kernels keep it in fp32)."""
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.kernels.acts import GATED, apply_input_act
    from comfyquant.runtime.nn import linear

    cases = {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"), "int8-rot": ("triton", "triton_w8a16"),
             "fp8": ("triton", "triton_w8a16", "scaled_mm"), "int4-rot": ("triton",)}
    for m, k, n in [(5, 3072, 3072), (300, 12288, 3072), (4096, 3072, 3072), (70, 200, 70)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        x2 = (torch.randn(m, 2 * k, device="cuda") * 2).bfloat16()  # a gated activation reads both halves
        for act in ("gelu_tanh", "silu", "swiglu", "geglu", "gated_gelu_tanh"):
            x = x2 if act in GATED else x2[:, :k].contiguous()
            xa = apply_input_act(x, act)
            for fmt, backends in cases.items():
                if k % 128 and fmt in ("int8-rot", "int4-rot"):
                    continue
                lin = QuantLinear(k, n, bias=False, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
                exact = apply_input_act(x.double(), act) @ lin.qweight.dequantize().double().t()
                for backend in backends:
                    if backend == "scaled_mm" and (k % 16 or n % 16):
                        continue
                    lin.set_backend(backend)
                    with torch.no_grad():
                        want = linear(xa, lin.qweight, None)
                        lin.input_act = act
                        y = lin(x)
                        lin.input_act = None
                    e = rel(y, want)
                    # paths that quantize activations (fp8 W8A8): a bf16 rounding of act(x) moves some values
                    # across fp8 rounding boundaries, so the two differ by about the format's own error; the
                    # folded one must then be no worse against the float64 truth than the unfolded one
                    e_fold, e_plain = rel(y, exact), rel(want, exact)
                    ok = e <= 2**-7 or e_fold <= 1.05 * e_plain
                    record(f"input_act_{act}_{fmt}_{backend}", bool(torch.isfinite(y).all()) and ok, m=m, k=k,
                           n=n, rel=e, rel_folded_vs_f64=e_fold, rel_unfolded_vs_f64=e_plain)


def check_plans() -> None:
    """Eager fast paths (``triton_plans``): a layer's first call of a signature takes the general path, later
    ones replay its kernels through the C launchers; the replay of the first input equals the first result bit
    for bit (same kernels), after other inputs ran in between; with and without a dynamic LoRA."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.nn import bound_linear

    cases = {"int8": ("triton", "triton_fused", "triton_fused_kblock", "triton_w8a16", "dequant"),
             "int8-rot": ("triton", "triton_w8a16", "dequant"),
             "fp8": ("triton_w8a16", "dequant", "scaled_mm", "triton"),
             "int4-rot": ("triton",), "fp8-static": ("triton",), "int8-block": ("dequant",)}
    # (4,096 and 2,048 rows: the convrot layers' activation pass on the one-read rotating kernel)
    for m, k, n in [(1, 3072, 3072), (300, 3072, 9216), (4096, 3072, 3072), (2048, 1280, 1280), (70, 200, 70)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        lead = (3, 100) if m == 300 else (m,)  # leading dims as models hand them over: plans make no views
        xs = [torch.randn(*lead, k, device="cuda").bfloat16() for _ in range(2)]
        side = LoRASidePath()
        side.add(1, SideEntry(down=(torch.randn(24, k, device="cuda") * 0.05).bfloat16(),
                              up=(torch.randn(n, 24, device="cuda") * 0.05).bfloat16()))
        for fmt, backends in cases.items():
            if k % 128 and fmt in ("int8-rot", "int4-rot"):
                continue
            # (fp8-static: a stored static activation scale, as calibrated fp8 checkpoints carry)
            qw = (QuantizedTensor.from_float(w.bfloat16(), "fp8", input_scale=0.02) if fmt == "fp8-static"
                  else QuantizedTensor.from_float(w.bfloat16(), fmt))
            lin = QuantLinear(k, n, weight=qw)
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
            for backend in backends:
                if backend == "scaled_mm" and (k % 16 or n % 16):
                    continue
                lin.set_backend(backend)
                for lora in (False, True):
                    lin.adapter = side if lora else None
                    with torch.no_grad():
                        first = lin(xs[0])  # general path (compiles)
                        lin(xs[1])
                        again = lin(xs[0])  # the plan, when there is one
                    lin.adapter = None
                    memo = getattr(bound_linear(lin.qweight, lin.bias), "memo", {})
                    planned = any(callable(e[1]) for sig, e in memo.items() if (sig[-1] > 0) == lora)
                    # (a rotated layer's weight-only / dequantizing plan carries no low-rank term: general path)
                    fuses = (backend not in ("dequant", "scaled_mm") and not (fmt == "int8-rot" and backend != "triton")
                             and fmt != "int4-rot")
                    same = torch.equal(first, again)
                    record(f"plan_{fmt}_{backend}{'_lora' if lora else ''}", same and (planned or (lora and not fuses)),
                           m=m, k=k, n=n, planned=planned, same=same)
    # every TMA plan made above took the direct launch (descriptors expanded by the plan, Triton's wrapper
    # skipped): a disagreement falls back to Triton's launch silently but for one log line, and costs host time
    kernels = {"w8a8_tma": triton_int8._TMA, "w8a8_tma_persistent": triton_int8._TMA_PERSISTENT}
    if triton_int8.ws_available() and torch.cuda.get_device_capability()[0] == 9:
        kernels["w8a8_ws"] = triton_int8._ws_kernel()
    for name, fk in kernels.items():
        record(f"plan_direct_launch_{name}", all(fk.direct_checked.values()), keys=len(fk.direct_checked),
               disagreed=sum(not v for v in fk.direct_checked.values()))


def check_inference_mode() -> None:
    """Layers made and run under ``torch.inference_mode`` (as ComfyUI executes nodes: weights, scales and
    plans are inference tensors), every backend's general path and plan: equal to the same layer made and run
    under ``no_grad``. The fp8 plan once read the scale's version counter and raised there."""
    from comfyquant.runtime import QuantizedTensor, QuantLinear

    k, n = 3072, 3072
    w = torch.randn(n, k, device="cuda") * 0.03
    bias = torch.randn(n, device="cuda").bfloat16()
    xs = [torch.randn(m, k, device="cuda").bfloat16() for m in (1, 300, 300, 4096, 4096)]
    for fmt, backends in {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"),
                          "fp8": ("triton_w8a16", "dequant", "scaled_mm", "triton")}.items():
        for backend in backends:
            outs = {}
            for mode in ("no_grad", "inference"):
                ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
                try:
                    with ctx:
                        lin = QuantLinear(k, n, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
                        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                        lin.set_backend(backend)
                        outs[mode] = [lin(x) for x in xs]  # the second of each size replays the plan
                except RuntimeError as e:
                    outs[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ok = all(isinstance(o, list) for o in outs.values()) and all(
                torch.equal(a, b) for a, b in zip(outs["no_grad"], outs["inference"], strict=True))
            record(f"inference_mode_{fmt}_{backend}", ok,
                   error=next((o for o in outs.values() if isinstance(o, str)), None))


def check_attention() -> None:
    """The int8 attention kernel (``triton_attention``) against fp32 SDPA, bf16 inputs laid out as models pass
    them (``[B, T, H, D]`` viewed as ``[B, H, T, D]``), ragged token counts, cross-attention; p and v in bf16
    (measured 1.3% error on random inputs) and in fp8 (3.9%)."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels import triton_attention as ta

    for b, h, t, tk, d in [(1, 24, 4608, 4608, 128), (2, 10, 1000, 77, 64), (1, 8, 333, 333, 128)]:
        q = torch.randn(b, t, h, d, device="cuda").bfloat16().transpose(1, 2)
        k = (torch.randn(b, tk, h, d, device="cuda") + torch.randn(d, device="cuda")).bfloat16().transpose(1, 2)
        v = torch.randn(b, tk, h, d, device="cuda").bfloat16().transpose(1, 2)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for pv_fp8, bound in ((False, 2.5e-2), (True, 6e-2)):
            poison()
            y = ta.int8_attention(q, k, v, pv_fp8=pv_fp8)
            err = float((y.float() - ref).norm() / ref.norm())
            record(f"attention{'_fp8pv' if pv_fp8 else ''}", bool(torch.isfinite(y).all()) and err <= bound
                   and y.shape == q.shape and y.transpose(1, 2).is_contiguous(), shape=(b, h, t, tk, d), err=err)


def check_attention_cudnn() -> None:
    """The ``cudnn_first`` scope inside ComfyUI-style backend ordering (FlashAttention-2 first, as ComfyUI 0.30
    sets it): the call runs on cuDNN's kernel (profiler kernel names), is counted, and stays exact bf16 attention;
    ``quantize=False`` routes nothing to the int8 kernel even for a long sequence."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention

    comfy_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda").bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for cudnn_first in (False, True):
        policy = AttentionPolicy(min_tokens=1024, quantize=False, cudnn_first=cudnn_first)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            with QuantizedAttention(policy) as mode, sdpa_kernel(comfy_order, set_priority=True):
                y = F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
        names = " ".join(e.key.lower() for e in prof.key_averages())
        err = rel(y, ref)
        on_cudnn = "cudnn" in names
        record("attention_cudnn_first" if cudnn_first else "attention_comfy_order", err <= 1e-2 and mode.routed == 0
               and on_cudnn is cudnn_first and mode.cudnn == int(cudnn_first), err=err, cudnn_kernel=on_cudnn)


def _checks() -> tuple:
    """Every check, in the order they run (the GEMMs' from ``check_gemm_gpu``, the folded norms' from
    ``check_norms_gpu``)."""
    from check_gemm_gpu import (
        check_int_mm_exact,
        check_persistent,
        check_ws_experimental,
        check_ws_fp8,
        check_ws_gemm,
        check_ws_lora_wired,
    )
    from check_norms_gpu import check_layer_norm_fold, check_modulated_fold, check_norm_fold

    return (check_act_quant, check_held_rotation, check_int_mm_exact, check_persistent, check_ws_gemm,
            check_ws_lora_wired, check_linear, check_fused_rows, check_fp8_triton, check_fp8_low_rank_choice,
            check_block, check_w4a8, check_low_rank_epilogue, check_input_act, check_plans, check_cuda_graphs,
            check_inference_mode, check_attention, check_attention_cudnn, check_ws_fp8, check_ws_experimental,
            check_siblings, check_norm_fold, check_modulated_fold, check_layer_norm_fold)


def _only(value: str) -> set[str]:
    """``--only``'s names, each a check of :func:`_checks` (a misspelt one would silently run nothing)."""
    names = {n for n in value.split(",") if n}
    unknown = sorted(names - {fn.__name__ for fn in _checks()})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check(s) {', '.join(unknown)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for check_kernels.json")
    p.add_argument("--only", type=_only, default=set(), help="comma-separated check function names (default: all)")
    a = p.parse_args(argv)
    only = a.only
    torch.manual_seed(1234)
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for fn in _checks():
        if only and fn.__name__ not in only:
            continue
        try:
            fn()
        except Exception as e:  # a kernel that fails to compile or run is a failed check, and the rest still run
            import traceback

            traceback.print_exc()
            record(fn.__name__, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    failed = [r for r in RESULTS if not r["ok"]]
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "check_kernels.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
