"""GPTQ conversion of a Flux.1-dev-shaped checkpoint (12B) on 1 process vs N processes (GPUs) with torchrun.

The same workload as ``bench_optimizers.py`` (heavy-tailed bf16 weights with outlier channels; per-layer
calibration statistics of the right size, ``X^T X`` of ``2 x in_features`` heavy-tailed rows made on the
device of the rank that owns the layer, so no process ever holds every Hessian), converted once on one
process and once per ``--processes`` count under ``torchrun --nproc-per-node N``. Records wall time of the
whole job, and per rank: its own time, peak GPU memory (``torch.cuda.max_memory_allocated``), peak RSS, and
the layers it owned; checks the N-process file against the 1-process one (bytes, else per-layer max
difference of the dequantized weights).

    python benchmarks/bench_distributed.py --device cuda --processes 1,8 --workdir /tmp/cq-dist \\
        --json benchmarks/results/distributed_gptq_h200.json --markdown benchmarks/results/distributed_gptq_h200.md
    python benchmarks/bench_distributed.py --smoke          # tiny Flux shapes, CPU, gloo, 1 vs 2 processes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.io.digest import file_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert_memory import _free_port
from bench_optimizers import SyntheticHessians, flux_specs

from comfyquant.testing.synthetic import ValueModel, write_streamed

GIB = 1 << 30



def worker(a: argparse.Namespace) -> int:
    """One rank (or the only process): convert with GPTQ, write this rank's measurements as JSON."""
    from comfyquant.convert.api import convert_options
    from comfyquant.convert.pipeline import run_conversion
    from comfyquant.distributed import Session, from_torchrun_env
    from comfyquant.distributed.convert import convert_distributed
    from comfyquant.distributed.session import rank_device
    from comfyquant.optimize.config import OptimizerConfig

    job = from_torchrun_env(os.environ, a.dist_timeout)  # a benchmark script is an edge, like the CLI
    rank = 0 if job is None else job.rank
    device = a.device if job is None else rank_device(a.device, job)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.cuda.reset_peak_memory_stats()
    specs = flux_specs(a.blocks, a.smoke)
    features = {n[: -len(".weight")]: s[1] for n, s in specs if n.endswith(".weight") and len(s) == 2}
    calib = SyntheticHessians(features, a.rows or max(256, 2 * max(features.values())), device)
    opts = convert_options(a.output, format="int8", model="flux", device=device, force=True, progress=False,
                           optimizer=OptimizerConfig(method="gptq", device=device), calibration=calib)
    t0 = time.perf_counter()
    if job is None:
        rep = run_conversion(a.input, a.output, opts)
    else:
        with Session(job, "bench", "cuda" if device.startswith("cuda") else "cpu") as s:
            rep = convert_distributed(a.input, a.output, opts, s, announce=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res = {"rank": rank, "device": device, "seconds": round(time.perf_counter() - t0, 2),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.startswith("cuda") else None,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
    if rep is not None:
        quant = [x for x in rep.layers if x.action == "quantize"]
        res["layers"] = len(quant)
        res["gptq_layers"] = sum(x.optimizer == "gptq" for x in quant)
    Path(f"{a.result}.rank{rank}.json").write_text(json.dumps(res))
    return 0


def run_job(a: argparse.Namespace, n: int, src: Path, out: Path) -> dict:
    """Launch one conversion (directly, or under torchrun) and collect every rank's measurements."""
    result = a.workdir / f"result-{n}p"
    for old in a.workdir.glob(f"result-{n}p.rank*.json"):
        old.unlink()
    args = [str(Path(__file__).resolve()), "--worker", "--input", str(src), "--output", str(out), "--result",
            str(result), "--device", a.device, "--dist-timeout", str(a.dist_timeout)]
    args += (["--smoke"] if a.smoke else []) + (["--blocks", str(a.blocks)] if a.blocks else [])
    args += ["--rows", str(a.rows)] if a.rows else []
    if n == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), *args]
    print(f"[{time.strftime('%H:%M:%S')}] {n} process(es): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    threads = str(max(1, (os.cpu_count() or 1) // n))  # the machine's cores shared out between the processes
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": threads})
    wall = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(a.workdir.glob(f"result-{n}p.rank*.json"))]
    return {"processes": n, "threads_per_process": int(threads), "returncode": proc.returncode,
            "wall_s": round(wall, 2), "ranks": ranks,
            "stderr_tail": proc.stderr.strip().splitlines()[-5:]}


