"""The weight-only (W8A16) GEMM at 256-4,096 rows on the narrow layers where every W8A8 path loses to bf16.

The sweep's 16 rows under 0.97x (run 93) are SDXL / CLIP layers 640-3,072 wide (and Flux proj at 256 rows) where
bf16's call is a 7-28 µs GEMM and the W8A8 layer pays an activation pass (read the bf16 rows, write and re-read
their int8 codes) its GEMM cannot win back (run 94: SDXL attn 640 x 4,096 rows bf16 7.3 µs, the int8 layer
12.3). A weight-only GEMM has no activation pass and one launch: the question is whether its tiles at these row
counts (today ``small_m_config``'s 16-64-row tiles, made for 1-255 rows) can run near cuBLAS bf16's GPU time.
For each shape: cuBLAS bf16, the weight-only kernel with today's config and with wider candidate tiles, GPU time
of CUDA-graph replays (weights and inputs cycled past L2) and the eager wall time of the plain call; every
candidate's output against a float64 reference.

    python benchmarks/bench_w8a16_large_m.py --out results/      # a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, K, N, rows): the sweep's misses on bf16's host floor first, then GPU-bound ones
CASES = [("sdxl.attn640", 640, 640, 4096), ("sdxl.attn1280", 1280, 1280, 1024), ("clip.attn", 768, 768, 4096),
         ("clip.fc1", 768, 3072, 1024), ("clip.fc2", 3072, 768, 1024), ("clip.fc2", 3072, 768, 256),
         ("sdxl.ff2", 5120, 1280, 256), ("sdxl.ff0", 1280, 10240, 256), ("flux.proj", 3072, 3072, 256),
         ("sdxl.attn1280", 1280, 1280, 4096), ("clip.fc2", 3072, 768, 4096), ("sdxl.attn640", 640, 640, 16384)]
# (block_m, block_n, block_k, warps, stages): candidate tiles for 256+ rows
TILES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3),
         (128, 256, 64, 8, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 2)]
L2_PAST = 200 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dense", action="store_true",
                   help="the same kernel on bf16 weights (a dense copy run by one Triton launch) against cuBLAS")
    a = p.parse_args()
    if a.dense:
        return dense(a.out)
    from comfyquant.bench.layers import _cycling, graph_time_us, wall_us
    from comfyquant.bench.timing import run_record
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import TileConfig, fit_stages, w8a16_config

    a.out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, k, n, m in CASES:
        copies = max(2, min(16, L2_PAST // (n * k + m * k * 2)))
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [quantize_rowwise(w) for w in ws]
        wb = [w.bfloat16() for w in ws]
        xs = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(copies)]
        ref = xs[0].double() @ (qs[0][0].double() * qs[0][1].double()).t()
        del ws
        pairs = [(x, q, s) for x, (q, s) in zip(xs, qs, strict=True)]
        today = w8a16_config(m, n, k, sms)
        row: dict = {"shape": name, "m": m, "k": k, "n": n, "today": str(today), "gpu_us": {}, "eager_us": {},
                     "rel_f64": {}}
        bf16_pairs = list(zip(xs, wb, strict=True))
        row["gpu_us"]["bf16"] = graph_time_us(lambda x, w: torch.nn.functional.linear(x, w), bf16_pairs)
        row["eager_us"]["bf16"] = wall_us(_cycling(torch.nn.functional.linear, bf16_pairs), 20.0)
        for tag, cfg in [("today", None), *((f"{t[0]}x{t[1]}x{t[2]} w{t[3]} s{t[4]}", fit_stages(
                TileConfig(t[0], t[1], t[2], t[3], t[4], 8), a_bytes=2, b_bytes=1)) for t in TILES)]:
            try:
                y = ti.w8a16_linear(xs[0], qs[0][0], qs[0][1], None, None, torch.bfloat16, cfg=cfg)
                row["rel_f64"][tag] = float((y.double() - ref).norm() / ref.norm())
                def op(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cfg: TileConfig | None = cfg) -> torch.Tensor:
                    return ti.w8a16_linear(x, q, s, None, None, torch.bfloat16, cfg=cfg)

                row["gpu_us"][tag] = graph_time_us(op, pairs)
                row["eager_us"][tag] = wall_us(_cycling(op, pairs), 20.0)
            except Exception as e:  # recorded with the row: a tile that does not compile or fit
                row.setdefault("errors", {})[tag] = f"{type(e).__name__}: {str(e)[:200]}"
        cand = {t: v for t, v in row["gpu_us"].items() if t != "bf16"}
        best = min(cand, key=cand.get)
        row["best"] = best
        rows.append(row)
        g, e = row["gpu_us"], row["eager_us"]
        print(f"{name:14} M={m:5} bf16 gpu {g['bf16']:6.1f} eager {e['bf16']:6.1f} | today gpu {g.get('today', 0):6.1f} | "
              f"best {best} gpu {g[best]:6.1f} ({g['bf16'] / g[best]:.2f}x) eager {e.get(best, 0):6.1f} "
              f"({e['bf16'] / e.get(best, float('inf')):.2f}x)", flush=True)
        del qs, wb, xs, pairs, bf16_pairs
        torch.cuda.empty_cache()
        res = run_record(t0, rows=rows)
        (a.out / "w8a16_large_m.json").write_text(json.dumps(res, indent=1))  # each row: a time cap keeps the rest
    worst = max(max(r["rel_f64"].values(), default=0.0) for r in rows)
    print(f"done in {res['seconds']} s; worst error against float64 {worst:.2e}", flush=True)
    return 0 if worst < 5e-3 else 1


def dense(out: Path) -> int:
    """A dense bf16 copy multiplied by one Triton launch (the weight-only kernel on bf16 weights: its conversion is
    a no-op, both tiles go through shared memory) against cuBLAS on the same copy: GPU time of graph replays, and
    eager wall time of a prepared plan (``triton_plans.plan_w8a16``, what a layer's hot path calls) against
    ``F.linear`` and ``torch.mm`` on the transposed copy (the copies' own plan today, ``dense_copy``). Whether
    copies run by Triton's launcher (~5 µs a launch) would beat cuBLAS's (~13 µs a call at bf16's floor on
    these hosts) where a model is host-bound, at GPU time near cuBLAS's."""
    from comfyquant.bench.layers import _cycling, graph_time_us, wall_us
    from comfyquant.bench.timing import run_record
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans
    from comfyquant.runtime.kernels.configs import TileConfig, fit_stages, w8a16_config

    F = torch.nn.functional
    out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    one = torch.ones((), device="cuda")
    for name, k, n, m in CASES:
        copies = max(2, min(16, L2_PAST // (n * k * 2 + m * k * 2)))
        wb = [(torch.randn(n, k, device="cuda") * 0.02).bfloat16() for _ in range(copies)]
        wts = [w.t() for w in wb]
        xs = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(copies)]
        ref = xs[0].double() @ wb[0].double().t()
        row: dict = {"shape": name, "m": m, "k": k, "n": n, "gpu_us": {}, "eager_us": {}, "rel_f64": {}}
        pairs = list(zip(xs, wb, strict=True))
        row["gpu_us"]["cublas"] = graph_time_us(lambda x, w: F.linear(x, w), pairs)
        row["eager_us"]["cublas"] = wall_us(_cycling(F.linear, pairs), 20.0)
        row["eager_us"]["cublas_mm"] = wall_us(_cycling(torch.mm, list(zip(xs, wts, strict=True))), 20.0)
        tiles = [("today", w8a16_config(m, n, k, sms))] + [
            (f"{t[0]}x{t[1]}x{t[2]} w{t[3]} s{t[4]}", fit_stages(TileConfig(t[0], t[1], t[2], t[3], t[4], 8),
                                                                   a_bytes=2, b_bytes=2)) for t in TILES]
        for tag, cfg in tiles:
            try:
                y = ti.w8a16_linear(xs[0], wb[0], one, None, None, torch.bfloat16, cfg=cfg)  # compiles
                row["rel_f64"][tag] = float((y.double() - ref).norm() / ref.norm())

                def op(x: torch.Tensor, w: torch.Tensor, cfg: TileConfig = cfg) -> torch.Tensor:
                    return ti.w8a16_linear(x, w, one, None, None, torch.bfloat16, cfg=cfg)

                row["gpu_us"][tag] = graph_time_us(op, pairs)
                plans = [triton_plans.plan_w8a16(x, w, one, None, torch.bfloat16, cfg=cfg) for x, w in pairs]
                if all(pl is not None for pl in plans):
                    row["eager_us"][tag] = wall_us(_cycling(lambda pl, x: pl(x), list(zip(plans, xs, strict=True))),
                                                   20.0)
            except Exception as e:  # recorded with the row: a tile that does not compile or fit
                row.setdefault("errors", {})[tag] = f"{type(e).__name__}: {str(e)[:200]}"
        ok = {t: v for t, v in row["gpu_us"].items() if t != "cublas" and row["rel_f64"].get(t, 1.0) < 5e-3}
        best = min(ok, key=ok.get) if ok else None
        row["best"] = best
        rows.append(row)
        g, e = row["gpu_us"], row["eager_us"]
        if best is not None:
            print(f"{name:14} M={m:5} cuBLAS gpu {g['cublas']:6.1f} eager {e['cublas']:6.1f} (mm {e['cublas_mm']:6.1f})"
                  f" | triton {best} gpu {g[best]:6.1f} ({g['cublas'] / g[best]:.2f}x) eager {e.get(best, 0):6.1f} "
                  f"({e['cublas'] / e.get(best, float('inf')):.2f}x); today gpu {g.get('today', 0):6.1f}", flush=True)
        del wb, wts, xs, pairs
        torch.cuda.empty_cache()
        res = run_record(t0, rows=rows)
        (out / "w8a16_dense.json").write_text(json.dumps(res, indent=1))
    worst = max(min(r["rel_f64"].values(), default=1.0) for r in rows)
    print(f"done in {res['seconds']} s; worst best-tile error against float64 {worst:.2e}", flush=True)
    return 0 if worst < 5e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
