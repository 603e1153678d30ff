# ruff: noqa: B023  (the lambdas run inside the loop iteration that defines them)
"""Interpreter checks of the eager fast paths (``runtime.kernels.triton_plans``): a plan made from one input
replays the same kernels with every later input's own pointers and fresh outputs.

Oracle: the general host function on the same input (the same kernel and arguments, so bit-equal). Each plan
runs on inputs other than the one it was made from, so a plan that reused its first input or output would
fail; under the interpreter ``FastKernel.prepared`` runs the interpreter instead of a C launcher (the launcher
call itself is covered by ``benchmarks/check_paths_gpu.py``'s ``plan_*`` checks).
"""

from __future__ import annotations

import torch
from triton_interp import record

F32, F16 = torch.float32, torch.float16


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, k, generator=g) * 2).to(dtype) for _ in range(count)]


def check_plans() -> None:
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(5)
    for m, k, n, dtype in [(5, 64, 96, F32), (70, 128, 80, F16), (3, 128, 48, F16)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g).to(dtype)
        cases = {
            "int8": (lambda x, a=0: ti.int8_linear(x, w, s, bias, None, dtype, act=a),
                     lambda x, a=0: tp.plan_int8(x, w, s, bias, None, dtype, a)),
            "int8_rot16": (lambda x, a=0: ti.int8_linear(x, w, s, None, 16, dtype, act=a),
                           lambda x, a=0: tp.plan_int8(x, w, s, None, 16, dtype, a)),
            "fused": (lambda x, a=0: ti.fused_linear(x, w, s, bias, dtype, act=a),
                      lambda x, a=0: tp.plan_fused(x, w, s, bias, dtype, a)),
            "fused_kblock": (lambda x, a=0: ti.fused_linear(x, w, s, bias, dtype, act=a, kblock=True),
                             lambda x, a=0: tp.plan_fused(x, w, s, bias, dtype, a, kblock=True)),
        }
        if dtype == F16:  # bf16/fp32 x are not planned for W8A16 (and bf16 dot does not interpret)
            cases["w8a16"] = (lambda x, a=0: ti.w8a16_linear(x, w, s, bias, None, dtype, act=a),
                              lambda x, a=0: tp.plan_w8a16(x, w, s, bias, dtype, a))
            cases["dequant"] = (lambda x, a=0: ti.dequant_linear(x, w, s, bias, None, dtype),
                                lambda x, a=0: None if a else tp.plan_dequant(x, w, s, bias, dtype))
        first, *later = _inputs(m, k, dtype, seed=m + k)
        for name, (general, make) in cases.items():
            for act in (0, 3) if name != "dequant" else (0,):  # none, silu (folded into the kernel's read of x)
                plan = make(first, act)
                if plan is None:
                    record(f"plan_{name}_act{act}", False, why="no plan made")
                    continue
                outs = [plan(x) for x in later]
                wants = [general(x, act) for x in later]
                same = all(torch.equal(o, want) for o, want in zip(outs, wants, strict=True))
                fresh = outs[0].data_ptr() != outs[1].data_ptr() and not torch.equal(outs[0], outs[1])
                record(f"plan_{name}_act{act}", same and fresh, m=m, k=k, n=n, dtype=str(dtype))
    # long rotated rows too few for the tile kernel: the split rotation (two launches, its absmax parts after the
    # scales) in both the plan and the general path
    from comfyquant.runtime.kernels import triton_quant as tq

    w = torch.randint(-127, 128, (32, 12288), dtype=torch.int8, generator=g)
    s = torch.rand(32, generator=g) * 0.001 + 1e-4
    first, *later = _inputs(64, 12288, F16, seed=7)
    plan = tp.plan_int8(first, w, s, None, 256, F16)
    same = plan is not None and all(torch.equal(plan(x), ti.int8_linear(x, w, s, None, 256, F16)) for x in later)
    record("plan_int8_rot256_split", same and tq.pick_kernel(first, 256, tq.MODE_INT8) == "split")
    # long rotated rows from 256 rows: the group-rows rotation (a row per program, x read once) in both paths
    w = torch.randint(-127, 128, (16, 8448), dtype=torch.int8, generator=g)
    s = torch.rand(16, generator=g) * 0.001 + 1e-4
    first, *later = _inputs(256, 8448, F16, seed=8, count=2)
    plan = tp.plan_int8(first, w, s, None, 256, F16)
    same = plan is not None and all(torch.equal(plan(x), ti.int8_linear(x, w, s, None, 256, F16)) for x in later)
    record("plan_int8_rot256_group_rows", same and tq.pick_kernel(first, 256, tq.MODE_INT8) == "grows")
    # inputs with leading dimensions ([B, T, K], as every model hands them over): the kernels read x and write
    # the output [B, T, N] through pointers, no per-call views; same values and shape as the general path
    w = torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=g)
    s = torch.rand(48, generator=g) * 0.01 + 1e-3
    first, *later = (x.view(2, 35, 128) for x in _inputs(70, 128, F16, seed=3))
    for name, general, make in (
            ("int8", lambda x: ti.int8_linear(x, w, s, None, None, F16), lambda x: tp.plan_int8(x, w, s, None, None, F16)),
            ("fused", lambda x: ti.fused_linear(x, w, s, None, F16), lambda x: tp.plan_fused(x, w, s, None, F16)),
            ("w8a16", lambda x: ti.w8a16_linear(x, w, s, None, None, F16), lambda x: tp.plan_w8a16(x, w, s, None, F16))):
        plan = make(first)
        outs = [plan(x) for x in later] if plan is not None else []
        record(f"plan_{name}_3d_input", plan is not None and all(
            o.shape == (2, 35, 48) and torch.equal(o, general(x)) for o, x in zip(outs, later, strict=True)))
    x = _inputs(4, 64, F16, seed=1)[0]
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    s16 = (torch.rand(32, generator=g) * 0.01).to(F16)  # the kernels would read an fp32 copy: no plan
    record("plan_refuses_copied_scale", tp.plan_fused(x, w, s16, None, F16) is None)
    s32 = torch.rand(32, generator=g) * 0.01
    record("plan_takes_contiguous_x", tp.plan_fused(x, w, s32, None, F16) is not None)
    record("plan_refuses_strided_x", tp.plan_fused(_inputs(4, 128, F16, 2)[0][:, :64], w, s32, None, F16) is None)


