# ruff: noqa: B023  (the lambdas run inside the loop iteration that defines them)
"""Interpreter checks of a modulated LayerNorm folded into the activation quantizer (``acts.ModulatedNorm``,
``act_kernels.layer_mod``): the block kernel, the two-launch int8 / fp8 linears, the row-block one-launch
kernel and their eager plans.

Oracle: ``layer_norm(x) * (1 + scale[g]) + shift[g]`` in float64, ``g`` each row's group. The kernel sums in its
own order, so codes may sit one step off the float64 ones at a tie: dequantized, they must stand for the float64
rows within half a code step (plus 1e-3), and the row scales be the float64 absmax / qmax to 1e-5. A linear with
the norm folded matches the same path fed the float64 rows (rounded to fp32) to 1e-4 and reads ~1 off the path
fed x itself (a fold that does nothing fails). Plans replay their general path bit for bit and read the
modulation buffer per call (a refill is seen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton_interp import interp_cast, record, record_refused, rel
from triton_interp_norm import linear_paths, plan_pairs

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-6


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 8 + 0.1) + torch.randn(m, 1, generator=g)
    x[0, min(7, k - 1)] = 40.0  # an outlier column in row 0
    return x.to(dtype)


def _mod(groups: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``[G, 2K]``: each group's shift, then its scale (as ``runtime.modulation.ModulationSite`` fills it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat((torch.randn(groups, k, generator=g) * 0.5, torch.randn(groups, k, generator=g) * 0.3),
                     dim=-1).to(dtype)


def _normed64(x: torch.Tensor, mod: torch.Tensor, rows: int) -> torch.Tensor:
    k = x.shape[-1]
    x64 = x.double().reshape(-1, rows, k)
    mean = x64.mean(-1, keepdim=True)
    var = (x64 - mean).pow(2).mean(-1, keepdim=True)
    m64 = mod.double()[:, None, :]
    y = (x64 - mean) * torch.rsqrt(var + EPS) * (1 + m64[..., k:]) + m64[..., :k]
    return y.reshape(x.shape)


def check_modulated_quantizer() -> None:
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import ModulatedNorm

    # (m, k, dtype, rows per group, rows per program, chunk the block config would take)
    cases = [(6, 96, F32, 3, 1, None), (8, 300, F16, 4, 2, 128), (10, 1000, BF16, 5, 1, 256), (4, 200, BF16, 4, 4, None)]
    for i, (m, k, dt, gr, rows, chunk) in enumerate(cases):
        x = _x(m, k, dt, seed=i)
        mod = _mod(m // gr, k, seed=20 + i, dtype=dt)
        norm = ModulatedNorm(mod, EPS, gr)
        y64 = _normed64(x, mod, gr)
        amax = y64.abs().amax(-1, keepdim=True)
        for mode, fp8 in ((tq.MODE_INT8, False), (tq.MODE_FP8, True)):
            qdt, qmax = (torch.float8_e4m3fn, 448.0) if fp8 else (torch.int8, 127.0)
            q, s = torch.empty(m, k, dtype=qdt), torch.empty(m, 1)
            grid, args, key, warps = tq.block_launch(x, q, s, None, mode, qmax, 0, 0, rows=rows, chunk=chunk,
                                                     norm=norm)
            tq._ACT_BLOCKS(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
            sr = amax / qmax
            scale_rel = ((s.double() - sr).abs() / sr).max().item()
            # int8: within half a step of the float64 rows; fp8 codes carry the interpreter's own cast
            # (``interp_cast``), so they are compared with that cast of the float64 rows over the kernel's scale:
            # equal but for ties the kernel's sums put on the other side (<= 1%)
            steps = ((q.double() * s.double() - y64).abs() / sr).max().item()
            if fp8:
                ref = interp_cast((y64 / s.double()).float().clamp(-qmax, qmax), qdt)
                off = (q.float() != ref.float()).float().mean().item()
                ok = scale_rel < 1e-5 and off <= 0.01
            else:
                off = 0.0
                ok = scale_rel < 1e-5 and steps <= 0.5 + 1e-3
            record("modulated_block_quantizer", ok, m=m, k=k, dtype=str(dt), rows_per_group=gr, fp8=fp8,
                   scale_rel=scale_rel, err_steps=steps, codes_off=off)
    x = _x(6, 128, F16, seed=40)
    norm = ModulatedNorm(_mod(2, 128, seed=41, dtype=F16), EPS, 3)
    q, s = tq.quantize_rows_int8(x, norm=norm)
    y64 = _normed64(x, norm.mod, 3)
    record("modulated_quantize_rows_int8",
           ((q.double() * s.double() - y64).abs() / s.double()).max().item() <= 0.5 + 1e-3)
    # rows past the limit a quantizer holds in registers, a static scale, an input activation: refused
    wide = _x(2, 8200, F16, seed=42)
    for what, call in (("rotated_wide", lambda: tq.quantize_rows_int8(wide, 64, norm=ModulatedNorm(
                            _mod(1, 8200, 44, F16), EPS, 2))),
                       ("act", lambda: tq.quantize_rows_int8(x, act=3, norm=norm)),
                       ("static", lambda: tq.quantize_rows_fp8(x, static_scale=torch.tensor(0.1), norm=norm)),
                       ("wide", lambda: tq.quantize_rows_int8(wide, norm=ModulatedNorm(_mod(1, 8200, 43, F16), EPS,
                                                                                        2)))):
        record_refused(f"modulated_refused_{what}", call)


def check_modulated_linear() -> None:
    from comfyquant.runtime.kernels.acts import ModulatedNorm

    g = torch.Generator().manual_seed(3)
    for m, k, n, dt, gr in [(64, 256, 48, F32, 32), (128, 128, 80, F16, 64), (64, 192, 32, BF16, 64)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m + k)
        mod = _mod(m // gr, k, seed=k, dtype=dt)
        norm = ModulatedNorm(mod, EPS, gr)
        xn = _normed64(x, mod, gr).float()
        for name, path in linear_paths(w, s, bias, dt).items():
            y = path(x, norm=norm).float()
            ref = path(xn).float()
            without = rel(path(x).float(), ref)
            record(f"modulated_linear_{name}", rel(y, ref) < 1e-4 and without > 0.3, m=m, k=k, n=n, dtype=str(dt),
                   rel=rel(y, ref), without=without)
    # a layer wider than the row block's quantizing programs (``rows_shape``'s wide: Flux qkv's width), 40 column
    # tiles of 16 on 32 quantizing programs: the two-launch path's output bit for bit
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import TileConfig

    m, k, n, gr = 128, 128, 640, 64
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    x = _x(m, k, BF16, seed=11)
    norm = ModulatedNorm(_mod(m // gr, k, seed=12, dtype=BF16), EPS, gr)
    y = ti.fused_linear(x, w, s, None, BF16, cfg=TileConfig(64, 16, 32, 4, 1), norm=norm, wide=True)
    record("modulated_linear_fused_wide", torch.equal(y, ti.int8_linear(x, w, s, None, None, BF16, norm=norm)), m=m,
           k=k, n=n)
    # the one-launch path's per-tile kernel (under 64 rows) has no modulated norm: refused, not ignored
    w = torch.randint(-127, 128, (16, 128), dtype=torch.int8, generator=g)
    x = _x(8, 128, F16, seed=9)
    paths = linear_paths(w, torch.ones(16) * 1e-3, None, F16)
    norm = ModulatedNorm(_mod(2, 128, 5, F16), EPS, 4)
    for what, call in (("per_tile", lambda: paths["fused"](x, norm=norm)),
                       ("act", lambda: paths["w8a8"](x, act=3, norm=norm))):
        record_refused(f"modulated_linear_refused_{what}", call)


def check_modulated_plans() -> None:
    from comfyquant.runtime.kernels.acts import ModulatedNorm

    g = torch.Generator().manual_seed(8)
    m, k, n, dt, gr = 64, 128, 80, F16, 32
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    buf = _mod(m // gr, k, seed=1, dtype=dt)
    norm = ModulatedNorm(buf, EPS, gr)
    xs = [_x(m, k, dt, seed=j) for j in range(3)]
    for name, (general, make) in plan_pairs(w, s, dt, norm).items():  # "fused": the row-block kernel at 64 rows
        plan = make(xs[0])
        same = plan is not None and all(torch.equal(plan(x), general(x)) for x in xs[1:])
        if plan is not None:  # the next step's modulation, written into the same buffer, is what the plan reads
            before = general(xs[1])
            saved = buf.clone()
            buf.copy_(_mod(m // gr, k, seed=2, dtype=dt))
            same = same and torch.equal(plan(xs[1]), general(xs[1])) and not torch.equal(before, general(xs[1]))
            buf.copy_(saved)
        record(f"modulated_plan_{name}", same, planned=plan is not None)


def check_modulated_rotated() -> None:
    """Rotated layers (int8 convrot, int4_rot) with a modulated norm: the rotating row kernel holds the row, normalizes
    and modulates it, then rotates. Codes within half a step of the float64 rotation of the float64 rows (plus the
    rotation's fp32 sums), scales to 1e-5; the rotation alone (the weight-only paths' pass) within 1e-5 of it in
    fp32 and its cast in x's dtype; every rotated linear (int8 W8A8, int8 weight-only, int4 W4A8 / unpacked /
    weight-only) against the same path fed the float64 rows to 3e-3 and ~1 off without the norm; their plans
    replay the general path bit for bit and read the refilled buffer. Weight-only kernels on fp16 x only (the
    interpreter's bf16 limitation, ``check_w8a16``)."""
    from triton_interp_fusions import _int4_rot
    from triton_interp_norm import _hadamard64

    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels import triton_unpack as tu
    from comfyquant.runtime.kernels.acts import ModulatedNorm

    for i, (m, k, dt, gr, group) in enumerate([(6, 96, F32, 3, 16), (8, 320, F16, 4, 64), (4, 512, BF16, 2, 256)]):
        x = _x(m, k, dt, seed=60 + i)
        mod = _mod(m // gr, k, seed=70 + i, dtype=dt)
        norm = ModulatedNorm(mod, EPS, gr)
        want = _hadamard64(_normed64(x, mod, gr), group)
        q, sc = tq.quantize_rows_int8(x, group, norm=norm)
        sr = want.abs().amax(-1, keepdim=True) / 127
        steps = ((q.double() * sc.double() - want).abs() / sr).max().item()
        scale_rel = ((sc.double() - sr).abs() / sr).max().item()
        record("modulated_rotated_codes", steps <= 0.5 + 1e-3 and scale_rel < 1e-5, m=m, k=k, dtype=str(dt),
               rot=group, err_steps=steps, scale_rel=scale_rel)
        y32 = tq.rotate_rows(x, group, norm=norm, out_dtype=F32)
        y = tq.rotate_rows(x, group, norm=norm)
        record("modulated_rotated_float", rel(y32, want) < 1e-5 and torch.equal(y, interp_cast(y32, dt)), m=m, k=k,
               dtype=str(dt), rot=group, rel64=rel(y32, want))
    g = torch.Generator().manual_seed(41)
    for m, k, n, dt, gr, group in [(6, 256, 48, F32, 3, 16), (8, 512, 40, F16, 4, 256), (64, 192, 32, F16, 32, 64)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m * k)
        buf = _mod(m // gr, k, seed=k, dtype=dt)
        norm = ModulatedNorm(buf, EPS, gr)
        xn = _normed64(x, buf, gr).float()
        paths = {"w8a8": lambda x, **kw: ti.int8_linear(x, w, s, bias, group, dt, **kw)}
        w4, s4, g4 = _int4_rot(n, k, seed=m + n)
        paths["w4a8"] = lambda x, **kw: ti.w4a8_linear(x, w4, s4, None, g4, dt, **kw)
        paths["w4_unpacked"] = lambda x, **kw: tu.w4_unpacked_linear(x, w4, s4, None, g4, dt, **kw)
        if dt == F16:
            paths["w8a16"] = lambda x, **kw: ti.w8a16_linear(x, w, s, bias, group, dt, **kw)
            paths["w4a16"] = lambda x, **kw: ti.w8a16_linear(x, w4, s4, None, g4, dt, packed=True, **kw)
        for name, path in paths.items():
            fed = xn.to(dt) if name in ("w8a16", "w4a16") else xn
            y, ref = path(x, norm=norm).float(), path(fed).float()
            without = rel(path(x).float(), ref)
            record(f"modulated_rotated_linear_{name}", rel(y, ref) < 3e-3 and without > 0.3, m=m, k=k, n=n,
                   dtype=str(dt), rel=rel(y, ref), without=without)
        if dt != F16:
            continue  # the plans take 16-bit x
        xs = [_x(m, k, dt, seed=300 + j) for j in range(3)]
        plans = {"w8a8": tp.plan_int8(xs[0], w, s, bias, group, dt, 0, None, norm),
                 "w8a16": builtin._plan_w8a16(xs[0], w, (s,), bias, (group,), dt, 0, norm=norm),
                 "w4a8": tp.plan_w4a8(xs[0], w4, s4, None, g4, dt, 0, None, norm),
                 "w4_unpacked": tu.plan_w4_unpacked(xs[0], w4, s4, None, g4, dt, 0, None, norm),
                 "w4a16": builtin._plan_int4_w4a16(xs[0], w4, (s4,), None, (g4,), dt, 0, norm=norm)}
        for name, plan in plans.items():
            general = paths[name]
            same = plan is not None and all(torch.equal(plan(x), general(x, norm=norm)) for x in xs[1:])
            if plan is not None:
                before = general(xs[1], norm=norm)
                saved = buf.clone()
                buf.copy_(_mod(m // gr, k, seed=k + 1, dtype=dt))
                same = same and torch.equal(plan(xs[1]), general(xs[1], norm=norm)) and not torch.equal(
                    before, general(xs[1], norm=norm))
                buf.copy_(saved)
            record(f"modulated_rotated_plan_{name}", same, m=m, k=k, n=n, planned=plan is not None)


def _layer_norm64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    return (x64 - mean) * torch.rsqrt((x64 - mean).pow(2).mean(-1, keepdim=True) + eps) * w.double() + b.double()


def _affine(k: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias as trained ones look: weights spread around 1 (a few small), biases small."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g) * 1.5 + 0.05
    w[: max(1, k // 16)] *= 0.02  # small weights: ``weight - 1`` rounded in 16 bits would lose them
    return w.to(dtype), (torch.randn(k, generator=g) * 0.2).to(dtype)


def _quantizer_checks(name: str, x: torch.Tensor, norm: object, y64: torch.Tensor, rows: int, **fields: object) -> None:
    """``{name}_block_quantizer``: the block kernel's int8 / fp8 codes of ``x`` with ``norm`` (``rows`` rows a
    program) within half a step of the float64 normed rows ``y64`` (fp8: the interpreter's cast of them, ties
    apart), scales to 1e-5; ``{name}_rotated_codes``: the rotating quantizer's int8 codes against the float64
    rotation of ``y64``, half a step."""
    from triton_interp_norm import _hadamard64

    from comfyquant.runtime.kernels import triton_quant as tq

    m, k = x.shape
    amax = y64.abs().amax(-1, keepdim=True)
    for mode, fp8 in ((tq.MODE_INT8, False), (tq.MODE_FP8, True)):
        qdt, qmax = (torch.float8_e4m3fn, 448.0) if fp8 else (torch.int8, 127.0)
        q, sc = torch.empty(m, k, dtype=qdt), torch.empty(m, 1)
        grid, args, key, warps = tq.block_launch(x, q, sc, None, mode, qmax, 0, 0, rows=rows, chunk=None, norm=norm)
        tq._ACT_BLOCKS(grid, args, x.device, num_warps=warps, num_stages=1, key=key)
        sr = amax / qmax
        scale_rel = ((sc.double() - sr).abs() / sr).max().item()
        if fp8:
            ref = interp_cast((y64 / sc.double()).float().clamp(-qmax, qmax), qdt)
            off = (q.float() != ref.float()).float().mean().item()
            ok = scale_rel < 1e-5 and off <= 0.01
        else:
            off = ((q.double() * sc.double() - y64).abs() / sr).max().item()
            ok = scale_rel < 1e-5 and off <= 0.5 + 1e-3
        record(f"{name}_block_quantizer", ok, **fields, fp8=fp8, scale_rel=scale_rel, off=off)
    group = 16 if k % 16 == 0 else 4
    want = _hadamard64(y64, group)
    q, sc = tq.quantize_rows_int8(x, group, norm=norm)
    sr = want.abs().amax(-1, keepdim=True) / 127
    steps = ((q.double() * sc.double() - want).abs() / sr).max().item()
    record(f"{name}_rotated_codes", steps <= 0.5 + 1e-3, **fields, rot=group, err_steps=steps)


def check_shared_layer_norm() -> None:
    """An affine LayerNorm (CLIP's, SDXL's) as one shared modulation row (``acts.shared_layer_norm``: rows 0, fp32
    ``[bias, weight - 1]``): the block quantizer's codes within half a step of the float64 ``layer_norm(x, w, b)``
    (fp8: the interpreter's cast of it, ties apart), scales to 1e-5; every int8 / fp8 linear path, the row-block
    one-launch kernel at 64 rows and the rotating row kernel against the same path fed the float64 rows; the
    eager plans replay their general path bit for bit."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.acts import norm_fits, rms_norm, shared_layer_norm

    for i, (m, k, dt) in enumerate([(6, 96, F32), (9, 300, F16), (5, 1000, BF16)]):
        x = _x(m, k, dt, seed=80 + i)
        w, b = _affine(k, seed=90 + i, dtype=dt)
        norm = shared_layer_norm(w, b, k, EPS)
        y64 = _layer_norm64(x, w, b, EPS)
        # the module's own call: 16-bit weights come back exactly from 1 + (weight - 1) in fp32, fp32 ones within
        # that subtraction's rounding
        module = F.layer_norm(x, (k,), w, b, EPS)
        same = torch.equal(rms_norm(x, norm), module) if dt != F32 else rel(rms_norm(x, norm), module) < 1e-6
        record("shared_norm_torch_path", norm_fits(norm, x) and same and rel(module.float(), y64.float()) < 1e-2,
               m=m, k=k, dtype=str(dt))
        _quantizer_checks("shared_norm", x, norm, y64, 1, m=m, k=k, dtype=str(dt))
    g = torch.Generator().manual_seed(12)
    for m, k, n, dt in [(64, 256, 48, F32), (70, 128, 80, F16), (64, 192, 32, BF16)]:
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m + k + 5)
        w, b = _affine(k, seed=k, dtype=dt)
        norm = shared_layer_norm(w, b, k, EPS)
        xn = _layer_norm64(x, w, b, EPS).float()
        paths = dict(linear_paths(wq, s, bias, dt))
        paths["w8a8_rot"] = lambda x, **kw: ti.int8_linear(x, wq, s, bias, 64, dt, **kw)
        for name, path in paths.items():
            if name == "fused" and m < 64:
                continue  # the per-tile kernel under 64 rows folds no LayerNorm (refused: check_modulated_linear)
            y, ref = path(x, norm=norm).float(), path(xn).float()
            without = rel(path(x).float(), ref)
            tol = 3e-3 if name == "w8a8_rot" else 5e-4  # (codes at a tie may round the other way: ~2e-4 in bf16)
            record(f"shared_norm_linear_{name}", rel(y, ref) < tol and without > 0.3, m=m, k=k, n=n, dtype=str(dt),
                   rel=rel(y, ref), without=without)
        if dt != F16:
            continue
        xs = [_x(m, k, dt, seed=500 + j) for j in range(3)]
        for name, (general, make) in plan_pairs(wq, s, dt, norm).items():
            plan = make(xs[0])
            record(f"shared_norm_plan_{name}", plan is not None and all(torch.equal(plan(x), general(x))
                                                                        for x in xs[1:]), m=m, k=k)


def _rms_normed64(x: torch.Tensor, mod: torch.Tensor, rows: int) -> torch.Tensor:
    k = x.shape[-1]
    x64 = x.double().reshape(-1, rows, k)
    m64 = mod.double()[:, None, :]
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * (1 + m64[..., k:]) + m64[..., :k]
    return y.reshape(x.shape)


def check_modulated_rms() -> None:
    """A modulated RMSNorm (``ModulatedNorm(rms=True)``, ``NORM`` 5: Z-Image's ``rms_norm(x) * w * (1 + scale)``
    as a scale of ``w * (1 + scale) - 1`` in an fp32 buffer, no shift; 16-bit buffers with a shift too, LTX-Video's
    ``rms_norm(x) * (1 + scale) + shift``): the block
    quantizer's codes within half a step of the float64 rows (fp8: the interpreter's cast, ties apart), scales to
    1e-5; the torch path (``acts.rms_norm``) within its rounding of them; every int8 / fp8 linear path, the
    row-block kernel at 64 rows and the rotating row kernel against the same path fed the float64 rows, ~1 off
    without the norm; the eager plans replay their general path bit for bit and read the refilled buffer."""

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.acts import ModulatedNorm, norm_code, rms_norm

    def zimage(groups: int, k: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        w, scale = torch.rand(k, generator=g) * 1.5 + 0.05, torch.randn(groups, k, generator=g) * 0.3
        return torch.cat((torch.zeros(groups, k), w * (1 + scale) - 1), dim=-1)  # fp32, no shift

    for i, (m, k, dt, gr, mod_dt) in enumerate([(6, 96, F32, 3, F32), (8, 300, F16, 4, F32), (10, 1000, BF16, 5, F32),
                                                 (6, 256, BF16, 2, BF16)]):
        x = _x(m, k, dt, seed=100 + i)
        mod = zimage(m // gr, k, seed=110 + i) if mod_dt == F32 else _mod(m // gr, k, seed=110 + i, dtype=mod_dt)
        norm = ModulatedNorm(mod, EPS, gr, rms=True)
        y64 = _rms_normed64(x, mod, gr)
        torch_path = rel(rms_norm(x, norm).double(), y64)
        record("modulated_rms_torch_path", norm_code(norm) == 5 and torch_path < (1e-6 if dt == F32 else 1e-2),
               m=m, k=k, dtype=str(dt), rel=torch_path)
        _quantizer_checks("modulated_rms", x, norm, y64, 2, m=m, k=k, dtype=str(dt))
    g = torch.Generator().manual_seed(14)
    # (the last: LTX-Video's, a shift and scale per item in the model's bf16, no weight)
    for m, k, n, dt, gr, mod_dt in [(64, 256, 48, F32, 32, F32), (128, 128, 80, F16, 64, F32),
                                    (64, 192, 32, BF16, 16, F32), (64, 160, 48, BF16, 32, BF16)]:
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias = torch.randn(n, generator=g)
        x = _x(m, k, dt, seed=m + k + 7)
        buf = zimage(m // gr, k, seed=k + 3) if mod_dt == F32 else _mod(m // gr, k, seed=k + 3, dtype=mod_dt)
        norm = ModulatedNorm(buf, EPS, gr, rms=True)
        xn = _rms_normed64(x, buf, gr).float()
        paths = dict(linear_paths(wq, s, bias, dt))
        paths["w8a8_rot"] = lambda x, **kw: ti.int8_linear(x, wq, s, bias, 64, dt, **kw)
        for name, path in paths.items():
            y, ref = path(x, norm=norm).float(), path(xn).float()
            without = rel(path(x).float(), ref)
            tol = 3e-3 if name == "w8a8_rot" else 5e-4
            record(f"modulated_rms_linear_{name}", rel(y, ref) < tol and without > 0.3, m=m, k=k, n=n, dtype=str(dt),
                   rel=rel(y, ref), without=without)
        if dt != F16:
            continue
        xs = [_x(m, k, dt, seed=700 + j) for j in range(3)]
        for name, (general, make) in plan_pairs(wq, s, dt, norm).items():
            plan = make(xs[0])
            same = plan is not None and all(torch.equal(plan(x), general(x)) for x in xs[1:])
            if plan is not None:  # the next step's modulation, written into the same buffer
                before = general(xs[1])
                saved = buf.clone()
                buf.copy_(zimage(m // gr, k, seed=k + 4))
                same = same and torch.equal(plan(xs[1]), general(xs[1])) and not torch.equal(before, general(xs[1]))
                buf.copy_(saved)
            record(f"modulated_rms_plan_{name}", same, m=m, k=k, planned=plan is not None)


GROUPS = {"modulated_quantizer": check_modulated_quantizer, "modulated_linear": check_modulated_linear,
          "modulated_plans": check_modulated_plans, "modulated_rotated": check_modulated_rotated,
          "shared_layer_norm": check_shared_layer_norm, "modulated_rms": check_modulated_rms}
