"""Interpreter checks of the cooperative one-launch W8A8 kernel (``runtime.kernels.triton_coop``).

Oracle: the two-launch path (``triton_int8.int8_linear``: the activation kernel, then the GEMM) on the same
input. The cooperative kernel quantizes with the activation kernel's own helpers and runs the same int32 GEMM
and epilogue, so its output must be bit-equal; and within the GPU's float64 bound. The interpreter runs one
program (it runs programs one after another, so a second would wait at the barrier for ever): the barrier's
multi-program behaviour is checked on the GPU (``benchmarks/check_kernels_gpu.py``, ``check_coop``).
"""

from __future__ import annotations

import torch
from triton_interp import record

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def check_coop() -> None:
    from triton_interp_checks import _LINEAR_CASES, _bound64, _cfgs, _fused_case  # it imports this module

    from comfyquant.runtime.kernels import scratch, triton_int8

    cases = [c for c in _LINEAR_CASES if c[-1] is None] + [(3, 1000, 40, BF16, BF16, True, "row", None),
                                                            (37, 96, 130, F16, F16, False, "row", None)]
    for i, case in enumerate(cases):
        x, w, q, s, b, info = _fused_case(case, seed=900 + i)
        odt = case[4]
        want = triton_int8.int8_linear(x, q, s, b, None, odt)
        for cfg in _cfgs():
            y = triton_int8.coop_linear(x, q, s, b, odt, cfg=cfg)
            e, bound = _bound64(y, x, w, b, q.double() * s.double())
            record("coop_linear", y.dtype == odt and torch.equal(y, want) and e <= bound, rel=e, bound=bound,
                   cfg=str(cfg), **info)
    # the barrier word pair after these launches: every arrival count reset, one generation per launch (no
    # host reset between launches, whatever their grid size)
    counter = scratch.pool(torch.device("cpu")).barrier(0)
    record("coop_barrier_counter", int(counter[0]) == 0 and int(counter[1]) == len(cases) * len(_cfgs()),
           counter=counter.tolist())


def check_coop_fusions() -> None:
    """A 3-D input, an elementwise input activation applied as x is quantized, and a dynamic LoRA's low-rank
    term in the epilogue: bit-equal to the two-launch path with the same fusions."""
    from comfyquant.runtime.kernels import triton_int8
    from comfyquant.runtime.kernels.acts import INPUT_ACTS

    g = torch.Generator().manual_seed(17)
    k, n = 128, 80
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g).to(F16)
    x = (torch.randn(2, 9, k, generator=g) * 2).to(F16)
    for name in ("gelu_tanh", "silu"):
        act = INPUT_ACTS[name]
        want = triton_int8.int8_linear(x, q, s, b, None, F16, act=act)
        y = triton_int8.coop_linear(x, q, s, b, F16, act=act)
        record("coop_input_act", y.shape == (2, 9, n) and torch.equal(y, want), act=name)
    down = (torch.randn(16, k, generator=g) * 0.05).to(F16)
    up = (torch.randn(16, n, generator=g) * 0.05).to(F16)
    want = triton_int8.int8_linear(x, q, s, b, None, F16, low_rank=(down, up, 12))
    y = triton_int8.coop_linear(x, q, s, b, F16, low_rank=(down, up, 12))
    record("coop_low_rank", torch.equal(y, want), max_diff=float((y.float() - want.float()).abs().max()))
    from comfyquant.runtime.kernels import triton_plans

    plan = triton_plans.plan_coop(x, q, s, b, F16, low_rank=(down, up, 12))
    x2 = (torch.randn(2, 9, k, generator=g) * 2).to(F16)
    got = plan(x2) if plan is not None else None
    record("coop_plan_low_rank", got is not None and torch.equal(
        got, triton_int8.int8_linear(x2, q, s, b, None, F16, low_rank=(down, up, 12))))
    try:
        triton_int8.coop_linear(torch.zeros(3, 2 * k, dtype=F16), q, s, b, F16, act=INPUT_ACTS["swiglu"])
        record("coop_refuses_gated_act", False)
    except ValueError as e:
        record("coop_refuses_gated_act", "elementwise" in str(e), error=str(e))


GROUPS = {"coop": check_coop, "coop_fusions": check_coop_fusions}
