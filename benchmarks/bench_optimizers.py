"""Conversion time and peak GPU memory per rounding optimizer on a Flux.1-dev-shaped checkpoint (12B).

Writes (or reuses) a bf16 checkpoint with the real Flux.1-dev tensor shapes and heavy-tailed random weights
with outlier channels (``comfyquant.testing.synthetic``), then converts it once per method with
``comfyquant.convert`` on the chosen device. Calibration statistics are synthetic but of the right size and
structure: per layer ``X^T X`` of ``rows`` Student-t rows with a few outlier input channels, generated on the
device when the layer is reached (a real Flux calibration file would hold ~50 GB of Hessians). Records wall
time and ``torch.cuda.max_memory_allocated`` per method; ``--peer`` also times convert_to_quant 1.3.4's
default learned rounding on the same file where its venv can be built.

    python benchmarks/bench_optimizers.py --device cuda --workdir /tmp/cq-opt --json docs/bench_optimizers.json
    python benchmarks/bench_optimizers.py --smoke          # tiny Flux shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.calibration.stats import LayerStats
from comfyquant.testing.architectures import arch_tensors
from comfyquant.testing.synthetic import ValueModel, student_t4, write_streamed


class SyntheticHessians:
    """Per-layer statistics made on demand: ``rows`` heavy-tailed inputs with outlier channels."""

    def __init__(self, features: dict[str, int], rows: int, device: str, seed: int = 0) -> None:
        self.meta = {"source": "synthetic heavy-tailed inputs with outlier channels (benchmark)"}
        self.features, self.rows, self.device, self.seed = features, rows, device, seed
        self.seconds = 0.0  # time spent making the synthetic statistics (left out of the optimizer's time)

    def get(self, layer: str) -> LayerStats | None:
        k = self.features.get(layer)
        if k is None:
            return None
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + zlib.crc32(layer.encode()))
        s = LayerStats.empty(k, 64, torch.float32 if self.device != "cpu" else torch.float64, self.device)
        done = 0
        while done < self.rows:
            n = min(4096, self.rows - done)
            x = student_t4(n * k, gen).reshape(n, k)
            x[:, torch.randperm(k, generator=gen, device=self.device)[: max(1, k // 512)]] *= 30.0
            s.update(x, None)
            done += n
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0  # the benchmark's own data, not the optimizer's cost
        return s


def flux_specs(blocks: int | None, smoke: bool) -> list[tuple[str, tuple[int, ...]]]:
    specs = [(n, tuple(s)) for n, s in arch_tensors("flux", "tiny" if smoke else "full")]
    if blocks is None:
        return specs

    def keep(name: str) -> bool:
        m = re.match(r"(double|single)_blocks\.(\d+)\.", name)
        return m is None or int(m.group(2)) < blocks
    return [(n, s) for n, s in specs if keep(n)]


def run_method(src: Path, out: Path, method: str, device: str, calib: SyntheticHessians) -> dict:
    from comfyquant import convert
    from comfyquant.optimize.config import LearnedConfig, OptimizerConfig

    cfg = OptimizerConfig(method=method, learned=LearnedConfig(iters=20 if device == "cpu" else 200), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if calib is not None:
        calib.seconds = 0.0
    t0 = time.perf_counter()
    rep = convert(src, out, format="int8-rot" if method == "quip" else "int8", model="flux", device=device,
                  force=True, progress=False, optimizer=cfg if method != "rtn" else None,
                  calibration=calib if method != "rtn" else None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    quant = [x for x in rep.layers if x.action == "quantize"]
    gains = [x.optimizer_gain_db for x in quant if x.optimizer_gain_db is not None]
    out.unlink(missing_ok=True)
    made = calib.seconds if calib is not None else 0.0
    return {"method": method, "seconds": round(wall - made, 1), "synthetic_stats_seconds": round(made, 1),
            "peak_gpu_gib": None if peak is None else round(peak, 2),
            "layers": len(quant), "mean_gain_db_vs_rtn": round(sum(gains) / len(gains), 2) if gains else None}


def run_peer(src: Path, out: Path, device: str, here: bool = False) -> dict:
    from comfyquant.eval.peer import PEER_VERSION, VENV
    from comfyquant.eval.peer import run_peer as peer

    t0 = time.perf_counter()
    try:
        peer(["-i", str(src), "-o", str(out), "--int8", "--scaling-mode", "row", "--comfy_quant", "--device",
              device.split(":")[0], "--manual_seed", "0", "--verbose", "MINIMAL"], venv=None if here else VENV)
    except (subprocess.CalledProcessError, OSError) as e:
        return {"method": f"convert_to_quant {PEER_VERSION} learned rounding", "error": str(e)[-300:]}
    out.unlink(missing_ok=True)
    return {"method": f"convert_to_quant {PEER_VERSION} learned rounding (default)",
            "seconds": round(time.perf_counter() - t0, 1), "peak_gpu_gib": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cq-bench-opt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="rtn,gptq,quip,learned")
    ap.add_argument("--blocks", type=int, default=None, help="only the first N double and N single blocks")
    ap.add_argument("--rows", type=int, default=None, help="calibration rows per layer (default 2 x in_features)")
    ap.add_argument("--smoke", action="store_true", help="tiny Flux shapes on the CPU (seconds)")
    ap.add_argument("--peer", action="store_true", help="also time convert_to_quant 1.3.4's learned rounding")
    ap.add_argument("--peer-here", action="store_true",
                    help="run the peer from this environment (installed from wheels; no venv, no network)")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    device = "cpu" if a.smoke else a.device
    if a.smoke:  # one block of each kind, few rows, short learned rounding: a CPU check that every path runs
        a.blocks, a.rows = 1 if a.blocks is None else a.blocks, a.rows or 128
    a.workdir.mkdir(parents=True, exist_ok=True)
    specs = flux_specs(a.blocks, a.smoke)
    src = a.workdir / f"flux-{'tiny' if a.smoke else 'full'}-{a.blocks or 'all'}.safetensors"
    if not src.exists():
        write_streamed(src, specs, dtype=torch.bfloat16, seed=0, metadata={"format": "pt"}, model=ValueModel())
    params = sum(math.prod(s) for _, s in specs)
    features = {n[: -len(".weight")]: s[1] for n, s in specs if n.endswith(".weight") and len(s) == 2}
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "parameters": params,
               "command": "python " + " ".join(sys.argv), "runs": []}
    for method in a.methods.split(","):
        calib = SyntheticHessians(features, a.rows or 0, device) if method != "rtn" else None
        if calib is not None:
            calib.rows = a.rows or 0
            calib = _sized(calib)
        r = run_method(src, a.workdir / f"out-{method}.safetensors", method, device, calib)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
    if a.peer:
        r = run_peer(src, a.workdir / "out-peer.safetensors", device, here=a.peer_here)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _sized(calib: SyntheticHessians) -> SyntheticHessians:
    """Default rows: twice the widest input (a full-rank Hessian), at least 256."""
    if calib.rows <= 0:
        calib.rows = max(256, 2 * max(calib.features.values()))
    return calib


if __name__ == "__main__":
    sys.exit(main())
