"""Interpreter checks of the FP8 W8A8 Triton path (``triton_int8.fp8_linear``: the fp8 activation quantizer,
then the W8A8 GEMM kernels on fp8 operands with an fp32 accumulator), see ``triton_interp``.

Triton 3.6's interpreter runs fp8 loads (masked too), fp8 x fp8 ``tl.dot`` into fp32 and fp8 TMA descriptor
loads exactly (products of fp8 values are exact in fp32; ``check_fp8_dot_exact`` keeps that true), so:
* oracle: the float64 product of the kernel's own activation codes and scales (``quantize_rows_fp8``, checked
  against the reference in ``check_fp8_quant``) with W's dequantized values, + bias: fp32 out to 1e-6, fp16 to
  2^-10, bf16 (the interpreter truncates) to 2^-7; and the float64 unquantized product within fp8's own error;
* each check also records what it would read with the thing it checks left out (row vs tensor weight scale,
  static vs dynamic activation scale, bias), which must exceed the bound.
Not covered here (GPU only, ``benchmarks/check_kernels_gpu.py``): the GPU's fp32 -> fp8 rounding of the codes
(the interpreter's differs, ``check_interpreter_limitations``), wgmma's reduced-precision fp8 sums (the kernel
promotes them every BLOCK_K: ``max_num_imprecise_acc``, ignored by the interpreter), and the compiled launch
cache (``check_fp8_launch_keys`` checks the keys it would use).
"""

from __future__ import annotations

import torch
from triton_interp import record, record_refused, rel

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BOUND = {F32: 1e-6, F16: 2 ** -10, BF16: 2 ** -7}


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 4 + 0.25)
    x[0, min(7, k - 1)] = 30.0  # an outlier: the row's dynamic scale follows it, a static scale saturates it
    return x.to(dtype)


