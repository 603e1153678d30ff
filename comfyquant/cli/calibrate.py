"""``comfyquant calibrate MODEL -o calib.safetensors``: run a reference model on real inputs, save statistics."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from comfyquant.errors import UserError
from comfyquant.exits import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comfyquant calibrate", description=(
        "Run a model on real inputs and store per-layer input statistics (Hessian X^T X, absmax, a percentile, "
        "a row sample) for --calibration on convert/eval."))
    p.add_argument("model", metavar="MODEL", help="digits-dit | minilm | a float .safetensors of one of them")
    p.add_argument("-o", "--output", required=True, type=Path, help="calibration file to write (.safetensors)")
    p.add_argument("--samples", type=int, default=None,
                   help="DiT: trajectories per class (default 2); MiniLM: first N calibration sentences")
    p.add_argument("--seed", type=int, default=None, help="DiT sampling seed (default 777; the eval uses 1234)")
    p.add_argument("--reservoir", type=int, default=512, help="input rows sampled per layer (default 512)")
    p.add_argument("--percentile", type=float, default=99.9, help="|x| percentile stored per channel")
    p.add_argument("--device", default=None, help="where the model runs and statistics accumulate (cpu/cuda)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="statistics held in memory at once; above it layers are collected in several runs")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli("comfyquant calibrate", _main, argv)


def _main(argv: list[str] | None) -> int:
    a = parser().parse_args(argv)
    from comfyquant.calibration.collector import CalibrationConfig, calibrate_to_file
    from comfyquant.eval.calibration_sources import resolve_source

    if a.output.exists() and not a.force:
        raise UserError(f"output exists: {a.output} (use --force to overwrite)")
    if a.reservoir < 0 or not 0 < a.percentile <= 100:
        raise UserError("--reservoir must be >= 0 and --percentile in (0, 100]")
    src = resolve_source(a.model, samples=a.samples, seed=a.seed)
    if a.device:
        src.model.to(a.device)
    cfg = CalibrationConfig(reservoir=a.reservoir, percentile=a.percentile, device=a.device,
                            max_bytes=int(a.max_gib * 2**30) if a.max_gib else None)
    start = time.perf_counter()
    summary = calibrate_to_file(src.model, src.run, a.output, config=cfg, meta=src.meta, overwrite=a.force,
                                progress=sys.stderr.isatty())
    rows = summary["rows"]
    print(f"calibrated {summary['layers']} layers of {src.name} ({src.meta['source']}) in "
          f"{time.perf_counter() - start:.1f} s, {summary['groups']} run(s); rows per layer "
          f"{min(rows.values())}..{max(rows.values())}")
    if summary["not_run"]:
        print(f"note: {len(summary['not_run'])} layer(s) never ran (no statistics): "
              + ", ".join(summary["not_run"][:5]))
    print(f"wrote {a.output}")
    return 0