def check_low_rank_plans() -> None:
    """Plans with a dynamic LoRA's low-rank term: ``h = x @ down^T`` made per call from each input, the padded
    operands fixed; equal to the general path with the same term, and different from the plan without it."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(11)
    m, k, n, r = 6, 128, 64, 20
    for dtype in (F32, F16):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        down, up = torch.zeros(32, k), torch.zeros(32, n)
        down[:r], up[:r] = torch.randn(r, k, generator=g) * 0.1, torch.randn(r, n, generator=g) * 0.1
        lr = (down.to(dtype), up.to(dtype), r)
        cases = {"int8": (lambda x, lr: ti.int8_linear(x, w, s, None, None, dtype, low_rank=lr),
                          lambda x, lr: tp.plan_int8(x, w, s, None, None, dtype, 0, lr)),
                 "fused": (lambda x, lr: ti.fused_linear(x, w, s, None, dtype, low_rank=lr),
                           lambda x, lr: tp.plan_fused(x, w, s, None, dtype, 0, lr))}
        if dtype == F16:
            cases["w8a16"] = (lambda x, lr: ti.w8a16_linear(x, w, s, None, None, dtype, low_rank=lr),
                              lambda x, lr: tp.plan_w8a16(x, w, s, None, dtype, 0, lr))
        first, *later = _inputs(m, k, dtype, seed=12)
        for name, (general, make) in cases.items():
            plan, plain = make(first, lr), make(first, None)
            ok = plan is not None and plain is not None and all(
                torch.equal(plan(x), general(x, lr)) and not torch.equal(plan(x), plain(x)) for x in later)
            record(f"plan_low_rank_{name}", ok, dtype=str(dtype))


def check_fp8_w8a8_plan() -> None:
    """The FP8 W8A8 Triton path's plan (fp8 activations, the W8A8 GEMM on fp8 operands), with and without a
    low-rank term and a folded activation: equal to ``fp8_linear`` on inputs other than the one it was made from."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(9)
    m, k, n = 5, 128, 48
    qw, sw = quantize_fp8(torch.randn(n, k, generator=g) * 0.03)
    sw = sw.reshape(()).expand(n).contiguous()  # a per-row scale vector
    bias = torch.randn(n, generator=g)
    down, up = torch.zeros(16, k), torch.zeros(16, n)
    down[:8], up[:8] = torch.randn(8, k, generator=g) * 0.1, torch.randn(8, n, generator=g) * 0.1
    first, *later = _inputs(m, k, F32, seed=10)
    for name, act, lr in (("plain", 0, None), ("silu", 3, None), ("lora", 0, (down, up, 8))):
        plan = tp.plan_fp8(first, qw, sw, bias, F32, act, lr)
        ok = plan is not None and all(
            torch.equal(plan(x), ti.fp8_linear(x, qw, sw, bias, None, F32, low_rank=lr, act=act)) for x in later)
        record(f"plan_fp8_w8a8_{name}", ok)


