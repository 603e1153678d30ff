"""The W4A8 (``int4_rot``) GEMM in both operand orders against cuBLAS bf16 and the int8 W8A8 GEMM: GPU time of
CUDA-graph replays with the weights cycled past L2, on Flux / Wan / SDXL / T5 layers at M 1 .. 16,384, each
kernel on the runtime's tile and on a few others. ``w4a8_swapped`` takes the unpacked weight as wgmma's register
operand (no shared-memory round trip per K step, and wgmma from 16 rows where the other order runs mma.sync);
its outputs must equal the other order's bit for bit (the same integer sums), which every row checks.

    python benchmarks/bench_w4a8.py --out results/      # a CUDA GPU (Hopper for wgmma)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"flux.qkv": (3072, 9216), "flux.proj": (3072, 3072), "flux.mlp2": (12288, 3072),
          "wan.ffn0": (5120, 13824), "sdxl.attn1280": (1280, 1280), "t5.ff0": (4096, 10240)}
M_VALUES = (1, 16, 256, 1024, 4096, 16384)
L2_PAST = 200 << 20
TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 4))  # bm, bn, warps, st


def _w4a8(qx: torch.Tensor, sx: torch.Tensor, w: tuple, cfg: object, swapped: bool) -> torch.Tensor:
    """One W4A8 GEMM launch on the quantized activations (K permuted) in the given operand order and tile."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    out = torch.empty(qx.shape[0], w[1].shape[0], dtype=torch.bfloat16, device=qx.device)
    grid, args, key = ti._w4a8_launch(qx, sx, w[1], w[2], None, out, cfg, ti._low_rank_args(None, qx, w[2]))
    (ti._W4A8_SWAPPED if swapped else ti._W4A8)(grid, args, qx.device, num_warps=cfg.warps, num_stages=cfg.stages,
                                                 key=key)
    return out


def _w8a8(qx: torch.Tensor, sx: torch.Tensor, w: tuple) -> torch.Tensor:
    from comfyquant.runtime.kernels import triton_int8 as ti

    return ti.gemm_w8a8(qx, sx, w[3], w[4], None, torch.bfloat16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=240.0)
    a = p.parse_args()
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.quant.int4 import pack_int4
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.configs import TileConfig, fit_stages
    from comfyquant.runtime.kernels.triton_gemm import PERM_BLOCK

    a.out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    for name, (k, n) in SHAPES.items():
        sets = max(2, min(16, L2_PAST // (n * k)))
        g = torch.Generator(device="cuda").manual_seed(k + n)
        ws = []
        for _ in range(sets):
            w = torch.randn(n, k, device="cuda", generator=g) * 0.02
            s4 = (w.abs().amax(dim=1, keepdim=True) / 7.0).clamp_min(1e-12)
            q8, s8 = quantize_rowwise(w)
            ws.append((w.bfloat16(), pack_int4(torch.round(w / s4).clamp(-7, 7).to(torch.int8)), s4.reshape(-1),
                       q8, s8))
            del w
        for m in M_VALUES:
            if time.perf_counter() - t0 > a.budget_s:
                print(f"out of time before {name} M={m}", flush=True)
                break
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            qx, sx = tq.quantize_rows_int8(x, None, perm=PERM_BLOCK)
            q8x, s8x = tq.quantize_rows_int8(x, None)
            row = {"layer": name, "m": m, "k": k, "n": n, "us": {}}
            row["us"]["bf16"] = graph_time_us(lambda x, w: F.linear(x, w[0]), [(x, w) for w in ws])
            row["us"]["w8a8_gemm"] = graph_time_us(_w8a8, [(q8x, s8x, w) for w in ws])
            cfgs = {"runtime": ti.w4a8_config(m, n, k, x.device),
                    **{f"{bm}x{bn}w{wp}s{st}": fit_stages(TileConfig(bm, bn, 128, wp, st, 8), 1, 1)
                       for bm, bn, wp, st in TILES}}
            same = True
            for label, cfg in cfgs.items():
                for kern, swapped in (("w4a8", False), ("w4a8_swapped", True)):
                    try:
                        row["us"][f"{kern}@{label}"] = graph_time_us(
                            functools.partial(_w4a8, cfg=cfg, swapped=swapped), [(qx, sx, w) for w in ws])
                    except Exception as e:  # recorded in the row, never hidden
                        row["us"][f"{kern}@{label}"] = float("nan")
                        row.setdefault("failed", {})[f"{kern}@{label}"] = str(e).splitlines()[0][:200]
                if label not in row.get("failed", {}):
                    same &= bool(torch.equal(_w4a8(qx, sx, ws[0], cfg, False), _w4a8(qx, sx, ws[0], cfg, True)))
            row["bit_equal"] = same
            us = row["us"]
            best = {kern: min((v, c) for c, v in us.items() if c.startswith(kern + "@") and v == v)
                    for kern in ("w4a8", "w4a8_swapped")}
            print(f"{name:14s} M={m:6d} bf16 {us['bf16']:8.1f}  w8a8 {us['bf16'] / us['w8a8_gemm']:.2f}x  "
                  f"w4a8 runtime {us['bf16'] / us['w4a8@runtime']:.2f}x best {us['bf16'] / best['w4a8'][0]:.2f}x  "
                  f"swapped runtime {us['bf16'] / us['w4a8_swapped@runtime']:.2f}x best "
                  f"{us['bf16'] / best['w4a8_swapped'][0]:.2f}x ({best['w4a8_swapped'][1]})  bit-equal {same}",
                  flush=True)
            rows.append(row)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "command": " ".join(sys.argv)}
    (a.out / "w4a8.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0 if all(r["bit_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
