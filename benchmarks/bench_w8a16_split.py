"""The weight-only (W8A16) GEMM at M = 1 and 16 with its K cut into slices (``TileConfig.split_k``) against
the unsplit kernel and cuBLAS bf16, on the thin-M shapes where the unsplit kernel leaves SMs idle (down
projections: K 10,240-15,360 with N 3,072-5,120): GPU time of CUDA-graph replays with the weights cycled past
L2 (a single-token layer reads its whole weight). Every split's output is compared with the unsplit one (float64
reference distance) and with itself on a second launch (the partials are summed in slice order:
deterministic). ``--fp8``: fp8 e4m3 weights (per-row scales) instead of int8, cuBLAS ``_scaled_mm`` (the same
per-row fp8 activation pass) timed beside; ``--wide``: the >= 8,192-wide layers (run 53: fp8 weight-only ran
0.72-0.97x bf16 there on the unsplit 128-column tiles where int8 ran 1.14-1.45x), 128-column tiles among the
candidates. ``--int4``: int4_rot's packed weights (two per byte along K, ``w8a16_linear(..., packed=True)``, the
runtime's path at 1-16 rows): run 73 had them at 0.65-1.01x bf16 at one row on the int8 tiles, the unpacking
bounding them as fp8's conversion did.

    python benchmarks/bench_w8a16_split.py --out results/      # a CUDA GPU
    python benchmarks/bench_w8a16_split.py --out results/ --fp8 --wide
    python benchmarks/bench_w8a16_split.py --out results/ --int4 --wide
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"flux.mlp2": (12288, 3072), "flux.linear2": (15360, 3072), "flux.proj": (3072, 3072),
          "wan.ffn2": (13824, 5120), "wan.attn": (5120, 5120), "t5.ff2": (10240, 4096), "t5.attn": (4096, 4096),
          "flux.qkv": (3072, 9216)}
WIDE = {"flux.qkv": (3072, 9216), "flux.mlp0": (3072, 12288), "flux.linear1": (3072, 21504),
        "wan.ffn0": (5120, 13824), "t5.ff0": (4096, 10240), "sdxl.ff0": (1280, 10240)}
L2_PAST = 200 << 20


def _weights(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-row scales) of ``w``: int8 (``quantize_rowwise``), fp8 e4m3 (amax / 448 per row) or int4 packed
    two per byte (amax / 7 per row)."""
    if fmt == "int8":
        from comfyquant.quant.int8 import quantize_rowwise

        return quantize_rowwise(w)
    if fmt == "int4":
        from comfyquant.quant.int4 import pack_int4

        s = (w.abs().amax(dim=1, keepdim=True) / 7.0).clamp_min(1e-12)
        return pack_int4(torch.round(w / s).clamp(-7, 7).to(torch.int8)), s.float()
    s = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (w / s).to(torch.float8_e4m3fn), s.float()


def _dequant(q: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    from comfyquant.quant.int4 import unpack_int4

    return (unpack_int4(q) if fmt == "int4" else q).double() * s.double()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fp8", action="store_true", help="fp8 e4m3 weights; cuBLAS _scaled_mm timed beside")
    p.add_argument("--wide", action="store_true", help="the >= 8,192-wide layers, 128-column tiles too")
    p.add_argument("--int4", action="store_true", help="int4_rot's packed weights (the runtime's 1-16-row path)")
    a = p.parse_args()
    if a.fp8 and a.int4:
        p.error("--fp8 and --int4 are two weight formats: one at a time")
    fmt = "fp8" if a.fp8 else "int4" if a.int4 else "int8"
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.bench.timing import run_record
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import fit_stages, w8a16_config
    from comfyquant.runtime.kernels.fp8 import fp8_linear_scaled_mm

    a.out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (k, n) in (WIDE if a.wide else SHAPES).items():
        copies = max(2, min(32, L2_PAST // (n * k)))
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [_weights(w, fmt) for w in ws]
        wb = [w.bfloat16() for w in ws]
        del ws
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").bfloat16()
            ref = x.double() @ _dequant(*qs[0], fmt).t()
            base = w8a16_config(m, n, k, sms, fp8=a.fp8)
            row: dict = {"shape": name, "m": m, "k": k, "n": n, "picked": str(base), "us": {}, "rel_f64": {}}
            row["us"]["picked"] = graph_time_us(
                lambda q, s, x=x: ti.w8a16_linear(x, q, s, None, None, torch.bfloat16, packed=a.int4), qs)
            row["us"]["bf16"] = graph_time_us(lambda w, x=x: torch.nn.functional.linear(x, w), [(w,) for w in wb])
            if a.fp8 and k % 16 == 0 and n % 16 == 0:  # the fp8 kind's other candidate
                row["us"]["scaled_mm"] = graph_time_us(
                    lambda q, s, x=x: fp8_linear_scaled_mm(x, q, s.reshape(-1), None, None, torch.bfloat16), qs)
            unsplit = None
            for bn in (32, 64, 128) if a.wide else (32, 64):
                for split in (1, 2, 4, 8):
                    cfg = fit_stages(dataclasses.replace(base, block_n=bn, split_k=split), a_bytes=2, b_bytes=1)
                    tag = f"bn{bn}_s{split}"
                    try:
                        y = ti.w8a16_linear(x, qs[0][0], qs[0][1], None, None, torch.bfloat16, cfg=cfg, packed=a.int4)
                        again = ti.w8a16_linear(x, qs[0][0], qs[0][1], None, None, torch.bfloat16, cfg=cfg,
                                                packed=a.int4)
                        if unsplit is None:
                            unsplit = y
                        row["rel_f64"][tag] = float((y.double() - ref).norm() / ref.norm())
                        row.setdefault("deterministic", {})[tag] = bool(torch.equal(y, again))
                        row.setdefault("max_diff_vs_unsplit", {})[tag] = float((y.float() - unsplit.float()).abs().max())
                        row["us"][tag] = graph_time_us(
                            lambda q, s, cfg=cfg, x=x: ti.w8a16_linear(x, q, s, None, None, torch.bfloat16, cfg=cfg,
                                                                       packed=a.int4), qs)
                    except Exception as e:  # recorded
                        row.setdefault("errors", {})[tag] = f"{type(e).__name__}: {str(e)[:200]}"
            best = min((v, c) for c, v in row["us"].items() if c not in ("bf16", "picked", "scaled_mm"))
            row["best"], row["best_us"] = best[1], best[0]
            rows.append(row)
            print(f"{name:13} M={m:2} bf16 {row['us']['bf16']:6.1f} unsplit(bn32) {row['us'].get('bn32_s1', 0):6.1f} "
                  f"best {best[1]} {best[0]:6.1f} us = {row['us']['bf16'] / best[0]:.2f}x bf16; picked {base} "
                  f"{row['us']['picked']:6.1f} us = {row['us']['bf16'] / row['us']['picked']:.2f}x",
                  flush=True)
        del qs, wb
        torch.cuda.empty_cache()
    res = run_record(t0, rows=rows)
    stem = "w8a16_split" + ("" if fmt == "int8" else f"_{fmt}") + ("_wide" if a.wide else "")
    (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    bad = [r["shape"] for r in rows if not all(r.get("deterministic", {}).values()) or r.get("errors")
           or max(r["rel_f64"].values()) > 2 * min(r["rel_f64"].values()) + 1e-3]
    print(f"done in {res['seconds']} s; shapes with a nondeterministic, failing or inaccurate split: {bad}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
