# ruff: noqa: B023  (lambdas are timed inside the loop iteration that defines them)
"""The Python part of the eager host time per quantized linear, on the CPU, with every kernel launch stubbed.

What a layer costs the host besides the C launchers: the module call, the bound dispatch (checks and choice
memoized), and each Triton path's own Python (output allocation, tile config, specialization key). Kernels
are NOT launched (``FastKernel.__call__`` is replaced by a no-op), so this is a lower bound of the host time a
GPU host pays per call, and a regression detector for the Python layers; needs the triton package (no GPU).

    python benchmarks/host_python.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere


def best_us(fn: Callable[[], object], calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def _modulated_site() -> dict[str, float]:
    """A DiT block's modulated-norm site (``runtime.modulation``) above the kernel: the folded call (buffer refill,
    ``normed``, the dispatch with its kept verdict, a plan returning a constant) against ComfyUI's torch norm
    (``layer_norm``, ``1 + scale``, ``addcmul``) before the same stubbed layer. The torch ops run on the CPU on
    tiny tensors, so each costs about its dispatch: what the fold saves per site, in host time, less its Python."""
    try:
        from comfyquant.runtime.modulation import ModulationSite, modulated_linear
    except ImportError:  # a tree from before the fold
        return {}
    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.kernels.acts import layer_mod
    from comfyquant.runtime.nn import bound_linear

    k = n = 64
    x = torch.randn(1, 16, k).bfloat16()
    shift, scale = torch.randn(1, 1, k).bfloat16(), torch.randn(1, 1, k).bfloat16()
    net = nn.Sequential(nn.Linear(k, n).bfloat16())
    quantize_(net, QuantizeConfig(format="int8", min_features=1))
    layer, site = net[0], ModulationSite(1e-6)
    with torch.no_grad():
        modulated_linear(layer, x, shift, scale, 1e-6, site)
        layer(layer_mod(x, shift, scale, 1e-6))
        call = bound_linear(layer.qweight, layer.bias)
        _stub_call(call, n, torch.bfloat16)  # plans returning a constant
        for e in call.memo.values():
            if len(e) > 3:
                e[3] = True  # the verdict a folding kernel gets (the CPU's reference backend folds nothing)
        return {
            "modulated site, folded (above the kernel)": best_us(
                lambda: modulated_linear(layer, x, shift, scale, 1e-6, site, checked=True)),
            "modulated site, torch norm first (above the kernel)": best_us(
                lambda: layer(layer_mod(x, shift, scale, 1e-6))),
        }


def _stub_call(call: Callable, out_rows: int, dtype: torch.dtype) -> None:
    """A bound call (``dispatch.bind_linear``'s) whose every signature replays a plan returning a constant of the
    signature's output shape: its memo's plans, and its plain signatures' (``call.hot``, in trees that have it),
    as a GPU's plans would be after the first call (the CPU's reference backend makes none)."""
    hot = getattr(call, "hot", None)
    try:
        from comfyquant.runtime.kernels.dispatch import plain_key
    except ImportError:  # a tree from before it (comparisons across commits): its signature's layout
        def plain_key(sig: tuple) -> tuple | None:
            return (*sig[:3], sig[4]) if sig[3] is False and sig[5:] == (None, 0) else None
    for sig, e in call.memo.items():
        e[1] = (lambda o: (lambda x: o))(torch.zeros(*sig[0][:-1], out_rows, dtype=dtype))
        key = plain_key(sig) if hot is not None else None
        if key is not None:  # a plain signature: the hot table holds its plan too
            hot[key] = (e[1], -1)


def _stub_memos(weights: list, dtype: torch.dtype) -> None:
    """Every bound call of these weights (``QuantizedTensor``s) stubbed by :func:`_stub_call`."""
    for w in weights:
        bound = getattr(w, "_comfyquant_bound", None)
        if bound is not None:
            _stub_call(bound[1], int(w.shape[0]), dtype)


def _sibling_group() -> dict[str, float]:
    """Three sibling projections (q / k / v on one input) above the kernel: one fused GEMM per call
    (``runtime.siblings``: arming, the members' checks, the split into views) against three separate layers,
    every plan stubbed. The fused call saves two layers' launches on the GPU, which this does not count."""
    try:
        from comfyquant.runtime.siblings import _FUSED_ATTR, fuse_sibling_projections
    except ImportError:
        return {}
    import copy

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.nn import QuantLinear

    class Attention(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.q(x), self.k(x), self.v(x)

    x = torch.randn(1, 16, 64).bfloat16()
    separate = Attention(64).bfloat16()
    quantize_(separate, QuantizeConfig(format="int8", min_features=1))
    fused = copy.deepcopy(separate)
    if not fuse_sibling_projections(fused):
        return {}
    with torch.no_grad():
        for _ in range(4):  # the group learns its plan, then consolidates
            separate(x), fused(x)
        for model in (separate, fused):
            ws = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
            ws += [f.weight for f in {getattr(w, _FUSED_ATTR, None) for w in ws} if f is not None]
            _stub_memos(ws, torch.bfloat16)
        return {"q / k / v as three layers (above the kernel)": best_us(lambda: separate(x)),
                "q / k / v as one fused sibling group (above the kernel)": best_us(lambda: fused(x))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.launch import FastKernel

    FastKernel.__call__ = lambda self, grid, args, device, **kw: None  # type: ignore[method-assign]
    try:  # the eager plans (triton_plans): their launchers stubbed the same way
        from comfyquant.runtime.kernels import triton_plans as tp

        FastKernel.prepared = lambda self, grid, args, **kw: (lambda stream, *a: None)  # type: ignore[method-assign]
    except ImportError:  # a tree from before the plans (comparisons across commits)
        tp = None
    torch.set_num_threads(1)
    res: dict[str, float] = {}
    for m, k, n in ((1, 256, 256), (1024, 3072, 3072)):
        x = torch.randn(m, k).bfloat16()
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s = torch.rand(n, 1)
        b = torch.randn(n).bfloat16()
        q, sx = tq.quantize_rows_int8(x)
        tag = f"{m}x{k}x{n}"
        res[f"int8_linear {tag}"] = best_us(lambda: ti.int8_linear(x, w, s, b, None, torch.bfloat16))
        res[f"  quantize_rows_int8 {tag}"] = best_us(lambda: tq.quantize_rows_int8(x))
        res[f"  gemm_w8a8 {tag}"] = best_us(lambda: ti.gemm_w8a8(q, sx, w, s, b, torch.bfloat16))
        res[f"fused_linear {tag}"] = best_us(lambda: ti.fused_linear(x, w, s, b, torch.bfloat16))
        res[f"w8a16_linear {tag}"] = best_us(lambda: ti.w8a16_linear(x, w, s, b, None, torch.bfloat16))
        if tp is not None:
            for name, plan in (("int8_linear", tp.plan_int8(x, w, s, b, None, torch.bfloat16)),
                               ("fused_linear", tp.plan_fused(x, w, s, b, torch.bfloat16)),
                               ("w8a16_linear", tp.plan_w8a16(x, w, s, b, torch.bfloat16))):
                res[f"{name} planned {tag}"] = best_us(lambda: plan(x))
        res[f"torch.empty {tag}"] = best_us(lambda: torch.empty((m, n), dtype=torch.bfloat16))
        # the module layers above the kernel: QuantLinear -> bound call -> impl (impl replaced by a constant)
        try:
            from comfyquant.runtime.nn import bound_linear
        except ImportError:  # a tree from before the bound fast path (comparisons across commits)
            continue
        lin = nn.Linear(k, n).bfloat16()
        net = nn.Sequential(lin)
        quantize_(net, QuantizeConfig(format="int8", min_features=1))
        out = torch.zeros(m, n, dtype=torch.bfloat16)
        with torch.no_grad():
            net(x)
            fn = bound_linear(net[0].qweight, net[0].bias)
            plans = getattr(fn, "memo", None)
            if plans is not None:  # [backend, plan] per signature: a plan that returns a constant
                _stub_call(fn, n, torch.bfloat16)
            else:
                plans = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, dict))
                for key, backend in plans.items():
                    plans[key] = type(backend)(lambda *args, **kw: out)
            res[f"QuantLinear above the kernel {tag}"] = best_us(lambda: net[0](x))
            if plans is not None:  # the bound call alone: what the per-layer sweep's auto column calls
                res[f"  bound call above the kernel {tag}"] = best_us(lambda: fn(x))
            try:  # the node pack's layer (the ModelPatcher protocol on top), the same weight, bias and stub
                from comfyquant.nodes.ops import ComfyQuantLinear
            except ImportError:
                continue
            node_layer = ComfyQuantLinear.wrap(net[0].qweight, net[0].bias)  # (its own bias Parameter: bound anew)
            node_layer(x)
            _stub_memos([node_layer.qweight], torch.bfloat16)
            res[f"ComfyQuantLinear above the kernel {tag}"] = best_us(lambda: node_layer(x))
            # the same layer with a folded input activation (SDXL's GEGLU down projection, Flux's MLP output)
            node_layer.input_act = "gelu_tanh"
            node_layer(x)
            _stub_memos([node_layer.qweight], torch.bfloat16)
            res[f"  ComfyQuantLinear with an input activation {tag}"] = best_us(lambda: node_layer(x))
            node_layer.input_act = None
    res.update(_modulated_site())
    res.update(_sibling_group())
    ident = nn.Identity()
    res["an nn.Module call (nn.Identity), for scale"] = best_us(lambda: ident(x))
    for key, v in res.items():
        print(f"{key:55s} {v:7.2f} µs")
    if a.json:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/host_python.py"}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "us": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
