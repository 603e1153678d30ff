
"""Interpreter checks of ``int4_rot`` on the W8A8 GEMM (``runtime.kernels.triton_unpack``): the unpack kernel
against the torch codec, the layer bit-equal to the W4A8 kernel (and to the integer reference's epilogue) with
input activations and low-rank terms, its eager plan, and the shared workspace growing under a plan."""

from __future__ import annotations

import torch
from triton_interp import record

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 4 + 0.25)
    x[0, min(5, k - 1)] = 25.0  # an outlier: the row's absmax
    return x.to(dtype)


def _packed(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from comfyquant.quant.int4 import pack_int4

    g = torch.Generator().manual_seed(seed)
    return pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)), torch.rand(n, generator=g) * 0.01 + 1e-3


def _low_rank(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A rank-8 low-rank term padded to 16 rows (a dynamic LoRA as the kernels take it), fp16."""
    gen = torch.Generator().manual_seed(seed)
    down, up = torch.zeros(16, k), torch.zeros(16, n)
    down[:8], up[:8] = torch.randn(8, k, generator=gen) * 0.1, torch.randn(8, n, generator=gen) * 0.1
    return down.to(F16), up.to(F16), 8


def check_unpack_kernel() -> None:
    from comfyquant.quant.int4 import unpack_int4
    from comfyquant.runtime.kernels import triton_unpack as tu

    for n, k in ((1, 16), (33, 80), (70, 384), (64, 600)):  # rows and packed bytes past one program's tile
        packed, _ = _packed(n, k, seed=n + k)
        out = torch.full((n, k), 99, dtype=torch.int8)
        tu.unpack_int4_into(packed, out)
        record("unpack_int4", torch.equal(out, unpack_int4(packed)), n=n, k=k)
    # a packed view with a row stride past its width (a slice of a wider tensor): read in place
    wide, _ = _packed(20, 96, seed=3)
    view = wide[:, :40]
    out = torch.empty(20, 80, dtype=torch.int8)
    record("unpack_int4_strided_rows", torch.equal(tu.unpack_int4_into(view, out), unpack_int4(view.contiguous())))


def check_unpacked_linear() -> None:
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_unpack as tu

    cases = [(5, 128, 48, BF16, BF16, True, 16, 0), (70, 256, 40, F16, F32, False, 64, 0),
             (3, 320, 33, BF16, F16, True, 64, 0),  # K a multiple of 64, not of 128
             (5, 128, 48, F16, F16, True, 16, 3),  # silu folded into the rotating quantizer
             (5, 128, 48, F16, F16, False, 16, 4)]  # swiglu: x holds 2K columns
    for i, (m, k, n, dt, odt, has_b, g, act) in enumerate(cases):
        packed, sw = _packed(n, k, seed=40 + i)
        b = torch.randn(n, generator=torch.Generator().manual_seed(50 + i)).to(BF16) if has_b else None
        x = _x(m, 2 * k if act == 4 else k, dt, seed=60 + i)
        want = ti.w4a8_linear(x, packed, sw, b, g, odt, act=act)
        y = tu.w4_unpacked_linear(x, packed, sw, b, g, odt, act=act)
        record("w4_unpacked_equals_w4a8", y.dtype == odt and torch.equal(y, want), m=m, k=k, n=n, x=str(dt),
               out=str(odt), bias=has_b, convrot=g, act=act)
    # a low-rank term (a dynamic LoRA) in the GEMM epilogue, as the W4A8 kernel adds it
    m, k, n, g = 5, 128, 48, 16
    packed, sw = _packed(n, k, seed=70)
    lr = _low_rank(k, n, seed=71)
    x = _x(m, k, F16, seed=72)
    y = tu.w4_unpacked_linear(x, packed, sw, None, g, F16, low_rank=lr)
    record("w4_unpacked_low_rank_equals_w4a8", torch.equal(y, ti.w4a8_linear(x, packed, sw, None, g, F16,
                                                                             low_rank=lr)))


def check_unpacked_plan() -> None:
    from comfyquant.runtime.kernels import scratch
    from comfyquant.runtime.kernels import triton_unpack as tu

    packed, sw = _packed(48, 128, seed=80)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(81)).to(F16)
    xs = [_x(5, 128, F16, seed=82 + i) for i in range(3)]
    for act in (0, 3):
        tu.w4_unpacked_linear(xs[0], packed, sw, bias, 16, F16, act=act)  # the first call compiles (GPU)
        plan = tu.plan_w4_unpacked(xs[0], packed, sw, bias, 16, F16, act)
        outs = [plan(x) for x in xs[1:]] if plan is not None else []
        same = plan is not None and all(torch.equal(o, tu.w4_unpacked_linear(x, packed, sw, bias, 16, F16, act=act))
                                        for o, x in zip(outs, xs[1:], strict=True))
        fresh = len(outs) == 2 and outs[0].data_ptr() != outs[1].data_ptr()
        record("w4_unpacked_plan", same and fresh, act=act, planned=plan is not None)
    # a larger layer grows the shared buffer; the small layer's plan keeps (and still reads) the one it was made on
    plan = tu.plan_w4_unpacked(xs[0], packed, sw, bias, 16, F16, 0)
    ws = scratch.weight_workspace(xs[0].device)
    before = ws.retired_bytes()
    big, sbig = _packed(96, 512, seed=90)
    xb = _x(5, 512, F16, seed=91)
    yb = tu.w4_unpacked_linear(xb, big, sbig, None, 64, F16)
    from comfyquant.runtime.kernels import triton_int8 as ti

    after = plan(xs[2]) if plan is not None else None
    record("w4_unpacked_workspace_grows_under_a_plan",
           ws.retired_bytes() > before and torch.equal(yb, ti.w4a8_linear(xb, big, sbig, None, 64, F16))
           and after is not None and torch.equal(after, ti.w4a8_linear(xs[2], packed, sw, bias, 16, F16)),
           retired=ws.retired_bytes())


def check_w4a16() -> None:
    """The weight-only kernel on packed int4 (``packed=True``): the same tiles, K steps and float sums as on the
    unpacked int8 codes, so bit-equal to that path (rotation, split K, a folded activation, a low-rank term),
    and its plan (the rotation pass into scratch, then the packed weight-only launch) equal to the general path."""
    from comfyquant.quant.int4 import unpack_int4
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import TileConfig

    cases = [(1, 256, 48, 16, 0, None), (5, 512, 40, 64, 0, None), (16, 384, 33, 16, 3, None),
             (1, 1024, 64, 256, 0, TileConfig(16, 32, 128, 4, 2, 1, split_k=4)),  # K split over 4 programs
             (3, 320, 40, 64, 0, TileConfig(16, 32, 128, 4, 2, 1))]  # K not a multiple of the K step
    for i, (m, k, n, g, act, cfg) in enumerate(cases):
        packed, sw = _packed(n, k, seed=100 + i)
        b = torch.randn(n, generator=torch.Generator().manual_seed(110 + i)).to(F16)
        x = _x(m, k, F16, seed=120 + i)
        y = ti.w8a16_linear(x, packed, sw, b, g, F16, cfg=cfg, act=act, packed=True)
        want = ti.w8a16_linear(x, unpack_int4(packed), sw, b, g, F16, cfg=cfg, act=act)
        record("w4a16_equals_w8a16_on_codes", torch.equal(y, want), m=m, k=k, n=n, convrot=g, act=act, cfg=str(cfg))
    m, k, n, g = 2, 256, 48, 16
    packed, sw = _packed(n, k, seed=130)
    lr = _low_rank(k, n, seed=131)
    x = _x(m, k, F16, seed=132)
    record("w4a16_low_rank", torch.equal(ti.w8a16_linear(x, packed, sw, None, g, F16, low_rank=lr, packed=True),
                                         ti.w8a16_linear(x, unpack_int4(packed), sw, None, g, F16, low_rank=lr)))
    # the plan through the backend table: made from one input, equal to the general path on others
    xs = [_x(4, k, F16, seed=140 + j) for j in range(3)]
    for act in (0, 3):
        general = builtin._int4_w4a16(xs[0], packed, (sw,), None, (g,), F16, act=act)
        plan = builtin._plan_int4_w4a16(xs[0], packed, (sw,), None, (g,), F16, act)
        outs = [plan(x) for x in xs[1:]] if plan is not None else []
        same = plan is not None and all(torch.equal(o, builtin._int4_w4a16(x, packed, (sw,), None, (g,), F16, act=act))
                                        for o, x in zip(outs, xs[1:], strict=True))
        record("w4a16_plan", same and general.shape == (4, n), act=act, planned=plan is not None)
    try:
        ti.w8a16_linear(xs[0], packed[:, :-1], sw, None, None, F16, packed=True)
        record("w4a16_wrong_width_refused", False)
    except ValueError as e:
        record("w4a16_wrong_width_refused", "does not hold" in str(e))


GROUPS = {"unpack_kernel": check_unpack_kernel, "unpacked_linear": check_unpacked_linear,
          "unpacked_plan": check_unpacked_plan, "w4a16": check_w4a16}
