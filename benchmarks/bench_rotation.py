"""The rotating activation quantizer alone (convrot group 256 on bf16 rows, int8 codes: what every convrot W8A8
layer runs first): the tile kernel's launch configurations (rows per program, warps, pipeline stages, steps
unrolled per loop iteration) against the row kernel, today's pick ("auto") and the unrotated block kernel,
GPU time of CUDA-graph replays with the inputs cycled past L2. Every configuration's codes and scales are
compared with the default configuration's before it is timed.

    python benchmarks/bench_rotation.py --out results/      # a CUDA GPU
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

M_VALUES = (1024, 4096, 16384)
K_VALUES = (3072, 5120, 12288, 15360)
ROWS, WARPS, STAGES, UNROLL = (16, 32, 64), (4, 8), (1, 2, 3), (1, 2, 4)
L2_PAST = 160 << 20  # bytes of input cycled per timing: past the H200's 50 MB L2


def run_tiles(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int, cfg: tuple[int, int, int, int]) -> None:
    """One launch of the rotating tile kernel with ``cfg`` = (rows, warps, stages, unroll)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    rows, warps, stages, unroll = cfg
    grid, args, key, w = tq.tile_launch(x, q, s, group, tq.MODE_INT8, 127.0, 0, 0, rows=rows, warps=warps,
                                        unroll=unroll)
    tq._ACT_TILES(grid, args, x.device, num_warps=w, num_stages=stages, key=key)


def configs(m: int) -> list[tuple[int, int, int, int]]:
    """Configurations timed at ``m`` rows (programs of more rows than a third of M are left out)."""
    return [c for c in itertools.product(ROWS, WARPS, STAGES, UNROLL) if 3 * c[0] <= m]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--k", default=",".join(map(str, K_VALUES)))
    p.add_argument("--group", type=int, default=256)
    a = p.parse_args()
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = a.group
    rows_out, mismatches = [], {}
    for k in (int(v) for v in a.k.split(",")):
        for m in (int(v) for v in a.m.split(",")):
            n = max(2, min(64, L2_PAST // (m * k * 2)))
            xs = [torch.randn(m, k, device="cuda").bfloat16() * (1 + 10 * (i == 0)) for i in range(n)]
            qs = [torch.empty((m, k), dtype=torch.int8, device="cuda") for _ in range(n)]
            ss = [torch.empty((m, 1), dtype=torch.float32, device="cuda") for _ in range(n)]
            pairs = list(zip(xs, qs, ss, strict=True))
            want_q, want_s = tq.quantize_rows_int8(xs[0], g, kernel="tiles")
            row: dict = {"m": m, "k": k, "group": g, "us": {}, "default": str((tq.dot_rows(m, 132), 4, 2, 1))}
            for name, grp, kern in (("plain_blocks", None, "blocks"), ("rows", g, "rows"), ("auto", g, "auto")):
                row["us"][name] = graph_time_us(
                    lambda x, q, s, grp=grp, kern=kern: tq.quantize_rows_int8(x, grp, kernel=kern), pairs)
            for cfg in configs(m):
                q, s = torch.empty_like(want_q), torch.empty_like(want_s)
                try:
                    run_tiles(xs[0], q, s, g, cfg)
                except Exception as e:  # recorded: a configuration that does not compile (shared memory)
                    row["us"][str(cfg)] = None
                    print(f"M={m} K={k} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                off = int((q != want_q).sum()) + int((s != want_s).sum())
                if off:
                    mismatches[f"{m}x{k} {cfg}"] = off
                row["us"][str(cfg)] = graph_time_us(lambda x, q, s, cfg=cfg: run_tiles(x, q, s, g, cfg), pairs)
            timed = [(v, c) for c, v in row["us"].items() if c.startswith("(") and v is not None]
            best = min(timed, default=(float("nan"), ""))
            row["best"], row["best_us"] = best[1], best[0]
            row["tb_s"] = {c: m * k * 3 / v / 1e6 for c, v in row["us"].items() if v}
            rows_out.append(row)
            print(f"M={m:5} K={k:5} plain {row['us']['plain_blocks']:7.1f} rows {row['us']['rows']:7.1f} auto "
                  f"{row['us']['auto']:7.1f} best {best[1]} {best[0]:7.1f} us ({row['tb_s'].get(best[1], 0):.2f} "
                  f"TB/s) = {row['us']['auto'] / best[0]:.2f}x auto, {best[0] / row['us']['plain_blocks']:.2f}x plain",
                  flush=True)
            del xs, qs, ss, pairs
            torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1), "mismatches": mismatches,
           "rows": rows_out}
    (a.out / "rotation_tiles.json").write_text(json.dumps(res, indent=1))
    print(f"done in {res['seconds']} s; configurations whose codes differ from the default's: {len(mismatches)}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
