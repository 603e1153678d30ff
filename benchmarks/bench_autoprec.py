"""Automatic precision on a Flux.1-dev-shaped checkpoint (12B): planning time against the calibration it uses.

Writes (or reuses) a bf16 checkpoint with the real Flux.1-dev tensor shapes and heavy-tailed random weights
(``comfyquant.testing.synthetic``). "Calibration" accumulates, on the device, every linear layer's statistics
(``LayerStats.update``: the Hessian ``X^T X``, column sums, absmax, the row reservoir) over ``--rows`` input
rows per layer: synthetic Gaussian rows with a few outlier channels, of the right size and structure (the
default, 258,048 rows, is 2 prompts x 28 steps x 4,608 tokens of a 1024x1024 Flux image). That is a *lower
bound* on a real calibration, which also runs the 12B model forward for every step. Then the auto planning:
the converter's ``--format auto`` path (``inspect --format auto``: every weight read from the file, every
candidate format's layer output error against its Hessian, the knapsack solve) without writing the output.

    python benchmarks/bench_autoprec.py --device cuda --workdir /tmp/cq-auto --json benchmarks/results/autoprec_h200.json
    python benchmarks/bench_autoprec.py --smoke      # tiny Flux shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.calibration.stats import CalibrationStats, LayerStats
from comfyquant.testing.synthetic import ValueModel, write_streamed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizers import flux_specs

ROWS = 2 * 28 * 4608  # 2 prompts x 28 steps x (4096 image + 512 text tokens) at 1024x1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calibrate(features: dict[str, int], rows: int, device: str, chunk: int = 4096) -> CalibrationStats:
    """Every layer's statistics over ``rows`` synthetic input rows, accumulated on ``device`` (module docstring)."""
    dtype = torch.float32 if device != "cpu" else torch.float64
    stats = CalibrationStats(meta={"source": f"synthetic: {rows} Gaussian rows with outlier channels per layer"})
    for name, k in features.items():
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        s = LayerStats.empty(k, 512, dtype, device)
        outliers = torch.randperm(k, generator=gen, device=device)[: max(1, k // 512)]
        done = 0
        while done < rows:
            n = min(chunk, rows - done)
            x = torch.randn(n, k, generator=gen, device=device)
            x[:, outliers] *= 30.0
            s.update(x.to(torch.bfloat16).float(), gen)  # activations arrive in bf16
            done += n
        stats.layers[name] = s
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cq-bench-auto"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", default="size=0.6", help="the --budget to plan for (default size=0.6)")
    ap.add_argument("--target-gpu", default=None, help="e.g. blackwell: nvfp4/mxfp8 become candidates")
    ap.add_argument("--rows", type=int, default=None, help=f"calibration rows per layer (default {ROWS})")
    ap.add_argument("--blocks", type=int, default=None, help="only the first N double and N single blocks")
    ap.add_argument("--smoke", action="store_true", help="tiny Flux shapes on the CPU (seconds)")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    device = "cpu" if a.smoke else a.device
    rows = a.rows or (512 if a.smoke else ROWS)
    if a.smoke and a.blocks is None:
        a.blocks = 1
    a.workdir.mkdir(parents=True, exist_ok=True)
    specs = flux_specs(a.blocks, a.smoke)
    src = a.workdir / f"flux-{'tiny' if a.smoke else 'full'}-{a.blocks or 'all'}.safetensors"
    if not src.exists():
        write_streamed(src, specs, dtype=torch.bfloat16, seed=0, metadata={"format": "pt"}, model=ValueModel())
    features = {n[: -len(".weight")]: s[1] for n, s in specs if n.endswith(".weight") and len(s) == 2
                and min(s) >= 16}
    _sync(device)
    t0 = time.perf_counter()
    stats = calibrate(features, rows, device)
    _sync(device)
    t_cal = time.perf_counter() - t0

    from comfyquant.convert.inspect import inspect_checkpoint

    t0 = time.perf_counter()
    res = inspect_checkpoint(src, model="flux", fmt="auto", budget=a.budget, target_gpu=a.target_gpu,
                             calibration=stats, device=device)
    _sync(device)
    t_plan = time.perf_counter() - t0
    auto = res.auto
    results = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
        "parameters": sum(math.prod(s) for _, s in specs), "layers": len(features), "rows_per_layer": rows,
        "calibration_seconds": round(t_cal, 2), "planning_seconds": round(t_plan, 2),
        "planning_over_calibration": round(t_plan / t_cal, 3) if t_cal > 0 else None,
        "budget": a.budget, "candidates": auto.candidates, "size": round(auto.size_ratio, 4),
        "counts": auto.counts(), "predicted": auto.predicted,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
    }
    print(json.dumps(results, indent=1), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
