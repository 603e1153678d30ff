"""An RMSNorm folded into the activation quantizer against the norm in torch first, eager wall time per call.

For each (M, K) and rotation (none: the block kernel; convrot 256: the rotating row kernel, which a norm forces
in place of the tile / split / one-read kernels ``pick_kernel`` gives without one): ``fold`` (the quantizer with
``norm=``), ``rms_norm + quant`` (``F.rms_norm``, one launch, then the quantizer ``auto`` picks) and
``t5_norm + quant`` (ComfyUI's ``T5LayerNorm`` arithmetic: pow, mean, add, rsqrt, mul, mul). Candidates take
turns (``bench.timing.interleaved_ms``); ratios are to ``rms_norm + quant`` of the same row.

    python benchmarks/bench_norm_fold.py --out results/      # a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ((77, 4096), (256, 4096), (256, 10240), (512, 10240), (1024, 2560), (1024, 4096), (4096, 4096),
          (4096, 10240))


def main(argv: list[str] | None = None) -> int:
    from comfyquant.bench.timing import interleaved_ms
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.rand(k, device="cuda") + 0.5).bfloat16()
        norm = RowNorm(w, 1e-6)

        def t5_norm(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            var = x.float().pow(2).mean(-1, keepdim=True)
            return w * (x * torch.rsqrt(var + 1e-6)).to(x.dtype)

        for group in (None, 256):
            picked = tq.pick_kernel(x, group, tq.MODE_INT8)
            fns = {"fold": lambda x=x, g=group, nm=norm: tq.quantize_rows_int8(x, g, norm=nm),
                   "rms_norm + quant": lambda x=x, g=group, k=k, w=w: tq.quantize_rows_int8(
                       F.rms_norm(x, (k,), w, 1e-6), g),
                   "t5_norm + quant": lambda g=group, f=t5_norm: tq.quantize_rows_int8(f(), g)}
            us = {n: v * 1e3 for n, v in interleaved_ms(fns, rounds=a.rounds, min_calls=24).items()}
            base = us["rms_norm + quant"]
            row = {"m": m, "k": k, "group": group, "kernel_without_norm": picked, "us": us,
                   "fold_vs_rms_norm": base / us["fold"], "fold_vs_t5_norm": us["t5_norm + quant"] / us["fold"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (a.out / "bench_norm_fold.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date_utc']} UTC; eager µs per call",
             "", "| M | K | rotation | kernel without norm | fold µs | rms_norm + quant µs | t5_norm + quant µs |"
             " fold speed-up vs rms_norm / t5_norm |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u = r["us"]
        lines.append(f"| {r['m']} | {r['k']} | {r['group'] or '-'} | {r['kernel_without_norm']} | {u['fold']:.1f} | "
                     f"{u['rms_norm + quant']:.1f} | {u['t5_norm + quant']:.1f} | "
                     f"{r['fold_vs_rms_norm']:.2f} / {r['fold_vs_t5_norm']:.2f} |")
    (a.out / "bench_norm_fold.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
