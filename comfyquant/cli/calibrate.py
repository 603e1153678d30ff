"""``comfyquant calibrate MODEL -o calib.safetensors``: run a reference model on real inputs, save statistics."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyquant.errors import UserError
from comfyquant.exits import run_cli

if TYPE_CHECKING:
    from comfyquant.distributed.config import DistConfig
    from comfyquant.eval.calibration_sources import Source


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comfyquant calibrate", description=(
        "Run a model on real inputs and store per-layer input statistics (Hessian X^T X, absmax, a percentile, "
        "a row sample) for --calibration on convert/eval."))
    p.add_argument("model", metavar="MODEL", help="digits-dit | minilm | a float .safetensors of one of them")
    p.add_argument("-o", "--output", required=True, type=Path, help="calibration file to write (.safetensors)")
    p.add_argument("--samples", type=int, default=None,
                   help="DiT: trajectories per class (default 2); MiniLM: first N calibration sentences")
    p.add_argument("--steps", type=int, default=None, help="DiT: sampling steps per trajectory (default 20)")
    p.add_argument("--seed", type=int, default=None, help="DiT sampling seed (default 777; the eval uses 1234)")
    p.add_argument("--reservoir", type=int, default=512, help="input rows sampled per layer (default 512)")
    p.add_argument("--percentile", type=float, default=99.9, help="|x| percentile stored per channel")
    p.add_argument("--device", default=None, help="where the model runs and statistics accumulate (cpu/cuda)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="statistics held in memory at once; above it layers are collected in several runs")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    from comfyquant.cli.main import add_dist_args

    add_dist_args(p)
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
    from comfyquant.cli.main import dist_config

    job = dist_config(a)
    if job is not None:
        return _main_distributed(a, job)
    src = resolve_source(a.model, samples=a.samples, seed=a.seed, steps=a.steps)
    if a.device:
        src.model.to(a.device)
    cfg = CalibrationConfig(reservoir=a.reservoir, percentile=a.percentile, device=a.device,
                            max_bytes=int(a.max_gib * 2**30) if a.max_gib else None)
    start = time.perf_counter()
    summary = calibrate_to_file(src.model, src.run, a.output, config=cfg, meta=src.meta, overwrite=a.force,
                                progress=sys.stderr.isatty())
    _print_summary(a, src, summary, start)
    return 0


def _main_distributed(a: argparse.Namespace, job: DistConfig) -> int:
    """Under torchrun: every rank runs its part of the calibration inputs; rank 0 writes the file."""
    from comfyquant.calibration.collector import CalibrationConfig
    from comfyquant.distributed import Session
    from comfyquant.distributed.calibrate import calibrate_to_file_distributed
    from comfyquant.distributed.session import rank_device
    from comfyquant.eval.calibration_sources import resolve_source

    device = rank_device(a.device, job) if a.device else None
    with Session(job, "comfyquant", "cuda" if device and device.startswith("cuda") else "cpu") as s:
        src = resolve_source(a.model, samples=a.samples, seed=a.seed, steps=a.steps,
                             shard=(s.rank, s.world))
        if device:
            src.model.to(device)
        cfg = CalibrationConfig(reservoir=a.reservoir, percentile=a.percentile, device=device,
                                max_bytes=int(a.max_gib * 2**30) if a.max_gib else None)
        start = time.perf_counter()
        summary = calibrate_to_file_distributed(src.model, src.run, a.output, s, config=cfg, meta=src.meta,
                                                overwrite=a.force, progress=sys.stderr.isatty())
    if summary is not None:
        _print_summary(a, src, summary, start)
    return 0


def _print_summary(a: argparse.Namespace, src: Source, summary: dict[str, Any], start: float) -> None:
    rows = summary["rows"]
    ranks = f" on {summary['processes']} processes" if summary.get("processes", 1) > 1 else ""
    print(f"calibrated {summary['layers']} layers of {src.name} ({src.meta['source']}){ranks} in "
          f"{time.perf_counter() - start:.1f} s, {summary['groups']} run(s); rows per layer "
          f"{min(rows.values())}..{max(rows.values())}")
    if summary["not_run"]:
        print(f"note: {len(summary['not_run'])} layer(s) never ran (no statistics): "
              + ", ".join(summary["not_run"][:5]))
    print(f"wrote {a.output}")
