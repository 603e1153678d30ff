# ruff: noqa: B023  (the lambdas run inside the loop iteration that defines them)
"""Interpreter checks of an RMSNorm folded into the activation quantizer (``acts.RowNorm``,
``act_kernels.quantize_rows``): the block kernel, the two-launch int8 / fp8 linears, the one-launch kernels
(per-tile and row-block) and their eager plans.

Oracle: the codes are those of ``x * w`` in fp32 with its own per-row absmax (the norm's row factor cancels),
so they are compared bit for bit with the same arithmetic in torch (fp32 division rounds as ``div_rn``, ties
to even); the row scale is that absmax / qmax times ``rsqrt(mean(x²) + eps)`` (to 2e-6: the kernel's sum runs
in another order); dequantized, the codes stand for the float64 norm within half a code step. A linear with the
norm folded matches the same path fed the float64-normed x (rounded to fp32) to 1e-4, and reads ~1 off the
path without the norm (so a fold that does nothing fails). Plans replay their general path bit for bit.
"""

from __future__ import annotations

import torch
from triton_interp import interp_cast, record, record_refused, rel

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-6


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 8 + 0.1)
    x[0, min(7, k - 1)] = 40.0  # an outlier column in row 0
    return x.to(dtype)


def _weight(k: int, seed: int, dtype: torch.dtype = F32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, generator=g) * 1.5 + 0.25).to(dtype)


