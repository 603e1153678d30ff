"""Where a whole model's GPU time goes: kernel time per category (linear GEMMs, activation quantization,
attention, everything else) from the CUDA profiler, and what that leaves reachable.

The whole-model targets of issue 12 are ratios of a model's time; quantization only speeds up its linear layers.
The Amdahl ceiling of a model (its time if every linear ran ``x`` times faster than bf16's linears, the rest
unchanged) says which targets linear-layer work can still reach and which need attention or the rest as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

CATEGORIES = ("linear", "act_quant", "attention", "other")

_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|attn", re.I)
# comfyquant's activation kernels (triton_quant) and torch's fp8 cast kernels are the quantizers of the input
_ACT_QUANT = re.compile(r"^_act_kernel|^_act_tile_kernel|^input_act", re.I)
# cuBLAS / cuBLASLt (nvjet, xmma, gemm, cutlass), comfyquant's Triton GEMMs, comfy-kitchen's int8 GEMM
_LINEAR = re.compile(r"gemm|nvjet|cutlass|xmma|matmul|splitk|^w8a8|^w8a16|^w4a8|^fused$|^dequant$|int8_linear|"
                     r"wgmma|sm90_|sm80_", re.I)


def category(kernel: str) -> str:
    """The category of one CUDA kernel name (attention checked first: FMHA kernels carry 'cutlass' too)."""
    if _ATTENTION.search(kernel):
        return "attention"
    if _ACT_QUANT.search(kernel):
        return "act_quant"
    if _LINEAR.search(kernel):
        return "linear"
    return "other"


@dataclass
class Breakdown:
    """GPU kernel time of one forward by category (µs), the eager wall time of one forward and the top
    kernels by time (name, µs per forward)."""

    us: dict[str, float]
    wall_us: float = float("nan")
    top: list[tuple[str, float]] = field(default_factory=list)

    @property
    def gpu_us(self) -> float:
        """Sum of kernel time per forward (one stream: the GPU's busy time)."""
        return sum(self.us.values())

    @property
    def host_gap_us(self) -> float:
        """Eager wall time not covered by kernels (the host-bound part of a forward)."""
        return self.wall_us - self.gpu_us


def summarize(kernels: list[tuple[str, float]], forwards: int, wall_us: float = float("nan"),
              top: int = 8) -> Breakdown:
    """(kernel name, µs) events of ``forwards`` forwards -> per-forward :class:`Breakdown`."""
    us = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[str, float] = {}
    for name, t in kernels:
        us[category(name)] += t / forwards
        per_name[name] = per_name.get(name, 0.0) + t / forwards
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return Breakdown(us=us, wall_us=wall_us, top=[(n[:90], t) for n, t in ranked])


def ceiling(base: Breakdown, linear_speedup: float) -> float:
    """The model's GPU-time ratio to ``base`` (bf16) if its linears (GEMMs and any activation quantization) took
    ``1 / linear_speedup`` of bf16's linear time and everything else stayed as in ``base``."""
    lin = base.us["linear"] + base.us["act_quant"]
    rest = base.gpu_us - lin
    return base.gpu_us / (rest + lin / linear_speedup)


def linear_speedup(base: Breakdown, quant: Breakdown) -> float:
    """bf16's linear time over the quantized model's (GEMMs plus activation quantization)."""
    return (base.us["linear"] + base.us["act_quant"]) / (quant.us["linear"] + quant.us["act_quant"])


def profile(fn: Callable[[], object], forwards: int = 5, warmup: int = 3) -> Breakdown:
    """Run ``fn`` (one forward) under the CUDA profiler and sum its kernels by category (GPU only); the wall
    time is of ``forwards`` back-to-back calls alone (a benchmark comparing variants times them in turns)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(forwards):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e6 / forwards
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(forwards):
                fn()
            torch.cuda.synchronize()
    events = [(e.name, e.device_time) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    return summarize(events, forwards, wall)


def markdown(rows: list[dict]) -> str:
    """Table of rows ``{"model", "variant", "breakdown": Breakdown, "linear_x", "ceil_1.6", "ceil_2"}``."""
    lines = ["| model | variant | wall µs | GPU µs | linear µs | act quant µs | attention µs | other µs | "
             "linears × bf16 | ceiling at 1.6x linears | at 2x |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b: Breakdown = r["breakdown"]
        extra = " | ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("linear_x", "ceil_1.6", "ceil_2"))
        lines.append(f"| {r['model']} | {r['variant']} | {b.wall_us:.0f} | {b.gpu_us:.0f} | {b.us['linear']:.0f} | "
                     f"{b.us['act_quant']:.0f} | {b.us['attention']:.0f} | {b.us['other']:.0f} | {extra} |")
    return "\n".join(lines) + "\n"
