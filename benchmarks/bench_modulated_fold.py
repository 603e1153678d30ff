"""A DiT block's modulated LayerNorm folded into the quantized linear against ComfyUI's arithmetic first, eager
wall time per call.

For Flux / Wan / SD3 widths at 2 batch items x (512 text + 1,024 / 4,096 image) tokens: ``fold`` (the layer with
the norm handed over, ``runtime.modulation.modulated_linear``: the block kernel or the row-block one-launch
kernel applies it), ``comfyui`` (``layer_norm`` then ``addcmul(shift, ., 1 + scale)``, then the layer: what
ComfyUI's Flux blocks run) and ``bf16`` (the same norm, then ``nn.Linear``); and the gated residual add as one
``addcmul_`` against ``x += y * gate``. Candidates take turns (``bench.timing.interleaved_ms``); ratios are to
``comfyui`` of the same row.

    python benchmarks/bench_modulated_fold.py --out results/      # a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (model, K, N): the layers a modulated norm feeds (qkv, mlp[0] / linear1)
LAYERS = (("flux qkv", 3072, 9216), ("flux mlp0", 3072, 12288), ("flux linear1", 3072, 21504),
          ("wan-like", 5120, 15360), ("sd3 qkv", 1536, 4608))
TOKENS = (512 + 1024, 512 + 4096)


def main(argv: list[str] | None = None) -> int:
    from comfyquant.bench.timing import interleaved_ms
    from comfyquant.runtime.kernels.acts import layer_mod
    from comfyquant.runtime.modulation import ModulationSite, gated_add_, modulated_linear
    from comfyquant.runtime.nn import QuantLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--formats", default="int8,fp8")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, k, n in LAYERS:
        lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(2, t, k, device="cuda", dtype=torch.bfloat16)
            mod = torch.randn(2, 1, 6 * k, device="cuda", dtype=torch.bfloat16) * 0.5
            shift, scale, gate = mod[..., :k], mod[..., k:2 * k], mod[..., 2 * k:3 * k]
            for fmt in a.formats.split(","):
                layer = QuantLinear.from_linear(lin, fmt)
                site = ModulationSite(1e-6)
                args = (x, shift, scale)
                fns = {"fold": lambda q=layer, s=site, xs=args: modulated_linear(q, *xs, 1e-6, s),
                       "comfyui": lambda q=layer, xs=args: q(layer_mod(*xs, 1e-6)),
                       "bf16": lambda f=lin, xs=args: f(layer_mod(*xs, 1e-6))}
                with torch.no_grad():
                    got = interleaved_ms(fns, rounds=a.rounds, min_calls=24)
                errors = {c: v for c, v in got.items() if isinstance(v, str)}
                if errors:  # one line each, the row kept without times
                    rows.append({"layer": name, "k": k, "n": n, "m": 2 * t, "format": fmt, "errors": errors})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                us = {c: float(v) * 1e3 for c, v in got.items()}
                row = {"layer": name, "k": k, "n": n, "m": 2 * t, "format": fmt, "us": us,
                       "fold_vs_comfyui": us["comfyui"] / us["fold"], "fold_vs_bf16": us["bf16"] / us["fold"],
                       "comfyui_vs_bf16": us["bf16"] / us["comfyui"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    residual = []
    for k, t in ((3072, 4608), (3072, 1536), (5120, 9216)):
        res = torch.randn(2, t, k, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(res)
        gate = torch.randn(2, 1, k, device="cuda", dtype=torch.bfloat16)

        def two(res: torch.Tensor = res, y: torch.Tensor = y, gate: torch.Tensor = gate) -> None:
            res += y * gate

        fns = {"addcmul_": lambda res=res, y=y, gate=gate: gated_add_(res, y, gate), "x += y * gate": two}
        us = {c: float(v) * 1e3 for c, v in interleaved_ms(fns, rounds=a.rounds, min_calls=24).items()}
        residual.append({"k": k, "m": 2 * t, "us": us, "speedup": us["x += y * gate"] / us["addcmul_"]})
        print(json.dumps(residual[-1]), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (a.out / "bench_modulated_fold.json").write_text(json.dumps({"meta": meta, "rows": rows, "residual": residual},
                                                                indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date_utc']} UTC; eager µs per call", "",
             "| layer | M | format | fold µs | comfyui µs | bf16 µs | fold vs comfyui | fold vs bf16 | comfyui vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "errors" in r:
            lines.append(f"| {r['layer']} {r['k']}->{r['n']} | {r['m']} | {r['format']} | {r['errors']} |||||")
            continue
        u = r["us"]
        lines.append(f"| {r['layer']} {r['k']}->{r['n']} | {r['m']} | {r['format']} | {u['fold']:.1f} | "
                     f"{u['comfyui']:.1f} | {u['bf16']:.1f} | {r['fold_vs_comfyui']:.2f} | {r['fold_vs_bf16']:.2f} | "
                     f"{r['comfyui_vs_bf16']:.2f} |")
    lines += ["", "| residual K | M | addcmul_ µs | x += y * gate µs | speed-up |", "|---|---|---|---|---|"]
    for r in residual:
        lines.append(f"| {r['k']} | {r['m']} | {r['us']['addcmul_']:.1f} | {r['us']['x += y * gate']:.1f} | "
                     f"{r['speedup']:.2f} |")
    (a.out / "bench_modulated_fold.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