def _normed64(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    return y if w is None else y * w.double()


def _quant_ref(x: torch.Tensor, w: torch.Tensor | None, qmax: float, fp8: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, row scales) the folded quantizer must give: codes of ``x * w`` in fp32, scale times the norm's
    row factor."""
    xf = x.float()
    xw = xf if w is None else xf * w.float()
    amax = xw.abs().amax(-1, keepdim=True)
    sc = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = xw / sc
    codes = interp_cast(y.clamp(-qmax, qmax), torch.float8_e4m3fn) if fp8 else y.round().to(torch.int8)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return codes, sc * r


def check_norm_quantizer() -> None:
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    cases = [(3, 96, F32, None), (5, 300, F16, 128), (9, 1000, BF16, 256), (70, 640, F16, None),
             (4, 200, BF16, None)]
    for i, (m, k, dt, chunk) in enumerate(cases):
        x = _x(m, k, dt, seed=i)
        for weighted in (True, False):
            w = _weight(k, seed=10 + i) if weighted else None
            norm = RowNorm(w, EPS)
            for mode, fp8 in ((tq.MODE_INT8, False), (tq.MODE_FP8, True)):
                qdt, qmax = (torch.float8_e4m3fn, 448.0) if fp8 else (torch.int8, 127.0)
                q = torch.empty(m, k, dtype=qdt)
                s = torch.empty(m, 1)
                grid, args, key, warps = tq.block_launch(x, q, s, None, mode, qmax, 0, 0, rows=2 if m > 8 else 1,
                                                         chunk=chunk, norm=norm)
                tq._ACT_BLOCKS(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
                cr, sr = _quant_ref(x, w, qmax, fp8)
                codes_ok = torch.equal(q.float(), cr.float())
                scale_rel = ((s - sr).abs() / sr).max().item()
                # dequantized int8: the float64 norm within half a step (fp8 codes carry the interpreter's own
                # cast, the oracle's too; the GPU checks bound the fp8 error)
                err = 0.0 if fp8 else ((q.double() * s.double() - _normed64(x, w)).abs() / sr.double()).max().item()
                plain_q, _ = (tq.quantize_rows_fp8(x, qdt) if fp8 else tq.quantize_rows_int8(x))
                record("norm_block_quantizer", codes_ok and scale_rel < 2e-6 and err <= (0.5 + 1e-3),
                       codes_ok=codes_ok,
                       m=m, k=k, dtype=str(dt), chunk=chunk, weighted=weighted, fp8=fp8, scale_rel=scale_rel,
                       err_steps=err, differs_from_plain=not torch.equal(plain_q.float(), q.float()) or not weighted)
    # the public function takes the same norm; a rotation, a static scale or an input activation refuse it
    x = _x(6, 128, F16, seed=40)
    norm = RowNorm(_weight(128, seed=41), EPS)
    q, s = tq.quantize_rows_int8(x, norm=norm)
    cr, sr = _quant_ref(x, norm.weight, 127.0, False)
    record("norm_quantize_rows_int8", torch.equal(q, cr) and ((s - sr).abs() / sr).max().item() < 2e-6)
    for what, call in (("rotated_act", lambda: tq.quantize_rows_int8(x, 16, act=3, norm=norm)),
                       ("act", lambda: tq.quantize_rows_int8(x, act=3, norm=norm)),
                       ("static", lambda: tq.quantize_rows_fp8(x, static_scale=torch.tensor(0.1), norm=norm))):
        record_refused(f"norm_refused_{what}", call)


def check_column_scale() -> None:
    """``RowNorm(p, rms=False)`` (a SmoothQuant layer's ``x * pre_quant_scale``, ``NORM`` 3): the block kernel's
    codes and scales are those of ``x * p`` (no row factor), and the int8 / fp8 linears and the one-launch
    kernel on fp32 x give what they give fed ``x * p`` (fp32: the same products, bit for bit)."""
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    for i, (m, k, dt, chunk) in enumerate([(3, 96, F32, None), (5, 300, F16, 128), (70, 640, BF16, None)]):
        x = _x(m, k, dt, seed=50 + i)
        p = _weight(k, seed=60 + i)
        q, s = torch.empty(m, k, dtype=torch.int8), torch.empty(m, 1)
        grid, args, key, warps = tq.block_launch(x, q, s, None, tq.MODE_INT8, 127.0, 0, 0, rows=1, chunk=chunk,
                                                 norm=RowNorm(p, 0.0, rms=False))
        tq._ACT_BLOCKS(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
        xp = x.float() * p
        sc = xp.abs().amax(-1, keepdim=True) / 127.0
        record("column_scale_quantizer", torch.equal(q, (xp / sc).round().to(torch.int8)) and torch.equal(s, sc),
               m=m, k=k, dtype=str(dt), chunk=chunk)
    g = torch.Generator().manual_seed(21)
    w = torch.randint(-127, 128, (40, 256), dtype=torch.int8, generator=g)
    sw = torch.rand(40, generator=g) * 0.01 + 1e-3
    p = _weight(256, seed=22)
    for m in (5, 70):
        x = _x(m, 256, F32, seed=m)
        for name, path in linear_paths(w, sw, None, F32).items():
            y, want = path(x, norm=RowNorm(p, 0.0, rms=False)), path(x * p)
            record(f"column_scale_linear_{name}", torch.equal(y, want) and rel(path(x), want) > 0.05, m=m,
                   rel=rel(y, want))


def linear_paths(w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """The int8 two-launch, one-launch and fp8 linears on int8 codes ``w`` (fp8: the same values rescaled), each
    ``(x, **kw) -> y``."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    w8, s8 = (w.float() * (448 / 127)).to(torch.float8_e4m3fn), s * (127 / 448)
    return {"w8a8": lambda x, **kw: ti.int8_linear(x, w, s, bias, None, dtype, **kw),
            "fused": lambda x, **kw: ti.fused_linear(x, w, s, bias, dtype, **kw),
            "fp8_w8a8": lambda x, **kw: ti.fp8_linear(x, w8, s8, bias, None, dtype, **kw)}


def check_norm_linear() -> None:
    from comfyquant.runtime.kernels.acts import RowNorm

    g = torch.Generator().manual_seed(3)
    for m, k, n, dt in [(5, 256, 48, F32), (70, 128, 80, F16), (3, 640, 32, F16)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m + k)
        for weighted in (True, False):
            nw = _weight(k, seed=k, dtype=dt) if weighted else None
            norm = RowNorm(nw, EPS)
            xn = _normed64(x, nw).float()  # the norm in float64, handed over in fp32
            for name, path in linear_paths(w, s, bias, dt).items():
                y = path(x, norm=norm).float()
                ref = path(xn).float()
                without = rel(path(x).float(), ref)
                tol = 1e-4 if dt == F32 and name != "fp8_w8a8" else 3e-3
                record(f"norm_linear_{name}", rel(y, ref) < tol and without > 0.05, m=m, k=k, n=n, dtype=str(dt),
                       weighted=weighted, rel=rel(y, ref), without=without)
    x = _x(4, 128, F16, seed=9)
    w = torch.randint(-127, 128, (16, 128), dtype=torch.int8, generator=g)
    paths = linear_paths(w, torch.ones(16) * 1e-3, None, F16)
    lr = (torch.zeros(16, 128, dtype=F16), torch.zeros(16, 16, dtype=F16), 8)
    for what, call in (("act", lambda: paths["w8a8"](x, act=3, norm=RowNorm(None, EPS))),
                       ("kblock", lambda: paths["fused"](x, kblock=True, norm=RowNorm(None, EPS))),
                       ("low_rank", lambda: paths["w8a8"](x, low_rank=lr, norm=RowNorm(None, EPS)))):
        record_refused(f"norm_linear_refused_{what}", call)


def plan_pairs(w: torch.Tensor, s: torch.Tensor, dt: torch.dtype, norm: object) -> dict:
    """``name -> (general path, plan maker)`` of the int8 two-launch, one-launch and fp8 linears on int8 codes
    ``w`` (fp8: the same values rescaled) with ``norm`` folded, each ``x -> y`` / ``x -> plan or None``."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    w8, s8 = (w.float() * (448 / 127)).to(torch.float8_e4m3fn), s * (127 / 448)
    return {"int8": (lambda x: ti.int8_linear(x, w, s, None, None, dt, norm=norm),
                     lambda x: tp.plan_int8(x, w, s, None, None, dt, 0, None, norm)),
            "fused": (lambda x: ti.fused_linear(x, w, s, None, dt, norm=norm),
                      lambda x: tp.plan_fused(x, w, s, None, dt, 0, None, norm=norm)),
            "fp8": (lambda x: ti.fp8_linear(x, w8, s8, None, None, dt, norm=norm),
                    lambda x: tp.plan_fp8(x, w8, s8, None, dt, 0, None, None, norm))}


def check_norm_plans() -> None:
    from comfyquant.runtime.kernels.acts import RowNorm

    g = torch.Generator().manual_seed(8)
    for m, k, n, dt in [(5, 64, 96, F32), (70, 128, 80, F16)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        norm = RowNorm(_weight(k, seed=n, dtype=dt), EPS)
        xs = [_x(m, k, dt, seed=j) for j in range(3)]
        for name, (general, make) in plan_pairs(w, s, dt, norm).items():
            plan = make(xs[0])
            same = plan is not None and all(torch.equal(plan(x), general(x)) for x in xs[1:])
            # an in-place update of the norm's weight is seen (the plan holds the tensor, not a copy)
            if plan is not None:
                before = general(xs[1])
                norm.weight.mul_(2.0)  # doubles x*w: the codes stay, the row scale doubles
                same = same and torch.equal(plan(xs[1]), general(xs[1])) and not torch.equal(before, general(xs[1]))
                norm.weight.div_(2.0)
            record(f"norm_plan_{name}", same, m=m, k=k, n=n, dtype=str(dt), planned=plan is not None)


def _hadamard64(x: torch.Tensor, group: int) -> torch.Tensor:
    from comfyquant.quant.hadamard import hadamard_matrix

    h = hadamard_matrix(group, torch.float64)
    return (x.double().reshape(*x.shape[:-1], -1, group) @ h.T).reshape(x.shape)


def check_norm_rotated() -> None:
    """The rotating row kernel with a folded norm (convrot int8 layers: the W8A8 path's quantizer and the
    weight-only path's rotation pass). The rotation acts within the row, so ``H(x * w * r) = r * H(x * w)``: the
    codes are the same kernel's on ``x * w`` (fp32 products, the kernel's own: bit for bit) and the scale is
    that call's times ``rsqrt(mean(x²) + eps)`` (to 2e-6); dequantized, the float64 reference within half a code
    step (plus the rotation's fp32 sums). The rotation alone writes ``r * H(x * w)``: the same call's values on
    ``x * w`` times the torch factor, to 2e-6 before the output cast; one read for rows in registers, a first pass
    for the factor over chunked rows (K > 8,192)."""
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    cases = [(3, 96, F32, 16), (5, 320, F16, 64), (4, 512, BF16, 256), (2, 9216, F16, 256), (3, 8320, F32, 64)]
    for i, (m, k, dt, group) in enumerate(cases):
        x = _x(m, k, dt, seed=70 + i)
        for weighted in (True, False):
            w = _weight(k, seed=80 + i) if weighted else None
            norm = RowNorm(w, EPS)
            xw = x.float() if w is None else x.float() * w.float()
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
            q, sc = tq.quantize_rows_int8(x, group, norm=norm)
            q0, s0 = tq.quantize_rows_int8(xw, group, kernel="rows")
            scale_rel = ((sc - s0 * r).abs() / (s0 * r)).max().item()
            want = _hadamard64(_normed64(x, w), group)
            err = ((q.double() * sc.double() - want).abs() / sc.double()).max().item()
            record("norm_rotated_codes", torch.equal(q, q0) and scale_rel < 2e-6 and err <= 0.5 + 1e-3, m=m, k=k,
                   dtype=str(dt), rot=group, weighted=weighted, scale_rel=scale_rel, err_steps=err)
            y = tq.rotate_rows(x, group, norm=norm)
            y32 = tq.rotate_rows(x, group, norm=norm, out_dtype=F32)
            y0 = tq.rotate_rows(xw, group, kernel="rows") * r
            ok = rel(y32, y0) < 2e-6 and torch.equal(y, interp_cast(y32, dt)) and rel(y32, want) < 1e-5
            record("norm_rotated_float", ok, m=m, k=k, dtype=str(dt), rot=group, weighted=weighted,
                   rel=rel(y32, y0), rel64=rel(y32, want))
    x = _x(4, 128, F16, seed=90)
    norm = RowNorm(_weight(128, seed=91), EPS)
    record_refused("norm_rotated_refused_act", lambda: tq.rotate_rows(x, 16, act=1, norm=norm))


def check_norm_rotated_linear() -> None:
    """Rotated int8 linears with a folded norm: the two-launch W8A8 path and the weight-only path (its rotation
    pass) against the same paths fed the float64-normed x, ~1 off without the norm; their plans replay the general
    path bit for bit and see an in-place weight update; int4_rot's three paths (W4A8, unpacked onto W8A8,
    weight-only on the packed bytes) and their plans the same way; the unrotated weight-only path refuses a norm
    (it has no pass to fold it into). The weight-only kernel on fp16 x only: bf16 (and fp32 x, which it reads as bf16) hit
    an interpreter limitation (``check_w8a16``); the GPU checks run those."""
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp
    from comfyquant.runtime.kernels.acts import RowNorm

    g = torch.Generator().manual_seed(31)
    for m, k, n, dt, group in [(5, 256, 48, F32, 16), (3, 512, 40, BF16, 256), (70, 192, 32, F16, 64),
                               (4, 512, 40, F16, 256)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m * k)
        nw = _weight(k, seed=k + 1, dtype=dt)
        norm = RowNorm(nw, EPS)
        xn = _normed64(x, nw).float()
        paths = {"w8a8": lambda x, **kw: ti.int8_linear(x, w, s, bias, group, dt, **kw)}
        if dt == F16:
            paths["w8a16"] = lambda x, **kw: ti.w8a16_linear(x, w, s, bias, group, dt, **kw)
        for name, path in paths.items():
            y, ref = path(x, norm=norm).float(), path(xn if name == "w8a8" else xn.to(dt)).float()
            without = rel(path(x).float(), ref)
            record(f"norm_rotated_linear_{name}", rel(y, ref) < 3e-3 and without > 0.05, m=m, k=k, n=n,
                   dtype=str(dt), rot=group, rel=rel(y, ref), without=without)
        if dt == F32:
            continue  # the plans take 16-bit x (fp32 x runs the general path)
        xs = [_x(m, k, dt, seed=j) for j in range(3)]
        plans = {"w8a8": (paths["w8a8"], tp.plan_int8(xs[0], w, s, bias, group, dt, 0, None, norm))}
        if "w8a16" in paths:
            plans["w8a16"] = (paths["w8a16"], builtin._plan_w8a16(xs[0], w, (s,), bias, (group,), dt, 0, norm=norm))
        for name, (general, plan) in plans.items():
            same = plan is not None and all(torch.equal(plan(x), general(x, norm=norm)) for x in xs[1:])
            if plan is not None:
                before = general(xs[1], norm=norm)
                nw.mul_(2.0)
                same = same and torch.equal(plan(xs[1]), general(xs[1], norm=norm)) and not torch.equal(
                    before, general(xs[1], norm=norm))
                nw.div_(2.0)
            record(f"norm_rotated_plan_{name}", same, m=m, k=k, n=n, dtype=str(dt), planned=plan is not None)
    # int4_rot's three paths (W4A8 with K permuted per block, int4 unpacked onto the W8A8 path, weight-only on
    # the packed bytes): the same rotating quantizer or rotation pass with the norm
    from triton_interp_fusions import _int4_rot

    from comfyquant.runtime.kernels import triton_unpack as tu

    for m, k, n, dt in [(5, 256, 48, F16), (70, 512, 32, F32)]:
        w4, s4, g4 = _int4_rot(n, k, seed=m + n)
        x = _x(m, k, dt, seed=m + k)
        nw = _weight(k, seed=k + 2, dtype=dt)
        norm = RowNorm(nw, EPS)
        xn = _normed64(x, nw).float()
        paths = {"w4a8": lambda x, **kw: ti.w4a8_linear(x, w4, s4, None, g4, dt, **kw),
                 "w4_unpacked": lambda x, **kw: tu.w4_unpacked_linear(x, w4, s4, None, g4, dt, **kw)}
        if dt == F16:
            paths["w4a16"] = lambda x, **kw: ti.w8a16_linear(x, w4, s4, None, g4, dt, packed=True, **kw)
        for name, path in paths.items():
            y, ref = path(x, norm=norm).float(), path(xn if name != "w4a16" else xn.to(dt)).float()
            without = rel(path(x).float(), ref)
            record(f"norm_rotated_linear_{name}", rel(y, ref) < 3e-3 and without > 0.05, m=m, k=k, n=n,
                   dtype=str(dt), rot=g4, rel=rel(y, ref), without=without)
        if dt != F16:
            continue
        xs = [_x(m, k, dt, seed=200 + j) for j in range(3)]
        plans = {"w4a8": tp.plan_w4a8(xs[0], w4, s4, None, g4, dt, 0, None, norm),
                 "w4_unpacked": tu.plan_w4_unpacked(xs[0], w4, s4, None, g4, dt, 0, None, norm),
                 "w4a16": builtin._plan_int4_w4a16(xs[0], w4, (s4,), None, (g4,), dt, 0, norm=norm)}
        for name, plan in plans.items():
            same = plan is not None and all(torch.equal(plan(x), paths[name](x, norm=norm)) for x in xs[1:])
            record(f"norm_rotated_plan_{name}", same, m=m, k=k, n=n, dtype=str(dt), planned=plan is not None)
    w = torch.randint(-127, 128, (16, 128), dtype=torch.int8, generator=g)
    x = _x(4, 128, F16, seed=92)
    record_refused("norm_w8a16_unrotated_refused",
                   lambda: ti.w8a16_linear(x, w, torch.ones(16) * 1e-3, None, None, F16, norm=RowNorm(None, EPS)))


GROUPS = {"norm_quantizer": check_norm_quantizer, "norm_linear": check_norm_linear, "norm_plans": check_norm_plans,
          "column_scale": check_column_scale, "norm_rotated": check_norm_rotated,
          "norm_rotated_linear": check_norm_rotated_linear}
