"""Every Triton kernel path of the runtime, run under the interpreter on small CPU shapes (see ``triton_interp``).

Oracles and bounds (the GPU's are in benchmarks/check_kernels_gpu.py):
* integer math is compared exactly: int8 activation codes vs ``reference.quantize_rows_int8``; int32 GEMMs vs
  ``torch._int_mm``; each linear vs the reference epilogue (``acc * s_x * s_w + bias`` in float32) applied to
  the kernel's own activation codes (checked separately), stored with :func:`interp_cast`: bit-equal.
* with the rotation, fp32 butterflies in another order may move a code by 1 at a .5 tie: max |diff| <= 1 on
  <= 0.1% of codes (+1) against the float64-rotated reference, as on the GPU.
* float-accumulating paths (W8A16, dequantize + linear, rotate_rows) vs float64: 1e-5 (fp32 out), 2^-9 (fp16),
  and the GPU's 2^-7 (bf16); every linear also within the GPU's bound of the float64 unquantized product.
Shapes: M in {1, 5, 70} (70 > the 64-row small-M switch), K/N like 64/96/100/256 (100: ragged, masked tails),
one K of 9000+ for the activation kernel's two-pass chunked path, and explicit multi-tile configs (GROUP_M > 1).
Not run here (interpreter limitations, see ``check_interpreter_limitations``): W8A16 with bf16 activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton_interp import code_diff, group, interp_cast, record, record_refused, rel
from triton_interp_attention import GROUPS as ATTENTION_GROUPS
from triton_interp_fp8 import GROUPS as FP8_GROUPS
from triton_interp_fusions import GROUPS as FUSION_GROUPS
from triton_interp_modulated import GROUPS as MODULATED_GROUPS
from triton_interp_norm import GROUPS as NORM_GROUPS
from triton_interp_plans import GROUPS as PLAN_GROUPS
from triton_interp_rope import GROUPS as ROPE_GROUPS
from triton_interp_tiles import GROUPS as TILE_GROUPS
from triton_interp_unpack import GROUPS as UNPACK_GROUPS

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 4 + 0.25)
    x[0, min(7, k - 1)] = 30.0  # outliers: early in the first row, at the very end of the last one (the
    x[-1, -1] = -40.0  # chunked kernels' absmax must see every chunk)
    return x.to(dtype)


def _weight(n: int, k: int, seed: int, scale: str = "row") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from comfyquant.quant.int8 import quantize_rowwise, quantize_tensorwise

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.03
    q, s = quantize_rowwise(w) if scale == "row" else quantize_tensorwise(w)
    return w, q, s


def _bias(n: int, dtype: torch.dtype, on: bool, seed: int) -> torch.Tensor | None:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype) if on else None


def _epilogue(acc: torch.Tensor, s_x: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The reference's float32 epilogue on an int32 accumulator, then the interpreter's store cast."""
    from comfyquant.runtime.kernels import reference

    return interp_cast(reference._epilogue(acc, s_x, w_scale, bias, torch.float32), out_dtype)


def _bound64(y: torch.Tensor, x2d: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
             w_deq: torch.Tensor) -> tuple[float, float]:
    """(rel vs the float64 unquantized product, the GPU's bound ``1.5 * (eps_x + eps_w) + 2^-7``); ``x2d``,
    ``w``: the operands as quantized (rotated ones for convrot: the product is the same), ``w_deq``: W's
    dequantized values."""
    from comfyquant.runtime.kernels import reference

    ref64 = x2d.double() @ w.double().t() + (0 if bias is None else bias.double())
    xq, sx = reference.quantize_rows_int8(x2d.float())
    eps_x, eps_w = rel(xq.double() * sx.double(), x2d), rel(w_deq, w)
    return rel(y, ref64), 1.5 * (eps_x + eps_w) + 2 ** -7


# ---- the CPU path, in a fresh process with triton importable ---------------------------------------------------
def check_cpu_dispatch() -> None:
    """Quantized layers on CPU tensors run the torch reference and never import the Triton kernel modules
    (run first: this process has imported none of them yet)."""
    import sys

    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.dispatch_report import describe_dispatch
    from comfyquant.runtime.kernels.backends import triton_available

    record("triton_importable", triton_available())
    for fmt in ("int8", "int8-tensor", "int8-rot", "int8-block", "fp8", "fp8-e5m2", "int4-rot", "nvfp4", "mxfp8"):
        net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
        quantize_(net, QuantizeConfig(format=fmt))
        x = torch.randn(5, 64)
        y = net(x)
        rows = describe_dispatch(net, x)
        record("cpu_forward_torch_path", bool(torch.isfinite(y).all()) and len(rows) == 2
               and all(r.backend == "torch" for r in rows), format=fmt, backends=[r.backend for r in rows])
    loaded = sorted(m for m in sys.modules if m.startswith("comfyquant.runtime.kernels.") and m.rsplit(".", 1)[1]
                    in ("triton_quant", "triton_int8", "triton_gemm", "fp8", "launch"))
    record("no_triton_kernel_module_imported", not loaded, loaded=loaded)


