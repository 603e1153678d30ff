"""Interpreter checks of what the Triton kernels fuse: the low-rank (dynamic LoRA) epilogue and input activations
(int8 and fp8 W8A8 paths: for fp8 the dynamic and static activation scales, pointer and TMA kernels).

Oracle: the same kernel path without the fusion, fed what the fusion stands for, plus the fused term in float64:
* low rank: ``y(x, low_rank) == y(x) + (x @ down^T) @ up`` (``h`` rounded to x's dtype, as the kernel takes it
  from cuBLAS / torch); fp32 to 1e-5 relative, fp16 to 2^-9 (the output's own rounding);
* input activation: ``y(x, act) == y(act(x))`` with ``act`` in fp32 (the kernels never round the activation to
  x's dtype): the int8 activation codes of the quantizer bit-equal, the linears to 1e-5 (fp32) and at the
  output's rounding (fp16, where the reference rounds ``act(x)`` to fp16 first: 2^-8); rotated integer paths
  to at least 1e-3 (one int code may flip at a tie, as in the rotation checks).
Every check also records what it would read without the fusion (~1), so a fusion that does nothing fails.
bf16 ``tl.dot`` does not run in the interpreter (``check_interpreter_limitations``), so W8A16 is fp16 here;
the GPU checks (``benchmarks/check_paths_gpu.py``: ``low_rank_*``, ``input_act_*``) cover bf16 and TMA.
"""

from __future__ import annotations

import torch
from triton_interp import code_diff, record, record_refused, rel

F32, F16 = torch.float32, torch.float16
ACTS = ("gelu_tanh", "gelu", "silu")