def check_rotated_and_w4a8_plans() -> None:
    """Plans of the paths a convrot layer rotates apart (weight-only, dequantize + cuBLAS: the rotation pass into
    the stream's scratch buffer, then the unrotated plan on it), of W4A8 (rotating quantizer with the K permutation,
    int4 GEMM) and of the fp8 W8A8 path with a static input scale: equal to the general path on inputs other than
    the one each was made from, with fresh outputs. Before 2026-12-04 none of them had a plan: every call took the
    general path (80-220 µs of host a call on the H200 where the cost model assumed 13)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.quant.int4 import pack_int4
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(13)
    m, k, n = 5, 128, 48
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g).to(F16)
    packed = pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g))
    qw, sw = quantize_fp8(torch.randn(n, k, generator=g) * 0.03)
    static = torch.tensor(0.05)
    down, up = torch.zeros(16, k), torch.zeros(16, n)
    down[:8], up[:8] = torch.randn(8, k, generator=g) * 0.1, torch.randn(8, n, generator=g) * 0.1
    first, *later = _inputs(m, k, F16, seed=11)
    first32, *later32 = _inputs(m, k, F32, seed=12)
    first70, *later70 = _inputs(70, k, F16, seed=14)  # W4A8 from SMALL_M rows: the swapped-operand kernel
    cases = (
        ("w8a16_rot16", first, later, lambda x: ti.w8a16_linear(x, w, s, bias, 16, F16),
         lambda x: builtin._plan_w8a16(x, w, (s,), bias, (16,), F16, 0)),
        ("w8a16_rot16_silu", first, later, lambda x: ti.w8a16_linear(x, w, s, bias, 16, F16, act=3),
         lambda x: builtin._plan_w8a16(x, w, (s,), bias, (16,), F16, 3)),
        ("dequant_rot16", first, later, lambda x: ti.dequant_linear(x, w, s, bias, 16, F16),
         lambda x: tp.plan_rotated(x, 16, 0, lambda r: tp.plan_dequant(r, w, s, bias, F16))),
        ("w4a8_rot16", first, later, lambda x: ti.w4a8_linear(x, packed, s, bias, 16, F16),
         lambda x: builtin._plan_int4_triton(x, packed, (s,), bias, (16,), F16, 0)),
        ("w4a8_rot16_rows70", first70, later70, lambda x: ti.w4a8_linear(x, packed, s, bias, 16, F16),
         lambda x: builtin._plan_int4_triton(x, packed, (s,), bias, (16,), F16, 0)),
        ("w4a8_rot16_silu", first, later, lambda x: ti.w4a8_linear(x, packed, s, bias, 16, F16, act=3),
         lambda x: builtin._plan_int4_triton(x, packed, (s,), bias, (16,), F16, 3)),
        ("fp8_static", first32, later32, lambda x: ti.fp8_linear(x, qw, sw, None, static, F32),
         lambda x: builtin._plan_fp8_triton(x, qw, (sw, static), None, (), F32, 0)),
        ("fp8_static_lora", first32, later32,
         lambda x: ti.fp8_linear(x, qw, sw, None, static, F32, low_rank=(down, up, 8)),
         lambda x: builtin._plan_fp8_triton(x, qw, (sw, static), None, (), F32, 0, (down, up, 8))),
    )
    for name, x0, xs, general, make in cases:
        plan = make(x0)
        outs = [plan(x) for x in xs] if plan is not None else []
        same = plan is not None and all(torch.equal(o, general(x)) for o, x in zip(outs, xs, strict=True))
        fresh = bool(outs) and outs[0].data_ptr() != outs[1].data_ptr() and not torch.equal(outs[0], outs[1])
        record(f"plan_{name}", same and fresh, planned=plan is not None)
    # a rotated layer's weight-only plan with a LoRA: none (the side path reads the unrotated x), general path
    record("plan_w8a16_rot16_lora_none", builtin._plan_w8a16(first, w, (s,), bias, (16,), F16, 0,
                                                             (down.half(), up.half(), 8)) is None)


def check_block_dequant() -> None:
    """Block-wise int8 (``int8_block``, a scale per square tile) on the GPU path: one dequantize kernel reading the
    tile's scale, then the 16-bit GEMM: within fp16 rounding of the float64 product, the weight it builds equal to
    ``w * s`` rounded once, and its plan bit-equal to it on inputs other than the one it was made from. Before
    2026-12-04 the GPU ran the reference (one ``torch._int_mm`` per K block, 24 GEMMs a call at K = 3,072)."""
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(17)
    for n, k, block in ((70, 100, 32), (64, 256, 64), (33, 300, 128)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(-(-n // block), -(-k // block), generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g).to(F16)
        full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
        wd = ti.dequantize_weight(w, s, F16, block)
        record("block_dequant_weight", torch.equal(wd, (w.float() * full).to(F16)), n=n, k=k, block=block)
        first, *later = _inputs(5, k, F16, seed=n + k)
        ys = [ti.dequant_block_linear(x, w, s, block, bias, F16) for x in later]
        want = [x.double() @ (w.double() * full.double()).t() + bias.double() for x in later]
        e = max(float((y.double() - r).abs().max() / r.abs().max()) for y, r in zip(ys, want, strict=True))
        plan = builtin._plan_block_dequant(first, w, (s,), bias, (block,), F16, 0)  # CPU: None (no fast path)
        plan = tp.plan_dequant(first, w, s, bias, F16, block) if plan is None else plan
        same = plan is not None and all(torch.equal(plan(x), y) for x, y in zip(later, ys, strict=True))
        record("block_dequant_linear", e <= 2 ** -9 and same, n=n, k=k, block=block, rel=e, planned=plan is not None)


def check_scaled_mm_plan() -> None:
    """The fp8 ``_scaled_mm`` plan (CPU torch has ``_scaled_mm``): equal to the general path, and a weight scale
    updated in place after the plan was made is used (the plan's rowwise copy follows the version counter)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import fp8
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(7)
    m, k, n = 6, 96, 48
    qw, sw = quantize_fp8(torch.randn(n, k, generator=g) * 0.03)
    bias = torch.randn(n, generator=g).bfloat16()
    first, *later = _inputs(m, k, torch.bfloat16, seed=8)
    for act in (0, 1):
        plan = tp.plan_scaled_mm(first, qw, sw, bias, torch.bfloat16, act)
        same = plan is not None and all(
            torch.equal(plan(x), fp8.fp8_linear_scaled_mm(x, qw, sw, bias, None, torch.bfloat16, act=act))
            for x in later)
        record(f"plan_scaled_mm_act{act}", same)
    plan = tp.plan_scaled_mm(first, qw, sw, bias, torch.bfloat16)
    before = plan(later[0])
    sw.mul_(2.0)  # in place, as a re-quantization of the layer does
    after, want = plan(later[0]), fp8.fp8_linear_scaled_mm(later[0], qw, sw, bias, None, torch.bfloat16)
    record("plan_scaled_mm_sees_inplace_scale", torch.equal(after, want) and not torch.equal(after, before))


def check_plans_inference_mode() -> None:
    """Plans made and run under ``torch.inference_mode`` (ComfyUI executes nodes there, so the layers' weights
    and scales are inference tensors, which have no version counter), then run outside it: equal to the
    general path on ordinary tensors. The fp8 plan read ``w_scale._version`` and raised on the first GPU call
    in ComfyUI (found by ``benchmarks/bench_comfyui_t5.py`` on the H200)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import fp8
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(11)
    m, k, n = 6, 96, 48
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    qw, sw = quantize_fp8(torch.randn(n, k, generator=g) * 0.03)
    bias = torch.randn(n, generator=g)
    cases = {  # name: (general path on ordinary tensors, plan maker, weights, x dtype)
        "scaled_mm": (lambda x, w, s, b: fp8.fp8_linear_scaled_mm(x, w, s, b, None, torch.bfloat16),
                      lambda x, w, s, b: tp.plan_scaled_mm(x, w, s, b, torch.bfloat16), (qw, sw), torch.bfloat16),
        "int8": (lambda x, w, s, b: ti.int8_linear(x, w, s, b, None, F16),
                 lambda x, w, s, b: tp.plan_int8(x, w, s, b, None, F16), (w, s), F16),
        "fused": (lambda x, w, s, b: ti.fused_linear(x, w, s, b, F16),
                  lambda x, w, s, b: tp.plan_fused(x, w, s, b, F16), (w, s), F16),
        "w8a16": (lambda x, w, s, b: ti.w8a16_linear(x, w, s, b, None, F16),
                  lambda x, w, s, b: tp.plan_w8a16(x, w, s, b, F16), (w, s), F16),
    }
    for name, (general, make, (wq, ws), dtype) in cases.items():
        first, inside, outside = _inputs(m, k, dtype, seed=12)
        b = bias.to(dtype)
        error = None
        try:
            with torch.inference_mode():
                wq_i, ws_i, b_i = wq.clone(), ws.clone(), b.clone()  # created here: inference tensors
                plan = make(first.clone(), wq_i, ws_i, b_i)
                got_inside = plan(inside.clone()) if plan is not None else None
            got_outside = plan(outside) if plan is not None else None
        except RuntimeError as e:
            plan, error = None, str(e).splitlines()[0]
        ok = (plan is not None and wq_i.is_inference() and torch.equal(got_inside, general(inside, wq, ws, b))
              and torch.equal(got_outside, general(outside, wq, ws, b)))
        record(f"plan_{name}_inference_mode", ok, error=error)


def _reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor a plan closure keeps alive (through cells, lists, tuples, dicts and object attributes)."""
    seen, out, todo = set(), [], [root]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
            continue
        if callable(o) and getattr(o, "__closure__", None):
            todo.extend(c.cell_contents for c in o.__closure__ if c.cell_contents is not None)
        if isinstance(o, (list, tuple, set)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif hasattr(o, "__dict__") and not isinstance(o, type) and not callable(o):
            todo.extend(vars(o).values())
    return out


def check_plans_keep_no_buffers() -> None:
    """A plan keeps the weight-side tensors only: never the first input, nor the sample output / quantized
    activation / low-rank ``h`` it was built with (a plan lives as long as its layer; at Flux sizes those
    buffers are 10-100 MB each, per layer and input shape)."""
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(13)
    m, k, n = 5, 64, 96
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    lr = (torch.randn(16, k, generator=g).to(F16), torch.randn(16, n, generator=g).to(F16), 16)
    x = _inputs(m, k, F16, seed=14, count=1)[0]
    plans = {"int8": tp.plan_int8(x, w, s, None, None, F16), "int8_lr": tp.plan_int8(x, w, s, None, None, F16, 0, lr),
             "fused_lr": tp.plan_fused(x, w, s, None, F16, 0, lr), "w8a16": tp.plan_w8a16(x, w, s, None, F16),
             "w8a16_lr": tp.plan_w8a16(x, w, s, None, F16, 0, lr)}
    for name, plan in plans.items():
        held = _reachable_tensors(plan)
        bad = [tuple(t.shape) for t in held if tuple(t.shape) in ((m, k), (m, n), (m, 1), (m, 16))]
        record(f"plan_keeps_no_buffers_{name}", plan is not None and not bad and any(t is w for t in held),
               held=[tuple(t.shape) for t in held], bad=bad)


def check_plans_share_scratch() -> None:
    """Two-launch plans of one input shape share the stream's scratch pair (``kernels.scratch``): layers called
    in turn (different weights, inputs, widths of the same K) still give the general path's bits, and the pair is
    the same tensors on every call (no allocation, one TMA descriptor per shape)."""
    from comfyquant.runtime.kernels import scratch
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    g = torch.Generator().manual_seed(17)
    m, k = 6, 64
    layers = []
    for n in (96, 48, 96):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        layers.append((w, s))
    xs = _inputs(m, k, F16, seed=18, count=6)
    plans = [tp.plan_int8(xs[0], w, s, None, None, F16) for w, s in layers]
    pair = scratch.pool(xs[0].device).pair(0, m, k, torch.int8)
    outs = [plans[i % 3](xs[i]) for i in range(6)]
    wants = [ti.int8_linear(xs[i], *layers[i % 3], None, None, F16) for i in range(6)]
    again = scratch.pool(xs[0].device).pair(0, m, k, torch.int8)
    record("plans_share_scratch", all(torch.equal(o, w) for o, w in zip(outs, wants, strict=True))
           and again[0] is pair[0] and again[1] is pair[1])


def check_descriptor_copies() -> None:
    """The TMA plan's per-call descriptors: a copy of a checked template over a new tensor equals what
    ``TensorDescriptor.from_tensor`` makes for that tensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from comfyquant.runtime.kernels.triton_plans import desc_maker

    a, b = torch.zeros(64, 128, dtype=torch.int8), torch.ones(64, 128, dtype=torch.int8)
    make = desc_maker(TensorDescriptor.from_tensor(a, [32, 64]))
    d, want = make(b), TensorDescriptor.from_tensor(b, [32, 64])
    record("descriptor_copy", d.base is b and vars(d) == vars(want) and make(a).base is a and d.base is b)


GROUPS = {"plans": check_plans, "plans_inference_mode": check_plans_inference_mode, "low_rank_plans": check_low_rank_plans, "fp8_w8a8_plan": check_fp8_w8a8_plan, "scaled_mm_plan": check_scaled_mm_plan, "rotated_and_w4a8_plans": check_rotated_and_w4a8_plans, "block_dequant": check_block_dequant, "descriptor_copies": check_descriptor_copies, "plans_share_scratch": check_plans_share_scratch,
          "plans_keep_no_buffers": check_plans_keep_no_buffers}