# ---- activation kernels (triton_quant) -----------------------------------------------------------------------
def check_act_quant() -> None:
    from comfyquant.quant.hadamard import fast_hadamard
    from comfyquant.runtime.kernels import reference, triton_quant

    cases = [(1, 64, None), (5, 96, None), (70, 256, None), (3, 100, None), (2, 9000, None),
             (5, 96, 16), (70, 256, 64), (3, 256, 256), (1, 4096, 4096), (2, 8320, 64), (1, 16384, 16384)]
    for i, (m, k, g) in enumerate(cases):
        for dt in (F32, BF16, F16) if k <= 256 else (BF16,):
            x = _x(m, k, dt, seed=i)
            if m > 2:
                x[1] = 0  # an all-zero row: scale 1, codes 0
            # bf16 rows to rotate: the row kernel (from 64 rows "auto" takes the tile kernel's split form, whose
            # bf16 tl.dot the interpreter gets wrong: check_interpreter_limitations; the GPU checks run it)
            q, s = triton_quant.quantize_rows_int8(x, g, kernel="rows" if g and dt == BF16 else "auto")
            if g is None:
                qr, sr = reference.quantize_rows_int8(x.float())
                record("int8_codes", torch.equal(q, qr) and torch.equal(s, sr), m=m, k=k, dtype=str(dt))
                q, s = triton_quant.quantize_rows_int8(x, kernel="rows")  # the row kernel (rotations run it)
                record("int8_codes_rows", torch.equal(q, qr) and torch.equal(s, sr), m=m, k=k, dtype=str(dt))
            else:
                qr, sr = reference.quantize_rows_int8(fast_hadamard(x.double(), g).float())
                mx, n, ok = code_diff(q, qr)
                record("int8_rot_codes", ok and rel(s, sr) < 1e-6, m=m, k=k, convrot=g, dtype=str(dt),
                       max_code_diff=mx, codes_diff=n)
    # quotients on exact halves (ties go to even), at +-127, -0.0 and a denormal: scale 1 (amax 127) and 3 (the
    # correction's path: 4.5 / 3 is 1.5 exactly); the codes are the low byte of (y + 1.5 * 2**23)'s bits
    halves = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 125.5, -0.0, 1e-40, 127.0, -127.0, 3.5, -3.5, 0.0]
    for scale in (1.0, 3.0):
        x = torch.tensor([halves, [-v for v in halves]], dtype=F32) * scale
        want = torch.tensor([[0, 2, 2, 0, -2, -2, 126, -126, 126, 0, 0, 127, -127, 4, -4, 0]], dtype=torch.int8)
        for kernel in ("auto", "rows"):
            q, s = triton_quant.quantize_rows_int8(x, kernel=kernel)
            qr, sr = reference.quantize_rows_int8(x)
            ok = torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(q, torch.cat((want, -want)))
            record("int8_ties_to_even", ok and bool((s == scale).all()), scale=scale, kernel=kernel)
    # a row stride wider than K (column slice), and the W4A8 K order (evens then odds per 128 block)
    wide = _x(5, 300, BF16, seed=50)
    q, s = triton_quant.quantize_rows_int8(wide[:, 17:273], 16)
    q2, s2 = triton_quant.quantize_rows_int8(wide[:, 17:273].contiguous(), 16)
    record("int8_strided_rows", torch.equal(q, q2) and torch.equal(s, s2))
    for m, k, g in [(5, 256, 16), (70, 384, 64), (2, 8320, 256), (3, 128, None)]:
        x = _x(m, k, BF16, seed=k)
        q, s = triton_quant.quantize_rows_int8(x, g)
        qp, sp = triton_quant.quantize_rows_int8(x, g, perm=128)
        blocks = q.reshape(m, k // 128, 128)
        want = torch.cat((blocks[..., 0::2], blocks[..., 1::2]), dim=-1).reshape(m, k)
        record("int8_perm128_order", torch.equal(qp, want) and torch.equal(sp, s), m=m, k=k, convrot=g)
    refusals = (("perm_ragged_k_refused", lambda: triton_quant.quantize_rows_int8(torch.zeros(2, 200), perm=128)),
                ("group_past_4**8_refused", lambda: triton_quant.rotate_rows(torch.zeros(1, 4 ** 9), 4 ** 9)))
    for what, call in refusals:
        record_refused(what, call)


def _blocks(src: torch.Tensor, mode: int, qdt: torch.dtype, qmax: float, rows: int, chunk: int | None,
            static: torch.Tensor | None = None, perm: int = 0, act: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The block kernel with an explicit configuration: (codes, row scales)."""
    from comfyquant.runtime.kernels import triton_quant

    m, width = src.shape[0], triton_quant.out_width(src, act)
    q, s = torch.empty((m, width), dtype=qdt), torch.empty((m, 1))
    grid, args, key, warps = triton_quant.block_launch(src, q, s, static, mode, qmax, perm, act, rows, chunk)
    triton_quant._ACT_BLOCKS(grid, args, src.device, num_warps=warps, num_stages=1, key=key)
    return q, s


def check_act_blocks() -> None:
    """The block kernel in each configuration shape ``block_config`` can return (one pass, 1-4 rows; two passes
    over chunks, ragged last chunk and rows past M), int8 / fp8 / static fp8 codes, the W4A8 column order and a
    gated activation, bit-equal to the reference quantization (its division is a reciprocal and an FMA
    correction; the interpreter's FMA is patched to round once, as the GPU's does: see ``triton_interp``)."""
    from comfyquant.runtime.kernels import reference, triton_quant
    from comfyquant.runtime.kernels.acts import SWIGLU

    cases = [(5, 96, 1, None), (5, 96, 4, None), (70, 256, 4, 64), (3, 100, 2, 32), (2, 9000, 1, 1024),
             (9, 1280, 4, 256), (4, 3072, 2, 2048)]
    for i, (m, k, rows, chunk) in enumerate(cases):
        for dt in (F32, BF16):
            x = _x(m, k, dt, seed=400 + i)
            if m > 2:
                x[1] = 0
            x[0, :8] = -0.0

            info = {"m": m, "k": k, "rows": rows, "chunk": chunk, "dtype": str(dt)}
            qr, sr = reference.quantize_rows_int8(x.float())
            q, s = _blocks(x, triton_quant.MODE_INT8, torch.int8, 127.0, rows, chunk)
            record("blocks_int8_codes", torch.equal(q, qr) and torch.equal(s, sr), **info)
            fmax = torch.finfo(E4M3).max
            _, fsr = reference.quantize_rows_fp8(x, E4M3)
            f, fs = _blocks(x, triton_quant.MODE_FP8, E4M3, fmax, rows, chunk)
            want = interp_cast((x.float() / fsr).clamp(-fmax, fmax), E4M3)
            record("blocks_fp8_codes", torch.equal(f.view(torch.int8), want.view(torch.int8))
                   and torch.equal(fs, fsr), **info)
            st = torch.tensor([0.004])
            f, fs = _blocks(x, triton_quant.MODE_FP8_STATIC, E4M3, fmax, rows, chunk, st)
            want = interp_cast((x.float() / st).clamp(-fmax, fmax), E4M3)
            record("blocks_fp8_static_codes", torch.equal(f.view(torch.int8), want.view(torch.int8))
                   and bool((fs == st).all()), **info)
            if k % 128 == 0:
                qp, _ = _blocks(x, triton_quant.MODE_INT8, torch.int8, 127.0, rows, chunk, perm=128)
                blocks = qr.reshape(m, k // 128, 128)
                record("blocks_int8_perm128", torch.equal(qp, torch.cat((blocks[..., 0::2], blocks[..., 1::2]),
                                                                         dim=-1).reshape(m, k)), **info)
        x2 = _x(m, 2 * k, F32, seed=450 + i)
        q, s = _blocks(x2, triton_quant.MODE_INT8, torch.int8, 127.0, rows, chunk, act=SWIGLU)
        q0, s0 = triton_quant.quantize_rows_int8(x2, act=SWIGLU, kernel="rows")
        record("blocks_swiglu_codes", torch.equal(q, q0) and torch.equal(s, s0), m=m, k=k, rows=rows, chunk=chunk)


def check_rotate_rows() -> None:
    from comfyquant.quant.hadamard import fast_hadamard
    from comfyquant.runtime.kernels import triton_quant

    for i, (m, k, g) in enumerate([(1, 64, 4), (5, 96, 16), (70, 256, 64), (3, 256, 256), (2, 1024, 1024),
                                   (1, 4096, 4096), (2, 9216, 1024), (1, 16384, 16384), (1, 65536, 65536)]):
        x32 = _x(m, k, F32, seed=100 + i)
        r32 = triton_quant.rotate_rows(x32, g)
        e = rel(r32, fast_hadamard(x32.double(), g))
        record("rotate_fp32", r32.dtype == F32 and e <= 1e-6, m=m, k=k, convrot=g, rel=e)
        for dt, bound in ((F16, 2 ** -9), (BF16, 2 ** -7)):
            xd = x32.to(dt)
            r = triton_quant.rotate_rows(xd, g)
            e = rel(r, fast_hadamard(xd.double(), g))
            same = torch.equal(r, interp_cast(triton_quant.rotate_rows(xd.float(), g), dt))
            record(f"rotate_{dt}".replace("torch.", ""), r.dtype == dt and same and e <= bound, m=m, k=k, convrot=g,
                   rel=e, equals_fp32_path_cast=same)


def check_fp8_quant() -> None:
    from comfyquant.runtime.kernels import reference, triton_quant

    for i, (m, k) in enumerate([(1, 64), (5, 96), (70, 256), (3, 100), (2, 9000)]):
        for fdt in (E4M3, E5M2):
            x = _x(m, k, BF16 if k > 256 else F32, seed=200 + i)
            if m > 2:
                x[1] = 0
            q, s = triton_quant.quantize_rows_fp8(x, fdt)
            qr, sr = reference.quantize_rows_fp8(x, fdt)
            fmax = torch.finfo(fdt).max
            want = interp_cast((x.float() / sr).clamp(-fmax, fmax), fdt)
            off = int((want.float() != qr.float()).sum())  # codes the interpreter's fp8 cast rounds differently
            record("fp8_rows_codes", q.dtype == fdt and torch.equal(q.view(torch.int8), want.view(torch.int8))
                   and torch.equal(s, sr), m=m, k=k, dtype=str(fdt), codes_off_gpu_cast=off)
            st = torch.tensor(0.004)  # saturates the outlier (and more): the clamp is exercised
            want = interp_cast((x.float() / st).clamp(-fmax, fmax), fdt)
            for kern in ("auto", "rows"):  # the block kernel (auto) and the row kernel's static mode
                qs, ss = triton_quant.quantize_rows_fp8(x, fdt, static_scale=st, kernel=kern)
                ok = torch.equal(qs.view(torch.int8), want.view(torch.int8)) and ss.shape == (m, 1) and bool(
                    (ss == st).all())
                record("fp8_static_codes", ok, m=m, k=k, dtype=str(fdt), kernel=kern,
                       saturated=int((x.float().abs() / st >= fmax).sum()))
            qr8, sr8 = triton_quant.quantize_rows_fp8(x, fdt, kernel="rows")
            record("fp8_rows_kernel_equals_auto", torch.equal(qr8.view(torch.int8), q.view(torch.int8))
                   and torch.equal(sr8, s), m=m, k=k, dtype=str(fdt))


# ---- GEMMs (triton_gemm through triton_int8) -------------------------------------------------------------------
def _cfgs():
    from comfyquant.runtime.kernels.configs import TileConfig

    return (None, TileConfig(16, 32, 32, 4, 1, group_m=4), TileConfig(32, 64, 64, 4, 2, group_m=8))


def check_int_mm() -> None:
    from comfyquant.runtime.kernels import reference, triton_int8
    from comfyquant.runtime.kernels.configs import TileConfig

    for i, (m, k, n) in enumerate([(1, 64, 48), (5, 96, 70), (70, 256, 96), (17, 100, 70), (70, 160, 33)]):
        g = torch.Generator().manual_seed(300 + i)
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        want = reference.int_mm(a, b.t())
        for cfg in _cfgs():
            got = triton_int8.int_mm(a, b, tma=False, cfg=cfg)
            record("int32_gemm_exact", torch.equal(got, want), m=m, k=k, n=n, cfg=str(cfg))
            if k % 16 == 0 and cfg is not None:  # host TensorDescriptors: the Hopper TMA kernel
                got = triton_int8.int_mm(a, b, tma=True, cfg=cfg)
                record("int32_gemm_tma_exact", torch.equal(got, want), m=m, k=k, n=n, cfg=str(cfg))
    # the persistent grid with more tiles than programs (H200-sized: 132): 13 x 13 tiles of 16 x 16, each program
    # walks two tiles or one, with edge tiles in both dimensions
    g = torch.Generator().manual_seed(309)
    a = torch.randint(-128, 128, (200, 48), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (199, 48), dtype=torch.int8, generator=g)
    want = reference.int_mm(a, b.t())
    sa, bias = torch.rand(200, 1, generator=g) * 1e-3, torch.randn(199, generator=g).to(BF16)
    for p in (1, 2):
        cfg = TileConfig(16, 16, 16, 4, 2, group_m=4, persistent=p)
        got = triton_int8.int_mm(a, b, tma=True, cfg=cfg)
        record("int32_gemm_tma_persistent_exact", torch.equal(got, want), tiles=169, cfg=str(cfg))
    # the epilogue per tile too: row and tensor weight scales, 16- and 32-bit outputs, against the per-tile kernel
    for sk, sb in (("row", torch.rand(199, generator=g) * 1e-3), ("tensor", torch.rand(1, generator=g) * 1e-3)):
        for odt in (BF16, F32):
            per_tile = triton_int8.gemm_w8a8(a, sa, b, sb, bias, odt, tma=True,
                                             cfg=TileConfig(16, 16, 16, 4, 2, group_m=4))
            for p in (1, 2):
                cfg = TileConfig(16, 16, 16, 4, 2, group_m=4, persistent=p)
                scaled = triton_int8.gemm_w8a8(a, sa, b, sb, bias, odt, tma=True, cfg=cfg)
                record("w8a8_tma_persistent_scaled", torch.equal(scaled, per_tile), tiles=169, scale=sk,
                       out=str(odt), cfg=str(cfg))


# (m, k, n, x dtype, out dtype, bias, scale, group); the convrot case at 70 rows takes the split rotating tile
# kernel (fp16 x: the interpreter's bf16 tl.dot is wrong, check_interpreter_limitations)
_LINEAR_CASES = (
    (1, 64, 48, BF16, BF16, True, "row", None), (5, 96, 70, F16, F16, False, "tensor", None),
    (70, 256, 96, F32, F32, True, "row", None), (5, 100, 70, BF16, F32, True, "tensor", None),
    (70, 256, 96, F16, BF16, True, "row", 64), (5, 96, 70, F32, F16, True, "row", 16),
    (1, 256, 48, F16, F32, False, "tensor", 256),
)


def check_w8a8() -> None:
    from comfyquant.quant.hadamard import fast_hadamard, rotate_weight
    from comfyquant.runtime.kernels import reference, triton_int8, triton_quant

    for i, (m, k, n, dt, odt, has_b, sk, g) in enumerate(_LINEAR_CASES):
        x = _x(m, k, dt, seed=400 + i)
        w, q, s = _weight(n, k, seed=410 + i, scale=sk)
        x64, w64 = x.double(), w.double()
        if g is not None:  # convrot: the weight stored rotated, the kernel rotates x
            q, s = _requant_rotated(w, g, sk)
            x64, w64 = fast_hadamard(x64, g), rotate_weight(w64, g)
        b = _bias(n, BF16, has_b, seed=420 + i)
        info = {"m": m, "k": k, "n": n, "x": str(dt), "out": str(odt), "bias": has_b, "scale": sk, "convrot": g}
        qx, sx = triton_quant.quantize_rows_int8(x, g)  # checked against the reference in check_act_quant
        want = _epilogue(reference.int_mm(qx, q.t()), sx, s, b, odt)
        y = triton_int8.int8_linear(x, q, s, b, g, odt)
        e, bound = _bound64(y, x64, w64, b, q.double() * s.double())
        record("w8a8_linear", y.dtype == odt and torch.equal(y, want) and e <= bound, rel=e, bound=bound, **info)
        for cfg in _cfgs()[1:]:
            y2 = triton_int8.int8_linear(x, q, s, b, g, odt, cfg=cfg)
            record("w8a8_linear_tiles", torch.equal(y2, want), cfg=str(cfg), **info)
            if k % 16 == 0:  # the Hopper kernel (host TensorDescriptors) on the same activations
                y3 = triton_int8.gemm_w8a8(qx, sx, q, s, b, odt, cfg=cfg, tma=True)
                record("w8a8_tma_linear", torch.equal(y3, want), cfg=str(cfg), **info)
    # leading dims and a transposed (non-contiguous) input keep their meaning
    x = _x(96, 6, BF16, seed=430).t()  # [6, 96], stride (1, 6)
    w, q, s = _weight(40, 96, seed=431)
    y = triton_int8.int8_linear(x.reshape(2, 3, 96), q, s, None, None, F32)
    want = reference.int8_linear_ref(x, q, s, None, None, F32).reshape(2, 3, 40)
    record("w8a8_3d_noncontig", y.shape == (2, 3, 40) and torch.equal(y, want))


def _requant_rotated(w: torch.Tensor, g: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    from comfyquant.quant.hadamard import rotate_weight
    from comfyquant.quant.int8 import quantize_rowwise, quantize_tensorwise

    wr = rotate_weight(w, g)
    return quantize_rowwise(wr) if scale == "row" else quantize_tensorwise(wr)


def _fused_case(case: tuple, seed: int) -> tuple:
    """(x with outliers and an all-zero row, w, its codes and scale, bias, the record's fields) of a linear case."""
    m, k, n, dt, odt, has_b, sk, _ = case
    x = _x(m, k, dt, seed=seed)
    if m > 2:
        x[1] = 0
    w, q, s = _weight(n, k, seed=seed + 10, scale=sk)
    b = _bias(n, BF16, has_b, seed=seed + 20)
    return x, w, q, s, b, {"m": m, "k": k, "n": n, "x": str(dt), "out": str(odt), "bias": has_b, "scale": sk}


def check_fused() -> None:
    from comfyquant.runtime.kernels import reference, triton_int8

    cases = [c for c in _LINEAR_CASES if c[-1] is None] + [(3, 1000, 40, BF16, BF16, True, "row", None)]
    for i, case in enumerate(cases):
        x, w, q, s, b, info = _fused_case(case, seed=500 + i)
        odt = case[4]
        # the fused kernel quantizes as the activation quantizer does (x / scale rounded as div_rn, half to even),
        # so it equals the two-launch path bit for bit
        qx, sx = reference.quantize_rows_int8(x.float())
        want = _epilogue(reference.int_mm(qx, q.t()), sx, s, b, odt)
        two_launch = triton_int8.int8_linear(x, q, s, b, None, odt)
        for cfg in _cfgs():
            y = triton_int8.fused_linear(x, q, s, b, odt, cfg=cfg)
            e, bound = _bound64(y, x, w, b, q.double() * s.double())
            record("fused_linear", y.dtype == odt and torch.equal(y, want) and torch.equal(y, two_launch)
                   and e <= bound, rel=e, bound=bound, cfg=str(cfg), **info)


def check_fused_rows() -> None:
    """The one-launch path from 64 rows (the row-block kernel, ``triton_gemm.fused_rows``; its quantization, then
    its GEMM, as two launches here: the interpreter runs programs one after another): the two-launch path's
    output bit for bit, with edge row blocks, K off the tile (masked steps), rows past 8,192 columns (chunked
    passes), an input activation, tensor scales, a low-rank term, and every row of a block quantized once."""
    from comfyquant.runtime.kernels import triton_int8
    from comfyquant.runtime.kernels.configs import TileConfig, rows_shape

    cases = [(64, 256, 96, F32, F32, True, "row", 0), (130, 300, 70, BF16, BF16, False, "tensor", 0),
             (70, 1000, 40, F16, F16, True, "row", 3), (200, 96, 300, F32, BF16, True, "row", 1),
             (65, 8320, 24, BF16, F32, False, "row", 0)]
    for i, (m, k, n, dt, odt, has_b, sk, act) in enumerate(cases):
        x, _w, q, s, b, info = _fused_case((m, k, n, dt, odt, has_b, sk, None), seed=560 + i)
        assert rows_shape(m, n, k), (m, n, k)
        two = triton_int8.int8_linear(x, q, s, b, None, odt, act=act)
        for cfg in (None, TileConfig(16, 32, 32, 4, 1), TileConfig(64, 64, 64, 4, 2)):
            y = triton_int8.fused_linear(x, q, s, b, odt, cfg=cfg, act=act)
            record("fused_rows_equals_two_launch", y.dtype == odt and torch.equal(y, two), act=act, cfg=str(cfg),
                   max_diff=float((y.float() - two.float()).abs().max()), **info)
    m, k, n = 96, 128, 48  # a low-rank term in the epilogue, as the two-launch GEMM adds it
    x, _w, q, s, b, info = _fused_case((m, k, n, F32, F32, True, "row", None), seed=590)
    g = torch.Generator().manual_seed(591)
    down, up = torch.randn(16, k, generator=g) * 0.1, torch.randn(16, n, generator=g) * 0.1
    lr = (down, up, 16)
    y = triton_int8.fused_linear(x, q, s, b, F32, low_rank=lr)
    want = triton_int8.int8_linear(x, q, s, b, None, F32, low_rank=lr)
    record("fused_rows_low_rank", torch.allclose(y, want, rtol=1e-5, atol=1e-5),
           max_diff=float((y - want).abs().max()), **info)
    check_fused_rows_wide()


def check_fused_rows_wide() -> None:
    """The row-block kernel on layers of more column tiles than quantizing programs (``wide``: the first 32 of a
    block quantize, the rest only wait and multiply): the two-launch path's output bit for bit, rows in one
    share each and (past 8,192 columns, one row a step) several shares a program, through the general path and
    the plan (``rows_config``'s 128-column tiles on a 4,224-wide layer)."""
    from comfyquant.runtime.kernels import triton_int8
    from comfyquant.runtime.kernels import triton_plans as tp
    from comfyquant.runtime.kernels.configs import TileConfig, cdiv, rows_quant_programs, rows_shape

    for i, (m, k, n, dt, odt, has_b, cfg) in enumerate([
            (130, 96, 640, F32, BF16, True, TileConfig(64, 16, 32, 4, 1)),
            (70, 8320, 560, BF16, F32, False, TileConfig(64, 16, 128, 4, 1))]):
        x, _w, q, s, b, info = _fused_case((m, k, n, dt, odt, has_b, "row", None), seed=600 + i)
        tiles = cdiv(n, cfg.block_n)
        assert not rows_shape(m, n, k, cfg) and rows_shape(m, n, k, cfg, wide=True), (m, n, k)
        y = triton_int8.fused_linear(x, q, s, b, odt, cfg=cfg, wide=True)
        two = triton_int8.int8_linear(x, q, s, b, None, odt)
        record("fused_rows_wide_equals_two_launch", torch.equal(y, two), tiles=tiles,
               quantizing=rows_quant_programs(tiles), cfg=str(cfg), **info)
    m, k, n = 130, 64, 4224
    x, _w, q, s, b, info = _fused_case((m, k, n, BF16, BF16, True, "row", None), seed=610)
    assert not rows_shape(m, n, k) and rows_shape(m, n, k, wide=True)
    plan = tp.plan_fused(x, q, s, b, BF16, wide=True)
    two = triton_int8.int8_linear(x, q, s, b, None, BF16)
    record("fused_rows_wide_plan", plan is not None and torch.equal(plan(x), two), **info)


def check_fused_kblock() -> None:
    """The one-launch kernel with activation scales per row and K block (``kblock``): against the float64-exact
    reference of that scheme (``reference.int8_linear_kblock_ref``, the block the tile config's BLOCK_K), and
    closer to the unquantized product than per-row scales wherever a row has an outlier (``_x`` puts one in the
    first and the last row)."""
    from comfyquant.runtime.kernels import reference, triton_int8

    tol = {F32: 1e-5, F16: 2 ** -10, BF16: 2 ** -7}
    cases = [c for c in _LINEAR_CASES if c[-1] is None] + [(3, 1000, 40, BF16, BF16, True, "row", None),
                                                           (4, 300, 24, F32, F32, False, "row", None)]
    for i, case in enumerate(cases):
        x, w, q, s, b, info = _fused_case(case, seed=540 + i)
        odt = case[4]
        ref64 = x.double() @ w.double().t() + (0 if b is None else b.double())
        for cfg in _cfgs():
            block = cfg.block_k if cfg is not None else 128
            want = reference.int8_linear_kblock_ref(x, q, s, b, F32, block=block)
            y = triton_int8.fused_linear(x, q, s, b, odt, cfg=cfg, kblock=True)
            d = (y.float() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
            row = triton_int8.fused_linear(x, q, s, b, F32, cfg=cfg)
            e_kb, e_row = rel(want, ref64), rel(row, ref64)
            record("fused_kblock_linear", y.dtype == odt and d <= tol[odt] and e_kb <= e_row * 1.001, diff=d,
                   rel_kblock=e_kb, rel_row=e_row, block=block, cfg=str(cfg), **info)


def check_w8a16() -> None:
    """Weight-only GEMM with fp16 activations (bf16 ones hit interpreter limitations: see the limitations)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import triton_int8, triton_quant

    cases = [(1, 64, 48, True, "row", None), (5, 96, 70, False, "tensor", None), (70, 256, 96, True, "row", 64),
             (17, 100, 70, True, "row", None), (5, 256, 130, True, "tensor", 256)]
    for i, (m, k, n, has_b, sk, g) in enumerate(cases):
        x = _x(m, k, F16, seed=600 + i)
        w, q, s = _weight(n, k, seed=610 + i, scale=sk)
        if g is not None:
            q, s = _requant_rotated(w, g, sk)
        qf, sf = quantize_fp8(w)
        if sk == "row":
            sf = sf.expand(n).contiguous()  # per-row fp8 scale (the kernel reads [N] or a scalar)
        b = _bias(n, F16, has_b, seed=620 + i)
        xr = x if g is None else triton_quant.rotate_rows(x, g)  # checked in check_rotate_rows
        for wq, ws, wname in ((q, s, "int8"), (qf, sf, "fp8_e4m3"), (qf.float().to(E5M2), sf, "fp8_e5m2")):
            ref = xr.double() @ (wq.double() * ws.double().reshape(-1, 1)).t() + (0 if b is None else b.double())
            for odt, bound in ((F32, 1e-5), (F16, 2 ** -9)):
                for cfg in _cfgs()[:2] if wname == "int8" else (None,):  # tiles: the weight dtype is no matter
                    y = triton_int8.w8a16_linear(x, wq, ws, b, g, odt, cfg=cfg)
                    e = rel(y, ref)
                    record("w8a16_linear", y.dtype == odt and e <= bound, m=m, k=k, n=n, weight=wname,
                           out=str(odt), bias=has_b, scale=sk, convrot=g, cfg=str(cfg), rel=e, bound=bound)


def check_w8a16_split() -> None:
    """The weight-only kernel with K in slices (``split_k``): against the unsplit kernel (fp32 output: the same
    products summed per slice, 1e-6), deterministic (the last program sums the partials in slice order), the
    tile counters left zeroed for the next launch, with a bias, a ragged K, fp8 weights, a folded input
    activation and a low-rank term; and the plan of a shape ``w8a16_config`` splits, bit-equal to the general
    path. fp16 activations (bf16 ones hit interpreter limitations)."""
    import dataclasses

    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import triton_int8, triton_plans
    from comfyquant.runtime.kernels.configs import TileConfig, w8a16_config

    for i, (m, k, n, split) in enumerate([(1, 1024, 48, 3), (5, 1000, 40, 4), (16, 768, 96, 2), (3, 512, 33, 8)]):
        x = _x(m, k, F16, seed=650 + i)
        w, q, s = _weight(n, k, seed=660 + i)
        qf, sf = quantize_fp8(w)
        b = _bias(n, F16, i % 2 == 0, seed=670 + i)
        down = torch.randn(16, k, generator=torch.Generator().manual_seed(680 + i)).to(F16) * 0.05
        up = torch.randn(16, n, generator=torch.Generator().manual_seed(690 + i)).to(F16) * 0.05
        base = TileConfig(16, 16, 128, 4, 2, 1)
        for wq, ws, wname in ((q, s, "int8"), (qf, sf.expand(n).contiguous(), "fp8")):
            for extra, kw in (("", {}), ("_silu", {"act": 3}), ("_low_rank", {"low_rank": (down, up, 16)})):
                ref = triton_int8.w8a16_linear(x, wq, ws, b, None, F32, cfg=base, **kw)
                cfg = dataclasses.replace(base, split_k=split)
                y = triton_int8.w8a16_linear(x, wq, ws, b, None, F32, cfg=cfg, **kw)
                again = triton_int8.w8a16_linear(x, wq, ws, b, None, F32, cfg=cfg, **kw)
                _, cnt = triton_int8.split_buffers(x.device, 0, cfg, m, n)
                record(f"w8a16_split{extra}", rel(y, ref) <= 1e-6 and torch.equal(y, again)
                       and int(cnt.abs().sum()) == 0, m=m, k=k, n=n, split=split, weight=wname, rel=rel(y, ref))
    m, k, n = 1, 4096, 48
    cfg = w8a16_config(m, n, k, 132)
    w, q, s = _weight(n, k, seed=700)
    first, *later = (_x(m, k, F16, seed=701 + j) for j in range(3))
    plan = triton_plans.plan_w8a16(first, q, s, None, F16)
    same = plan is not None and all(torch.equal(plan(x), triton_int8.w8a16_linear(x, q, s, None, None, F16))
                                    for x in later)
    record("w8a16_split_plan", cfg.split_k > 1 and same, split=cfg.split_k)
    lr = (torch.randn(16, k, generator=torch.Generator().manual_seed(705)).to(F16) * 0.05,
          torch.randn(16, n, generator=torch.Generator().manual_seed(706)).to(F16) * 0.05, 16)
    plan = triton_plans.plan_w8a16(first, q, s, None, F16, low_rank=lr)
    same = plan is not None and all(
        torch.equal(plan(x), triton_int8.w8a16_linear(x, q, s, None, None, F16, low_rank=lr)) for x in later)
    record("w8a16_split_plan_low_rank", same, split=cfg.split_k)
    # a plan on an explicit tile (bench_w8a16_large_m.py --dense), on int8 weights and on a 16-bit weight (a dense
    # copy: the kernel's conversion is then a no-op): the general path's bits on that tile, near float64
    tile = TileConfig(32, 32, 32, 4, 2, group_m=4)
    m, k, n = 40, 96, 48
    w, q, s = _weight(n, k, seed=707)
    xs = [_x(m, k, F16, seed=708 + j) for j in range(3)]
    for wq, ws, wname in ((q, s, "int8"), (w.to(F16), torch.ones(()), "fp16 copy")):
        triton_int8.w8a16_linear(xs[0], wq, ws, None, None, F16, cfg=tile)  # compiles (GPU) the plan's tile
        plan = triton_plans.plan_w8a16(xs[0], wq, ws, None, F16, cfg=tile)
        ys = [triton_int8.w8a16_linear(x, wq, ws, None, None, F16, cfg=tile) for x in xs[1:]]
        pairs = list(zip(xs[1:], ys, strict=True))
        e = max(rel(y, x.double() @ (wq.double() * ws.double().reshape(-1, 1)).t()) for x, y in pairs)
        same = plan is not None and all(torch.equal(plan(x), y) for x, y in pairs)
        record("w8a16_plan_tile", same and e <= 2 ** -9, weight=wname, rel=e)
    # fp8 weights on a >= 8,192-wide layer: the plan takes w8a16_config's fp8 split (two K slices), the same bits
    # as the general path, near float64
    for m in (1, 16):
        k, n = 512, 8192
        cfg = w8a16_config(m, n, k, 132, fp8=True)
        qf, sf = quantize_fp8(_weight(n, k, seed=710 + m)[0])
        sf = sf.expand(n).contiguous()
        xs = [_x(m, k, F16, seed=712 + m + j) for j in range(2)]
        plan = triton_plans.plan_w8a16(xs[0], qf, sf, None, F16)
        ys = [triton_int8.w8a16_linear(x, qf, sf, None, None, F16) for x in xs]
        e = max(rel(y, x.double() @ (qf.double() * sf.double()[:, None]).t()) for x, y in zip(xs, ys, strict=True))
        record("w8a16_split_plan_fp8_wide", cfg.split_k == 2 and plan is not None
               and all(torch.equal(plan(x), y) for x, y in zip(xs, ys, strict=True)) and e <= 2 ** -9, m=m, rel=e,
               cfg=str(cfg))


def check_tma_probe() -> None:
    """``benchmarks/tma_weight_only_probe.py``'s experimental TMA GEMM (not the runtime's), so the probe a device
    session runs is right before it is timed: the dense form, the int8 weight as the second operand and as the
    register operand (swapped), x by TMA or through pointers, each against float64 with ragged M / N edges (TMA
    zero-fills them; the pointer loads clamp), fp16."""
    import sys
    from pathlib import Path

    from comfyquant.quant.int8 import quantize_rowwise

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tma_weight_only_probe as probe

    x = _x(70, 128, F16, seed=930)
    w = torch.randn(90, 128, generator=torch.Generator().manual_seed(931)) * 0.05
    q, s = quantize_rowwise(w)
    s = s.reshape(-1).float().contiguous()
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    for form, swapped, x_tma, wq, ws, want in (
            ("dense", False, True, w.to(F16), torch.ones(90), x.double() @ w.to(F16).double().t()),
            ("w8a16", False, True, q, s, ref), ("w8a16_swapped", True, True, q, s, ref),
            ("w8a16_xptr", False, False, q, s, ref), ("w8a16_swapped_xptr", True, False, q, s, ref)):
        y = probe._op(swapped, (32, 32, 64, 4, 2), form != "dense", x_tma)(x, wq, ws)
        record("tma_probe", rel(y, want) <= 2 ** -9, form=form, rel=rel(y, want))


def check_dequant() -> None:
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.quant.hadamard import fast_hadamard
    from comfyquant.runtime.kernels import triton_int8

    for i, (n, k, sk) in enumerate([(70, 100, "row"), (33, 300, "tensor"), (1, 64, "row")]):
        w, q, s = _weight(n, k, seed=700 + i, scale=sk)
        qf, sf = quantize_fp8(w)
        for wq, ws, wname in ((q, s, "int8"), (qf, sf, "fp8_e4m3"), (qf.float().to(E5M2), sf, "fp8_e5m2")):
            for dt in (BF16, F16):
                d = triton_int8.dequantize_weight(wq, ws, dt)
                want = interp_cast(wq.float() * (ws.float().reshape(-1, 1) if ws.numel() > 1 else ws.float()), dt)
                record("dequantize_weight", d.dtype == dt and torch.equal(d, want), n=n, k=k, weight=wname,
                       dtype=str(dt), scale=sk)
    for i, (m, k, n, dt, odt, g) in enumerate([(5, 96, 70, F16, F16, None), (70, 256, 48, BF16, BF16, 64),
                                               (1, 100, 33, F32, F32, None), (3, 256, 40, F16, F32, 16)]):
        x = _x(m, k, dt, seed=720 + i)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(730 + i)) * 0.03
        q, s = _requant_rotated(w, g, "row") if g is not None else _weight(n, k, seed=730 + i)[1:]
        b = _bias(n, BF16, True, seed=740 + i)
        y = triton_int8.dequant_linear(x, q, s, b, g, odt)
        xr = x.double() if g is None else fast_hadamard(x.double(), g)
        e = rel(y, xr @ (q.double() * s.double()).t() + b.double())
        bound = 2 ** -6 if dt in (BF16, F32) else 2 ** -9  # bf16 compute: x, W and out each truncated (interp.)
        record("dequant_linear", y.dtype == odt and e <= bound, m=m, k=k, n=n, x=str(dt), convrot=g, rel=e,
               bound=bound)


def check_w4a8() -> None:
    from comfyquant.quant.int4 import pack_int4, unpack_int4
    from comfyquant.runtime.kernels import int4, reference, triton_int8, triton_quant

    cases = [(1, 128, 48, BF16, BF16, True, "row", 16), (5, 256, 70, F16, F32, False, "row", 64),
             (70, 384, 96, F32, F32, True, "tensor", 16), (5, 256, 33, BF16, F16, True, "row", 256),
             (2, 8320, 40, BF16, F32, True, "row", 64),
             # K a multiple of 64 but not of 128 (Flux's img_in, SD 1.5's 320 / 960): 64-column K steps
             (5, 192, 40, BF16, BF16, True, "row", 64), (70, 320, 48, F16, F32, False, "row", 64)]
    for i, (m, k, n, dt, odt, has_b, sk, g) in enumerate(cases):
        x = _x(m, k, dt, seed=800 + i)
        gen = torch.Generator().manual_seed(810 + i)
        packed = pack_int4(torch.randint(-7, 8, (n, k), generator=gen))
        sw = torch.rand(n, generator=gen) * 0.01 + 0.001 if sk == "row" else torch.tensor(0.004)
        b = _bias(n, BF16, has_b, seed=820 + i)
        qx, sx = triton_quant.quantize_rows_int8(x, g)  # the W4A8 GEMM reads the same codes, K-permuted
        want = _epilogue(reference.int_mm(qx, unpack_int4(packed).t()), sx, sw, b, odt)
        e_ref = rel(want, int4.w4a8_linear_ref(x, packed, sw, b, g, F32))
        info = {"m": m, "k": k, "n": n, "x": str(dt), "out": str(odt), "bias": has_b, "scale": sk, "convrot": g}
        for cfg in _cfgs()[:2] if k < 8000 else (None,):
            if cfg is not None:
                from comfyquant.runtime.kernels.configs import TileConfig

                cfg = TileConfig(cfg.block_m, cfg.block_n, triton_int8.w4a8_block_k(k), cfg.warps, cfg.stages,
                                 cfg.group_m)
            y = triton_int8.w4a8_linear(x, packed, sw, b, g, odt, cfg=cfg, order="plain")
            record("w4a8_linear", y.dtype == odt and torch.equal(y, want) and e_ref <= 2 ** -7, cfg=str(cfg),
                   rel_vs_torch_path=e_ref, **info)
            # the weight as the MMA's register operand, and both nibbles in one MMA on unpermuted codes: the same
            # integer sums, the same bits
            for order in ("swapped", "joined"):
                ys = triton_int8.w4a8_linear(x, packed, sw, b, g, odt, cfg=cfg, order=order)
                record(f"w4a8_linear_{order}", torch.equal(ys, want), cfg=str(cfg), **info)
            # the default (the rule's order, the rule's tile where cfg is None): the same bits again
            record("w4a8_linear_default", torch.equal(triton_int8.w4a8_linear(x, packed, sw, b, g, odt), want),
                   order=triton_int8.w4a8_order(x.numel() // k), **info)


def check_fp8_scaled_mm() -> None:
    """fp8.py's host code: the Triton fp8 activation quant (interpreted) + torch._scaled_mm (CPU build)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.runtime.kernels import fp8, triton_quant

    for i, (m, k, n, sk, static) in enumerate([(5, 96, 48, "tensor", False), (70, 256, 96, "row", False),
                                               (5, 96, 48, "tensor", True), (3, 64, 32, "row", True)]):
        x = _x(m, k, BF16, seed=900 + i)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(910 + i)) * 0.03
        qw, sw = quantize_fp8(w)
        if sk == "row":
            sw = (torch.rand(n, 1, generator=torch.Generator().manual_seed(911)) + 0.5) * sw
        b = _bias(n, BF16, True, seed=920 + i)
        isc = (x.float().abs().amax() / 448).reshape(()) if static else None
        y = fp8.fp8_linear_scaled_mm(x, qw, sw, b, isc, BF16)
        qx, sx = triton_quant.quantize_rows_fp8(x, qw.dtype, isc)  # codes checked in check_fp8_quant
        ref = (qx.double() * sx.double()) @ (qw.double() * sw.double().reshape(-1, 1)).t() + b.double()
        e = rel(y, ref)
        record("fp8_scaled_mm_linear", y.dtype == BF16 and e <= 2 ** -7, m=m, k=k, n=n, scale=sk, static=static,
               rel=e)


# ---- launcher and interpreter facts -----------------------------------------------------------------------------
def check_fast_kernel() -> None:
    """FastKernel under the interpreter: every launch takes the slow path (nothing cached), results stay right,
    empty grids launch nothing."""
    from triton.runtime.interpreter import InterpretedFunction

    from comfyquant.runtime.kernels import reference, triton_int8, triton_quant
    from comfyquant.runtime.kernels.launch import FastKernel

    kernels = [v for mod in (triton_int8, triton_quant) for v in vars(mod).values() if isinstance(v, FastKernel)]
    record("kernels_are_interpreted", len(kernels) >= 7 and all(isinstance(k.fn, InterpretedFunction)
                                                                 for k in kernels), fast_kernels=len(kernels))
    x = _x(5, 96, BF16, seed=1000)
    _, q, s = _weight(40, 96, seed=1001)
    ys = [triton_int8.int8_linear(x, q, s, None, None, F32) for _ in range(3)]  # same key: the GPU's fast path
    want = reference.int8_linear_ref(x, q, s, None, None, F32)
    record("repeat_launch_same_result", all(torch.equal(y, ys[0]) for y in ys) and rel(ys[0], want) < 1e-6)
    record("slow_path_only", all(not k._compiled for k in kernels),
           cached=sum(len(k._compiled) for k in kernels))
    key = triton_int8._W8A8.key((x, 5, 32), 4, 3)
    record("generic_key_works", isinstance(key, tuple) and key[:2] == (4, 3))
    y0 = triton_int8.int8_linear(x[:0], q, s, None, None, BF16)
    q0, s0 = triton_quant.quantize_rows_int8(x[:0])
    record("empty_m", y0.shape == (0, 40) and q0.shape == (0, 96) and s0.shape == (0, 1))


def check_interpreter_limitations() -> None:
    """Where Triton 3.6.0's interpreter computes something other than the GPU does (each reproduced here, so the
    list stays true; a check that starts failing means the interpreter changed: widen the checks above)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_k(x_ptr, out_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(out_ptr + o, tl.load(x_ptr + o).to(out_ptr.dtype.element_ty))

    @triton.jit
    def dot_k(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        a = tl.load(a_ptr + o[:, None] * N + o[None, :])
        b = tl.load(b_ptr + o[:, None] * N + o[None, :])
        tl.store(c_ptr + o[:, None] * N + o[None, :], tl.dot(a, b, out_dtype=tl.float32))

    def cast(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=dt)
        cast_k[(1,)](x, out, x.numel())
        return out

    x = torch.tensor([1.00390625 + 2 ** -9, -3.3359375, 124.3, 1.0625] + [0.0] * 12)
    bf = cast(x, BF16)
    record("fp32_to_bf16_truncates", torch.equal(bf, interp_cast(x, BF16)) and not torch.equal(bf, x.to(BF16)),
           op="fp32 -> bf16 (.to)", paths="bf16 outputs of every GEMM, rotate_rows, dequantize_weight",
           got=bf[:2].float().tolist(), gpu=x[:2].to(BF16).float().tolist())
    f8 = cast(x, E4M3)
    record("fp32_to_fp8_rounding", f8[2].float().item() == 64.0 and f8[3].float().item() == 1.125,
           op="fp32 -> fp8 (.to, RTNE)", paths="quantize_rows_fp8 (dynamic and static): fp8 activation codes",
           got=f8[2:4].float().tolist(), gpu=x[2:4].to(E4M3).float().tolist())
    i8 = torch.tensor([1, -2, 3, 100] + [0] * 12, dtype=torch.int8)
    bi = cast(i8, BF16)
    record("int8_to_bf16_wrong", not torch.equal(bi.float(), i8.float()), op="int8 -> bf16 (.to)",
           paths="w8a16 int8 weights with bf16 (or fp32) activations", got=bi[:4].float().tolist())
    a = torch.eye(16).to(BF16) * 2
    c = torch.empty(16, 16)
    dot_k[(1,)](a, a, c, 16)
    record("bf16_dot_wrong", not torch.equal(c, torch.eye(16) * 4), op="tl.dot on bf16 operands",
           paths="w8a16 with bf16 (or fp32) activations, int8 and fp8 weights", got_diag=c[0, 0].item())


GROUPS: dict[str, Callable[[], None]] = {
    "cpu_dispatch": check_cpu_dispatch, "act_quant": check_act_quant, "act_blocks": check_act_blocks, "rotate_rows": check_rotate_rows, "fp8_quant": check_fp8_quant,
    "int_mm": check_int_mm, "w8a8": check_w8a8, "fused": check_fused, "fused_rows": check_fused_rows, "fused_kblock": check_fused_kblock,
    "w8a16": check_w8a16, "w8a16_split": check_w8a16_split, "tma_probe": check_tma_probe,
    "dequant": check_dequant, "w4a8": check_w4a8, "fp8_scaled_mm": check_fp8_scaled_mm,
    "fast_kernel": check_fast_kernel, "interpreter_limitations": check_interpreter_limitations,
    **FP8_GROUPS,  # the FP8 W8A8 Triton path (triton_interp_fp8)
    **FUSION_GROUPS,  # the low-rank epilogue and input activations (triton_interp_fusions)
    **PLAN_GROUPS,  # the eager fast paths (triton_interp_plans)
    **TILE_GROUPS,  # the tile activation kernel and its tensor-core rotation (triton_interp_tiles)
    **ATTENTION_GROUPS,  # the int8 attention kernel (triton_interp_attention)
    **NORM_GROUPS,  # an RMSNorm folded into the activation quantizer (triton_interp_norm)
    **MODULATED_GROUPS,  # a modulated LayerNorm folded into it (triton_interp_modulated)
    **UNPACK_GROUPS,  # int4_rot unpacked per call onto the W8A8 GEMM (triton_interp_unpack)
    **ROPE_GROUPS,  # a DiT's q / k RMSNorm + RoPE in one pass (triton_interp_rope)
}


def run_groups(names: list[str] | None = None) -> None:
    """Run the named check groups (all by default), each under :func:`triton_interp.group`."""
    for name in names or list(GROUPS):
        with group(name):
            GROUPS[name]()