def to_markdown(res: dict) -> str:
    rows = ["| processes x threads | job wall s | speed-up | per rank: s / peak GPU GiB / peak RSS GiB | file vs 1 process |",
            "| ---: | ---: | ---: | --- | --- |"]
    base = res["jobs"][0]["wall_s"]
    for j in res["jobs"]:
        per = "; ".join(f"r{r['rank']}: {r['seconds']:.0f} / {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'}"
                        f" / {r['peak_rss_gib']:.2f}" for r in j["ranks"]) or f"failed (exit {j['returncode']})"
        same = "-" if j["processes"] == 1 else ("identical" if j.get("identical") else j.get("difference", "?"))
        rows.append(f"| {j['processes']} x {j['threads_per_process']} | {j['wall_s']:.1f} | {base / j['wall_s']:.2f} | {per} | {same} |")
    return (f"{res['parameters'] / 1e6:.1f}M-parameter Flux.1-dev-shaped checkpoint, GPTQ int8, device "
            f"{res['device']}, torch {res['torch']}, {res['date']}.\n\n" + "\n".join(rows) + "\n")


def _compare(a: Path, b: Path) -> dict:
    if file_sha256(a) == file_sha256(b):
        return {"identical": True}
    from safetensors.torch import load_file

    from comfyquant.formats import dequantize_weight
    from comfyquant.io.comfy_meta import decode_comfy_quant

    x, y = load_file(str(a)), load_file(str(b))
    worst = 0.0
    for k in x:
        if k.endswith(".comfy_quant"):
            layer = k[: -len(".comfy_quant")]
            conf = decode_comfy_quant(x[k])
            wx, wy = (dequantize_weight({"weight": s[f"{layer}.weight"], "weight_scale": s[f"{layer}.weight_scale"]},
                                        conf) for s in (x, y))
            worst = max(worst, float((wx - wy).norm() / wx.norm()))
    return {"identical": False, "difference": f"max per-layer relative weight difference {worst:.2e}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cq-bench-dist"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts (1 is always run first)")
    ap.add_argument("--blocks", type=int, default=None, help="only the first N double and N single blocks")
    ap.add_argument("--rows", type=int, default=None, help="calibration rows per layer (default 2 x in_features)")
    ap.add_argument("--smoke", action="store_true", help="tiny Flux shapes on the CPU with 128 rows (seconds)")
    ap.add_argument("--dist-timeout", type=float, default=3600.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.device, a.blocks, a.rows = "cpu", a.blocks or 1, a.rows or 128
    if a.worker:
        return worker(a)
    a.workdir.mkdir(parents=True, exist_ok=True)
    specs = flux_specs(a.blocks, a.smoke)
    src = a.workdir / f"flux-{'tiny' if a.smoke else 'full'}-{a.blocks or 'all'}.safetensors"
    if not src.exists():
        write_streamed(src, specs, dtype=torch.bfloat16, seed=0, metadata={"format": "pt"}, model=ValueModel())
    counts = sorted({1, *(int(x) for x in a.processes.split(","))})
    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "loadavg_before": list(os.getloadavg()),
           "parameters": sum(math.prod(s) for _, s in specs), "command": "python " + " ".join(sys.argv), "jobs": []}
    ref = a.workdir / "out-1p.safetensors"
    for n in counts:
        out = a.workdir / f"out-{n}p.safetensors"
        job = run_job(a, n, src, out)
        if n > 1 and job["returncode"] == 0 and ref.exists():
            job.update(_compare(ref, out))
            out.unlink(missing_ok=True)
        print(json.dumps(job), flush=True)
        res["jobs"].append(job)
    ref.unlink(missing_ok=True)
    md = to_markdown(res)
    print(md)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    if a.markdown:
        a.markdown.write_text(md)
    return 0 if all(j["returncode"] == 0 for j in res["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
