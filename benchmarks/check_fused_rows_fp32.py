"""The one-launch W8A8 path from 64 rows (``triton_gemm.fused_rows``) on fp32 and fp16 activations (ComfyUI runs
T5 in fp32): its output against the two-launch path's, bit for bit, on the first launch, a second launch, its plan
and a CUDA-graph replay of the plan, with and without an input activation; the relative error against float64
(the activated input times the dequantized weight) for scale. Exit 1 on any mismatch.

    PYTHONPATH=. python3 benchmarks/check_fused_rows_fp32.py      # a CUDA GPU
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

CASES = [(256, 4096, 4096, torch.float32, 0), (77, 4096, 4096, torch.float32, 0), (256, 4096, 4096, torch.float32, 1),
         (1000, 768, 3072, torch.float32, 0), (300, 15360, 3072, torch.float32, 0), (256, 1280, 1280, torch.float16, 3),
         (64, 640, 640, torch.float32, 0)]
ACTS = {0: lambda x: x, 1: lambda x: F.gelu(x, approximate="tanh"), 3: F.silu}


def main() -> int:
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp

    t0, ok = time.time(), True
    for m, k, n, dt, act in CASES:
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = quantize_rowwise(w)
        b = torch.randn(n, device="cuda").to(torch.bfloat16)
        x = (torch.randn(m, k, device="cuda") * 3).to(dt)
        x[0, 5] = 50
        two = ti.int8_linear(x, q, s, b, None, dt, act=act)
        one, again = ti.fused_linear(x, q, s, b, dt, act=act), ti.fused_linear(x, q, s, b, dt, act=act)
        plan = tp.plan_fused(x, q, s, b, dt, act)
        planned = plan(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphed = plan(x)
        g.replay()
        torch.cuda.synchronize()
        ref = ACTS[act](x.double()) @ (q.double() * s.double().reshape(-1, 1)).t() + b.double()
        rel = float((one.double() - ref).norm() / ref.norm())
        same = [torch.equal(one, two), torch.equal(again, two), torch.equal(planned, two), torch.equal(graphed, two)]
        ok &= all(same)
        print(m, k, n, dt, act, "row-block" if ti.rows_apply(m, n, k, x.device) else "thin-M", same,
              f"rel {rel:.3e}", flush=True)
    print("ALL_OK" if ok else "MISMATCH", round(time.time() - t0, 1), "s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
