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
    # rows past the limit a quantizer holds in registers, a rotation, a static scale, an input activation: refused
    wide = _x(2, 8200, F16, seed=42)
    for what, call in (("rotated", lambda: tq.quantize_rows_int8(x, 16, norm=norm)),
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


GROUPS = {"modulated_quantizer": check_modulated_quantizer, "modulated_linear": check_modulated_linear,
          "modulated_plans": check_modulated_plans}
