"""The one-launch W8A8 path from 64 rows (``triton_gemm.fused_rows``: a row block's programs quantize its rows,
wait for each other, multiply) against the two-launch path (activation kernel + GEMM) and cuBLAS bf16, on the
640-4,096-wide layers where two launches' host time costs more than bf16's one (SDXL, CLIP, Flux proj, T5 attn).

Per row: eager wall time per call of each path's plan (back-to-back calls, inputs and weights cycled past L2,
the three taking turns), GPU time of CUDA-graph replays, the row-block kernel's GPU time on a few tile
configurations, and whether its output equals the two-launch path's bit for bit (first launch, a second launch
on the counters the first left, and a graph replay). ``--wide``: the layers of more column tiles than a row
block's quantizing programs (``configs.rows_shape``'s ``wide``: SDXL ff0, Flux qkv / mlp0 / linear1, T5 ff0,
Wan attn), which the runtime does not give the row-block kernel until this has timed them.

    python benchmarks/bench_fused_rows.py --out results/ [--wide]      # a CUDA GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"sdxl.attn640": (640, 640), "sdxl.attn1280": (1280, 1280), "sdxl.ff2": (5120, 1280),
          "clip.attn": (768, 768), "clip.fc1": (768, 3072), "clip.fc2": (3072, 768), "flux.proj": (3072, 3072),
          "t5.attn": (4096, 4096), "flux.mlp2": (12288, 3072)}
WIDE_SHAPES = {"sdxl.ff0": (1280, 10240), "sdxl.ff0_640": (640, 5120), "flux.qkv": (3072, 9216),
               "flux.mlp0": (3072, 12288), "t5.ff0": (4096, 10240), "wan.attn": (5120, 5120),
               "flux.linear1": (3072, 21504)}
MS = (64, 256, 1024, 4096, 16384)
WIDE_MS = (256, 1024, 4096)
CONFIG_MS = (256, 1024, 4096)
L2_PAST = 200 << 20


def _configs(picked: object) -> dict[str, object]:
    from comfyquant.runtime.kernels.configs import TileConfig

    alts = {"64x128_w4s4": TileConfig(64, 128, 128, 4, 4), "128x128_w4s4": TileConfig(128, 128, 128, 4, 4),
            "128x128_w8s3": TileConfig(128, 128, 128, 8, 3), "64x64_w4s4": TileConfig(64, 64, 128, 4, 4)}
    return {"picked": picked, **{k: v for k, v in alts.items() if v != picked}}


def _write(out: Path, rows: list[dict], wide: bool = False) -> None:
    """The results so far (written after every row: a step cut off by its time cap keeps what it measured)."""
    name = f"fused_rows{'_wide' if wide else ''}_{time.strftime('%Y-%m-%d')}.json"
    (out / name).write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, indent=1))


def _cycle(fn: object, items: list) -> object:
    """``fn`` on the next of ``items`` (tuples of arguments) per call: inputs and weights cycled past L2."""
    it = itertools.cycle(items)
    return lambda: fn(*next(it))


def _row(name: str, m: int, k: int, n: int, qs: list, wb: list, bias: torch.Tensor, wide: bool = False) -> dict:
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.bench.timing import interleaved_ms
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_plans as tp
    from comfyquant.runtime.kernels.configs import rows_config, rows_shape

    bf = torch.bfloat16
    xs = [torch.randn(m, k, device="cuda").to(bf) for _ in range(max(2, min(8, L2_PAST // (2 * m * k))))]
    for x in xs:
        x[0, 0] = 40.0  # an outlier entry, as activations have
    row: dict = {"shape": name, "m": m, "k": k, "n": n, "wide": wide, "rows_apply": rows_shape(m, n, k, wide=wide)}
    if not row["rows_apply"]:
        return row
    q0, s0 = qs[0]
    two = ti.int8_linear(xs[0], q0, s0, bias, None, bf)
    first = ti.fused_linear(xs[0], q0, s0, bias, bf, wide=wide)
    second = ti.fused_linear(xs[0], q0, s0, bias, bf, wide=wide)  # on the counters the first launch left
    plans_two = [tp.plan_int8(xs[0], q, s, bias, None, bf) for q, s in qs]
    plans_one = [tp.plan_fused(xs[0], q, s, bias, bf, wide=wide) for q, s in qs]
    planned = plans_one[0](xs[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = plans_one[0](xs[0])
    g.replay()
    torch.cuda.synchronize()
    row["bit_equal"] = {"first": bool(torch.equal(first, two)), "second": bool(torch.equal(second, two)),
                        "plan": bool(torch.equal(planned, two)), "graph": bool(torch.equal(graphed, two))}
    del g
    pairs = [(xs[i % len(xs)], *qs[i % len(qs)]) for i in range(max(len(xs), len(qs)))]
    fns = {"bf16": _cycle(torch.nn.functional.linear, [(xs[i % len(xs)], wb[i % len(wb)], bias)
                                                       for i in range(len(pairs))]),
           "two_launch": _cycle(lambda x, i: plans_two[i](x), [(xs[i % len(xs)], i % len(qs))
                                                               for i in range(len(pairs))]),
           "one_launch": _cycle(lambda x, i: plans_one[i](x), [(xs[i % len(xs)], i % len(qs))
                                                               for i in range(len(pairs))])}
    row["eager_us"] = {kk: (v * 1e3 if isinstance(v, float) else v)
                       for kk, v in interleaved_ms(fns, rounds=5, min_ms=15.0).items()}
    row["graph_us"] = {
        "bf16": graph_time_us(lambda x, q, s: torch.nn.functional.linear(x, wb[0], bias), pairs),
        "two_launch": graph_time_us(lambda x, q, s: ti.int8_linear(x, q, s, bias, None, bf), pairs),
        "one_launch": graph_time_us(lambda x, q, s: ti.fused_linear(x, q, s, bias, bf, wide=wide), pairs)}
    if m in CONFIG_MS:
        picked = rows_config(m, n)
        row["picked"] = str(picked)
        row["configs_us"] = {}
        for tag, cfg in _configs(picked).items():
            if not rows_shape(m, n, k, cfg, wide=wide):
                continue
            try:
                row["configs_us"][tag] = graph_time_us(
                    lambda x, q, s, cfg=cfg: ti.fused_linear(x, q, s, bias, bf, cfg=cfg, wide=wide), pairs)
            except Exception as e:  # recorded in the result, never hidden
                row["configs_us"][tag] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--only", default="", help="comma-separated shape names")
    p.add_argument("--wide", action="store_true", help="the wide layers (more column tiles than quantizing programs)")
    a = p.parse_args()
    from comfyquant.quant.int8 import quantize_rowwise

    a.out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    only = {s for s in a.only.split(",") if s}
    for name, (k, n) in (WIDE_SHAPES if a.wide else SHAPES).items():
        if (only and name not in only) or time.perf_counter() - t0 > a.budget_s:
            continue
        copies = max(2, min(16, L2_PAST // (3 * n * k)))
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [quantize_rowwise(w) for w in ws]
        wb = [w.to(torch.bfloat16) for w in ws]
        bias = torch.randn(n, device="cuda").to(torch.bfloat16)
        del ws
        for m in WIDE_MS if a.wide else MS:
            if time.perf_counter() - t0 > a.budget_s:
                break
            row = _row(name, m, k, n, qs, wb, bias, a.wide)
            rows.append(row)
            _write(a.out, rows, a.wide)
            if "eager_us" in row:
                e, gu = row["eager_us"], row["graph_us"]
                print(f"{name:14} M={m:6} eager bf16 {e['bf16']:7.1f} two {e['two_launch']:7.1f} one "
                      f"{e['one_launch']:7.1f} | graph bf16 {gu['bf16']:7.1f} two {gu['two_launch']:7.1f} one "
                      f"{gu['one_launch']:7.1f} | equal {row['bit_equal']} {row.get('configs_us', '')}",
                      flush=True)
            torch.cuda.empty_cache()
    bad = [r for r in rows if "bit_equal" in r and not all(r["bit_equal"].values())]
    print(f"{len(rows)} rows, {len(bad)} not bit-equal, {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