def _case(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    return x, w, s


def _low_rank(r: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [R, k], up [R, n]) with R = r rounded up to 16, zero rows past r (as ``LoRASidePath`` pads)."""
    g = torch.Generator().manual_seed(seed)
    rp = -(-r // 16) * 16
    down, up = torch.zeros(rp, k), torch.zeros(rp, n)
    down[:r] = torch.randn(r, k, generator=g) * 0.1
    up[:r] = torch.randn(r, n, generator=g) * 0.1
    return down.to(dtype), up.to(dtype)


def _int4_rot(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    from comfyquant.runtime import QuantizedTensor

    qt = QuantizedTensor.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05,
                                    "int4-rot")
    p = qt.params
    (scale,), (group,) = p.format.kernel_args(p.stored(qt.qdata), p.layer_params)
    return qt.qdata, scale, group


def _paths(w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, k: int, n: int,
           seed: int) -> dict:
    """name -> f(x, **fusion) for every Triton linear that fuses (W8A16 only in fp16: interpreter limits)."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    w8, s8 = (w.float() * (448 / 127)).to(torch.float8_e4m3fn), s * (127 / 448)  # the same weight in fp8
    static = torch.tensor(0.02)  # saturates |x| > 8.96: a static scale (not the dynamic one) must be in use
    paths = {
        "w8a8": lambda x, **kw: ti.int8_linear(x, w, s, bias, None, dtype, **kw),
        "w8a8_rot16": lambda x, **kw: ti.int8_linear(x, w, s, bias, 16, dtype, **kw),
        "fused": lambda x, **kw: ti.fused_linear(x, w, s, bias, dtype, **kw),
        "w8a8_tma": lambda x, **kw: _tma(x, w, s, bias, dtype, **kw),
        "fp8_w8a8": lambda x, **kw: ti.fp8_linear(x, w8, s8, bias, None, dtype, **kw),
        "fp8_w8a8_static": lambda x, **kw: ti.fp8_linear(x, w8, s8, bias, static, dtype, **kw),
        "fp8_w8a8_tma": lambda x, **kw: _tma(x, w8, s8, bias, dtype, **kw),
    }
    if k % 128 == 0:  # the W4A8 kernel's K block
        w4, s4, g4 = _int4_rot(n, k, seed)
        paths["w4a8"] = lambda x, **kw: ti.w4a8_linear(x, w4, s4, bias, g4, dtype, **kw)
    if dtype == F16:
        paths["w8a16"] = lambda x, **kw: ti.w8a16_linear(x, w, s, bias, None, dtype, **kw)
        paths["w8a16_rot16"] = lambda x, **kw: ti.w8a16_linear(x, w, s, bias, 16, dtype, **kw)
    return paths


def _tma(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
         low_rank: tuple | None = None, act: int = 0) -> torch.Tensor:
    """The Hopper TMA GEMM (host TensorDescriptors run in the 3.6 interpreter) with the same epilogue (int8 or
    fp8 ``w``: the activations quantized to match)."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant

    if w.dtype == torch.int8:
        q, sx = triton_quant.quantize_rows_int8(x, None, act=act)
    else:
        q, sx = triton_quant.quantize_rows_fp8(x, w.dtype, act=act)
    lr = None if low_rank is None else ti._low_rank_args(low_rank, x, sx)
    return ti.gemm_w8a8(q, sx, w, s, bias, dtype, tma=True, lr=lr)


def check_low_rank_epilogue() -> None:
    for i, (m, k, n, r, dtype, with_bias) in enumerate([(5, 64, 96, 8, F32, True), (70, 256, 80, 32, F32, False),
                                                        (1, 128, 64, 20, F16, True), (70, 256, 48, 40, F16, True)]):
        x, w, s = _case(m, k, n, 10 + i)
        x = x.to(dtype)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dtype) if with_bias else None
        down, up = _low_rank(r, k, n, dtype, 20 + i)
        term = (x.double() @ down.double().t()).to(dtype).double() @ up.double()
        bound = 1e-5 if dtype == F32 else 2**-9
        for name, f in _paths(w, s, bias, dtype, k, n, 30 + i).items():
            y0 = f(x).double()
            y1 = f(x, low_rank=(down, up)).double()
            e = rel(y1, y0 + term)
            missing = rel(y0, y0 + term)  # what the check would read if the epilogue added nothing
            record(f"low_rank_{name}", e <= bound < missing, m=m, k=k, n=n, rank=r, dtype=str(dtype), rel=e,
                   rel_without_term=missing)


def check_input_act() -> None:
    from comfyquant.runtime.kernels import reference, triton_quant
    from comfyquant.runtime.kernels.acts import act_code, apply_input_act

    cases = [(5, 128, 96, F32, ACTS), (70, 256, 48, F32, ("gelu_tanh",)), (9, 128, 40, F16, ("silu", "gelu_tanh"))]
    for i, (m, k, n, dtype, acts) in enumerate(cases):
        x, w, s = _case(m, k, n, 40 + i)
        x = x.to(dtype)
        for act in acts:
            code = act_code(act)
            xa = apply_input_act(x.float(), act)  # fp32, as the kernels compute it
            q, sx = triton_quant.quantize_rows_int8(x, act=code)
            qr, sr = reference.quantize_rows_int8(xa)
            record(f"act_quant_{act}", torch.equal(q, qr) and rel(sx, sr) <= 1e-6, m=m, k=k, dtype=str(dtype),
                   codes_differ=int((q != qr).sum()))
            r = triton_quant.rotate_rows(x, 16, act=code).double()
            r_ref = triton_quant.rotate_rows(xa.to(dtype), 16).double()
            bound = 1e-5 if dtype == F32 else 2**-8
            record(f"act_rotate_{act}", rel(r, r_ref) <= bound, m=m, k=k, dtype=str(dtype), rel=rel(r, r_ref))
            for name, f in _paths(w, s, None, dtype, k, n, 50 + i).items():
                y1 = f(x, act=code).double()
                # fp8 codes (3 mantissa bits) of act(x) rounded to fp16 first are another quantization of it
                # (the row scale moves, ties flip: ~1e-2 apart): the fp8 paths' oracle reads fp32 act(x) itself
                y0 = f(xa if name.startswith("fp8") else xa.to(dtype)).double()
                e = rel(y1, y0)
                # rotated int paths: the kernel's and torch's activation differ in the last fp32 bit, which the
                # butterflies can carry across a rounding tie of an int code (the rotation checks' 1-code slack)
                bound = 1e-5 if dtype == F32 else 2**-8
                if name in ("w8a8_rot16", "w4a8"):
                    bound = max(bound, 1e-3)
                unfused = rel(f(x).double(), y0)  # what the check would read if the activation were skipped
                record(f"act_{act}_{name}", e <= bound < unfused, m=m, k=k, n=n, dtype=str(dtype), rel=e,
                       rel_without_act=unfused)


def _check_gated(gated: str) -> None:
    """A gated activation (x [M, 2K] -> [M, K]: swiglu ``silu(first) * second``, geglu ``first * gelu(second)``,
    gated_gelu_tanh ``gelu_tanh(first) * second``) in the activation quantizers: int8 / fp8 codes of
    both activation kernels against the reference quantization of fp32 act(x) (a code may flip at a tie: the
    kernel's sigmoid and torch's silu differ in the last fp32 bit), rotations within their bound, the fusing
    linears (W8A8 int8 / fp8, W4A8) against themselves on fp32 act(x), their plans bit-equal to the general
    path, and the GEMMs that apply activations on A tiles (W8A16, one-launch fused) refusing it."""
    from comfyquant.quant.hadamard import fast_hadamard
    from comfyquant.runtime.kernels import reference, triton_quant
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp
    from comfyquant.runtime.kernels.acts import act_code, apply_input_act

    code = act_code(gated)

    for i, (m, k, dtype) in enumerate([(5, 64, F32), (70, 256, F16), (3, 1280, F16), (2, 9000, F32)]):
        x2 = (torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(60 + i)) * 2).to(dtype)
        xa = apply_input_act(x2.float(), gated)
        qr, sr = reference.quantize_rows_int8(xa)
        for kern in ("rows", "tiles", "blocks"):
            q, sx = triton_quant.quantize_rows_int8(x2, act=code, kernel=kern)
            _, n, ok = code_diff(q, qr)
            qn, _ = triton_quant.quantize_rows_int8(x2[:, :k].contiguous(), kernel=kern)  # the first half alone
            record(f"{gated}_int8_codes", ok and q.shape == (m, k) and rel(sx, sr) <= 1e-6 and not code_diff(qn, qr)[2],
                   m=m, k=k, dtype=str(dtype), kernel=kern, codes_differ=n)
            # fp8: against the same kernel on fp32 act(x) (the interpreter's fp8 cast is not torch's, see
            # check_interpreter_limitations): a last-bit difference of the activation may move a code one step
            f8, s8 = triton_quant.quantize_rows_fp8(x2, act=code, kernel=kern)
            f8r, s8r = triton_quant.quantize_rows_fp8(xa, kernel=kern)
            e = rel(f8.double() * s8.double(), f8r.double() * s8r.double())
            record(f"{gated}_fp8_codes", f8.shape == (m, k) and e <= 1e-3 and rel(s8, s8r) <= 1e-6, m=m, k=k,
                   kernel=kern, rel=e)
            if k % 64 == 0:  # rotated: the tile kernel rounds act(x) to x's dtype first (its product's input)
                qg, _ = triton_quant.quantize_rows_int8(x2, 64, act=code, kernel=kern)
                xr = xa.to(dtype) if kern == "tiles" else xa
                _, n, ok = code_diff(qg, reference.quantize_rows_int8(fast_hadamard(xr.double(), 64).float())[0])
                record(f"{gated}_int8_rot64_codes", ok, m=m, k=k, dtype=str(dtype), kernel=kern, codes_differ=n)
    # the fusing linears, and their plans
    m, k, n = 9, 128, 48
    x, w, s = _case(m, 2 * k, n, 70)
    w = w[:, :k].contiguous()
    w4, s4, g4 = _int4_rot(n, k, 71)
    w8, s8 = (w.float() * (448 / 127)).to(torch.float8_e4m3fn), s * (127 / 448)
    xa = apply_input_act(x.float(), gated)
    paths = {"w8a8": lambda v, **kw: ti.int8_linear(v, w, s, None, None, F32, **kw),
             "w8a8_rot16": lambda v, **kw: ti.int8_linear(v, w, s, None, 16, F32, **kw),
             "fp8_w8a8": lambda v, **kw: ti.fp8_linear(v, w8, s8, None, None, F32, **kw),
             "w4a8": lambda v, **kw: ti.w4a8_linear(v, w4, s4, None, g4, F32, **kw)}
    for name, f in paths.items():
        y1, y0 = f(x, act=code).double(), f(xa).double()
        e = rel(y1, y0)
        unfused = rel(f(x[:, :k].contiguous()).double(), y0)
        record(f"{gated}_{name}", y1.shape == (m, n) and e <= 1e-3 < unfused, rel=e, rel_without_act=unfused)
    for name, plan, general in (
            ("int8", tp.plan_int8(x, w, s, None, None, F32, code), paths["w8a8"]),
            ("int8_rot16", tp.plan_int8(x, w, s, None, 16, F32, code), paths["w8a8_rot16"]),
            ("fp8", tp.plan_fp8(x, w8, s8, None, F32, code), paths["fp8_w8a8"])):
        later = [torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(80 + j)) for j in range(2)]
        same = plan is not None and all(torch.equal(plan(v), general(v, act=code)) for v in later)
        record(f"{gated}_plan_{name}", same)
    for name, call in (("w8a16", lambda: ti.w8a16_linear(x.half(), w, s, None, None, F16, act=code)),
                       ("fused", lambda: ti.fused_linear(x, w, s, None, F32, act=code))):
        record_refused(f"{gated}_refused_{name}", call)


def check_gated() -> None:
    for gated in ("swiglu", "geglu", "gated_gelu_tanh"):
        _check_gated(gated)


GROUPS = {"low_rank_epilogue": check_low_rank_epilogue, "input_act": check_input_act, "gated": check_gated}