def fp8_weight(n: int, k: int, seed: int, scale: str, dtype: torch.dtype = E4M3
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w float, q fp8 [n, k], scale: scalar or per row [n, 1] with rows of different magnitudes)."""
    from comfyquant.quant.fp8 import quantize_fp8

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.03
    if scale == "tensor":
        q, s = quantize_fp8(w, dtype)
        return w, q, s
    w = w * (torch.rand(n, 1, generator=g) * 8 + 0.1)  # rows differ: a tensor scale would be far off
    amax = w.abs().amax(dim=1, keepdim=True)
    s = (amax / torch.finfo(dtype).max).float()
    return w, (w / s).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), s


_CASES = (  # (m, k, n, x dtype, out dtype, bias, weight scale, static input scale, weight dtype)
    (1, 64, 48, BF16, BF16, True, "row", False, E4M3), (5, 96, 70, F16, F16, False, "tensor", False, E4M3),
    (70, 256, 96, F32, F32, True, "row", False, E4M3), (5, 100, 70, BF16, F32, True, "tensor", True, E4M3),
    (70, 160, 33, F32, F32, True, "row", True, E4M3), (17, 200, 48, F16, F32, True, "row", False, E5M2),
    (3, 96, 40, F32, F32, False, "tensor", True, E5M2),
)


def check_fp8_w8a8() -> None:
    from comfyquant.runtime.kernels import triton_int8, triton_quant
    from comfyquant.runtime.kernels.configs import TileConfig

    cfgs = (None, TileConfig(16, 32, 32, 4, 1, group_m=4), TileConfig(32, 64, 64, 4, 2, group_m=8))
    for i, (m, k, n, dt, odt, has_b, sk, static, wdt) in enumerate(_CASES):
        x = _x(m, k, dt, seed=1100 + i)
        w, q, s = fp8_weight(n, k, 1110 + i, sk, wdt)
        b = torch.randn(n, generator=torch.Generator().manual_seed(1120 + i)).to(BF16) if has_b else None
        isc = torch.tensor(2.0 / torch.finfo(wdt).max) if static else None  # saturates the outlier (30)
        qx, sx = triton_quant.quantize_rows_fp8(x, wdt, isc)
        bias64 = 0 if b is None else b.double()
        w_deq = q.double() * s.double().reshape(-1, 1) if s.numel() > 1 else q.double() * s.double()
        ref = (qx.double() * sx.double()) @ w_deq.t() + bias64
        # the same computation with what each option changes left out: a failing epilogue must read as large
        without = {"row_scale": (qx.double() * sx.double()) @ (q.double() * s.double().mean()).t() + bias64,
                   "bias": ref - bias64}
        if static:
            qd, sd = triton_quant.quantize_rows_fp8(x, wdt)
            without["static_scale"] = (qd.double() * sd.double()) @ w_deq.t() + bias64
        without = {k_: rel(v, ref) for k_, v in without.items() if (k_ != "row_scale" or sk == "row")
                   and (k_ != "bias" or has_b)}
        info = {"m": m, "k": k, "n": n, "x": str(dt), "out": str(odt), "bias": has_b, "scale": sk, "static": static,
                "weight": str(wdt)}
        bound = BOUND[odt]
        for cfg in cfgs:
            y = triton_int8.fp8_linear(x, q, s, b, isc, odt, cfg=cfg)
            e = rel(y, ref)
            record("fp8_w8a8_linear", y.dtype == odt and e <= bound and all(v > bound for v in without.values()),
                   rel=e, bound=bound, rel_without=without, cfg=str(cfg), **info)
            if k % 16 == 0 and cfg is not None:  # the Hopper TMA kernel (host TensorDescriptors) on the same codes
                y3 = triton_int8.gemm_w8a8(qx, sx, q, s, b, odt, cfg=cfg, tma=True)
                e3 = rel(y3, ref)
                record("fp8_w8a8_tma_linear", y3.dtype == odt and e3 <= bound, rel=e3, cfg=str(cfg), **info)
        # against the unquantized float64 product: within fp8's own error (x's codes and W's, 3-bit mantissas)
        x64 = x.double() if not static else x.double().clamp(-2.0, 2.0)  # the static scale saturates at +-2
        e64 = rel(triton_int8.fp8_linear(x, q, s, b, isc, F32), x64 @ w.double().t() + bias64)
        b64 = 1.5 * (rel(qx.double() * sx.double(), x64) + rel(w_deq, w)) + 2 ** -7
        record("fp8_w8a8_vs_float64", e64 <= b64, rel=e64, bound=b64, **info)
    # leading dims and a transposed (non-contiguous) input keep their meaning
    x = _x(96, 6, BF16, seed=1130).t()  # [6, 96], stride (1, 6)
    _, q, s = fp8_weight(40, 96, 1131, "row")
    y = triton_int8.fp8_linear(x.reshape(2, 3, 96), q, s, None, None, F32)
    want = triton_int8.fp8_linear(x.contiguous(), q, s, None, None, F32).reshape(2, 3, 40)
    record("fp8_w8a8_3d_noncontig", y.shape == (2, 3, 40) and torch.equal(y, want))
    y0 = triton_int8.fp8_linear(x[:0], q, s, None, None, BF16)
    record("fp8_w8a8_empty_m", y0.shape == (0, 40))
    record_refused("fp8_w8a8_refuses_int8_weight",
                   lambda: triton_int8.fp8_linear(x, q.view(torch.int8), s, None, None, F32))


def check_fp8_dot_exact() -> None:
    """The fact the oracle above rests on: the interpreted fp8 x fp8 GEMM decodes both fp8 dtypes and sums their
    products in fp32, on the pointer and TMA kernels: multiples of 1/4 up to 2 (exact in e4m3fn and e5m2, their
    products' sums exact in fp32) give the float64 result bit for bit."""
    from comfyquant.runtime.kernels import triton_int8
    from comfyquant.runtime.kernels.configs import TileConfig

    cfg = TileConfig(16, 32, 32, 4, 1, group_m=4)
    one = torch.ones(1)
    ones_rows = torch.ones(20, 1)  # the epilogue reads one activation scale per row
    for wdt in (E4M3, E5M2):
        g = torch.Generator().manual_seed(1140)
        a = (torch.randint(-8, 9, (20, 64), generator=g) / 4).to(wdt)
        b = (torch.randint(-8, 9, (40, 64), generator=g) / 4).to(wdt)
        want = (torch.randint(-8, 9, (20, 64), generator=g.manual_seed(1140)) / 4).double() @ \
            (torch.randint(-8, 9, (40, 64), generator=g) / 4).double().t()  # the values, not their fp8 codes
        for tma in (False, True):
            got = triton_int8.gemm_w8a8(a, ones_rows, b, one, None, F32, cfg=cfg, tma=tma)
            record("fp8_dot_fp32_exact", torch.equal(got.double(), want), weight=str(wdt), tma=tma)


def check_fp8_launch_keys() -> None:
    """The compiled-launch cache keys of the W8A8 kernels tell int8 operands from fp8 ones (and e4m3 from e5m2)
    at the same shapes: on the GPU a shared key would run the int8-compiled kernel on fp8 codes. The
    interpreter never caches (``check_fast_kernel``), so the keys the launches pass are recorded instead."""
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8, triton_quant
    from comfyquant.runtime.kernels.configs import TileConfig

    class Spy:
        def __init__(self, fk):
            self.fk, self.keys = fk, []

        def __call__(self, grid, args, device, *, num_warps, num_stages, key=None):
            self.keys.append(key)
            return self.fk(grid, args, device, num_warps=num_warps, num_stages=num_stages, key=key)

    cfg = TileConfig(16, 32, 32, 4, 1, group_m=4)
    x = _x(5, 64, BF16, seed=1150)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1151)) * 0.03
    qi, si = quantize_rowwise(w)
    _, q4, s4 = fp8_weight(48, 64, 1151, "row", E4M3)
    _, q5, s5 = fp8_weight(48, 64, 1151, "row", E5M2)
    for attr, tma in (("_W8A8", False), ("_TMA", True)):
        spy = Spy(getattr(triton_int8, attr))
        setattr(triton_int8, attr, spy)
        try:
            for wq, ws in ((qi, si), (q4, s4), (q5, s5)):
                qx, sx = (triton_quant.quantize_rows_int8(x) if wq.dtype == torch.int8
                          else triton_quant.quantize_rows_fp8(x, wq.dtype))
                triton_int8.gemm_w8a8(qx, sx, wq, ws, None, BF16, cfg=cfg, tma=tma)
        finally:
            setattr(triton_int8, attr, spy.fk)
        record("w8a8_keys_per_operand_dtype", len(spy.keys) == 3 and len(set(spy.keys)) == 3, kernel=attr,
               keys=[str(k)[:200] for k in spy.keys])


GROUPS = {"fp8_w8a8": check_fp8_w8a8, "fp8_dot_exact": check_fp8_dot_exact, "fp8_launch_keys": check_fp8_launch_keys}
