"""Where a quantized layer's GPU time goes: every CUDA kernel each sweep column launches, with its time per call.

The sweep (``comfyquant bench``) gives a column's eager wall time and its graph time; when two columns that
should share a GEMM differ (run 69: convrot at 16,384 rows 1.08-1.25x the plain W8A8 layer's time, where its
rotating activation pass alone accounts for 3-5% of it), this names the kernels each one ran and their times
(``torch.profiler``, CUDA activity, the same bound layers and cycled weight sets as the sweep).

    python benchmarks/profile_layers.py --out /tmp/prof --shapes flux.qkv,flux.mlp2 --m 4096,16384

Columns: bf16, the int8 layer (auto and the W8A8 backend pinned), convrot, and int4_rot as dispatched and on
each of its three paths pinned (W4A8, unpacked + W8A8, weight-only); then the W8A8 GEMM alone on codes quantized
beforehand, plain and rotated, and each operand's codes crossed with the other's (``gemm_*``: whether a GEMM's
time follows its data). Every column's SM clock and power while its wall time was taken ride along
(``comfyquant.bench.gpu_clocks``, from ``nvidia-smi``): a card at its power limit slows on high-entropy operands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.bench.gpu_clocks import ClockSampler
from comfyquant.bench.layers import SHAPES, _bound, _cycling, _int4_rot, wall_us
from comfyquant.quant.hadamard import choose_group_size, rotate_weight
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels.triton_int8 import gemm_w8a8
from comfyquant.runtime.kernels.triton_quant import quantize_rows_int8


def _ops(group: int) -> dict:
    return {
        "bf16": lambda x, w: F.linear(x, w[0], w[7]),
        "auto": _bound("int8", 1, (2,)),
        "w8a8_triton": _bound("int8", 1, (2,), backend="triton"),
        "w8a8_convrot": _bound("int8", 3, (4,), opts=(group,)),
        "w4a8": _bound("int4_rot", 8, (9,), opts=(group,)),  # the dispatcher's int4 path, and each pinned:
        "int4_w4a8": _bound("int4_rot", 8, (9,), opts=(group,), backend="triton"),
        "int4_unpacked": _bound("int4_rot", 8, (9,), opts=(group,), backend="triton_unpacked"),
        "int4_w4a16": _bound("int4_rot", 8, (9,), opts=(group,), backend="triton_w4a16"),
    }


def _gemm_ops(xs: list[torch.Tensor], group: int) -> dict:
    """The W8A8 GEMM alone on x's codes made beforehand (plain and rotated), with the plain / rotated weight codes
    (weight-set slots 1-2 / 3-4): ``gemm_plain`` and ``gemm_rot`` are the layers' GEMMs; the crossed two tell x's
    data from the weight's."""
    plain = {id(x): quantize_rows_int8(x, None) for x in xs}
    rot = {id(x): quantize_rows_int8(x, group) for x in xs}

    def gemm(codes: dict, wi: int):
        return lambda x, w: gemm_w8a8(*codes[id(x)], w[wi], w[wi + 1], w[7], torch.bfloat16)

    return {"gemm_plain": gemm(plain, 1), "gemm_rot": gemm(rot, 3),
            "gemm_rot_x_plain_w": gemm(rot, 1), "gemm_plain_x_rot_w": gemm(plain, 3)}


def _weights(k: int, n: int, sets: int, group: int) -> list[tuple]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(k * 131 + n)
    out = []
    for _ in range(sets):
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        q, s = quantize_rowwise(w)
        qr, sr = quantize_rowwise(rotate_weight(w, group))
        q4, s4 = _int4_rot(w, group)
        out.append((w.bfloat16(), q, s, qr, sr, None, None, torch.randn(n, device=dev).bfloat16(), q4, s4))
    return out


def profile_shape(k: int, n: int, m: int, calls: int, clocks: ClockSampler) -> dict[str, list[dict]]:
    """Column -> eager wall µs per call (weights cycled), its kernels [{kernel, µs and launches per call}] in
    order of their total time, the CUDA runtime calls other than launches (count and host µs per call), and the
    clock window of its wall timing (summarized by :func:`main` once the sampler stops)."""
    group = choose_group_size(k)
    sets = 4
    weights = _weights(k, n, sets, group)
    xs = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(2)]
    pairs = [(xs[i % 2], weights[i % sets]) for i in range(sets)]
    res = {}
    for name, op in {**_ops(group), **_gemm_ops(xs, group)}.items():
        for _ in range(3):
            for p in pairs:
                op(*p)
        torch.cuda.synchronize()
        wall, win = clocks.window(partial(wall_us, _cycling(op, pairs), min_ms=100.0))  # ~15 samples at 20 ms
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(calls):
                op(*pairs[i % len(pairs)])
            torch.cuda.synchronize()
        per: dict[str, list[float]] = defaultdict(list)
        host: dict[str, list[float]] = defaultdict(list)  # CUDA runtime / driver calls: syncs, copies, mallocs
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name].append(ev.device_time)
            elif ev.name.startswith(("cuda", "cu")) and "LaunchKernel" not in ev.name:
                host[ev.name].append(ev.cpu_time)
        rows = [{"kernel": kname[:120], "us": sum(v) / calls, "launches": len(v) / calls} for kname, v in per.items()]
        res[name] = {"wall_us": wall, "kernels": sorted(rows, key=lambda r: -r["us"]),
                     "runtime_calls": {h: [len(v) / calls, sum(v) / calls] for h, v in host.items()}, "clock": win}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="flux.qkv,flux.proj,flux.mlp2")
    p.add_argument("--m", default="1024,4096,16384")
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = []
    with ClockSampler(torch.cuda.current_device()) as clocks:
        for spec in a.shapes.split(","):
            k, n = next((k, n) for mo, la, k, n in SHAPES if f"{mo}.{la}" == spec)
            for m in (int(v) for v in a.m.split(",")):
                cols = profile_shape(k, n, m, a.calls, clocks)
                result.append({"shape": spec, "k": k, "n": n, "m": m, "columns": cols})
                for name, col in cols.items():
                    rows = col["kernels"]
                    total = sum(r["us"] for r in rows)
                    parts = "; ".join(f"{r['kernel'][:40]} {r['us']:.1f}us x{r['launches']:.0f}" for r in rows[:3])
                    rt = " ".join(f"{h}x{c:.1f}:{t:.0f}us" for h, (c, t) in col["runtime_calls"].items())
                    print(f"{spec:10s} M={m:6d} {name:18s} wall {col['wall_us']:7.1f} gpu {total:7.1f}us  {parts} | "
                          f"{rt}", flush=True)
    # the clock windows, complete now that the sampler has stopped
    for entry in result:
        for name, col in entry["columns"].items():
            col["clock"] = c = col["clock"].summary()
            mhz = "-" if c["sm_mhz"] is None else f"{c['sm_mhz']:.0f} MHz {c['power_w']:.0f} W"
            print(f"{entry['shape']:10s} M={entry['m']:6d} {name:18s} clock {mhz} ({c['samples']} samples)")
    if clocks.reason:
        print(f"clocks: {clocks.reason}")
    (out / "profile_layers.json").write_text(json.dumps({"clocks": clocks.reason or "nvidia-smi", "rows": result},
                                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
