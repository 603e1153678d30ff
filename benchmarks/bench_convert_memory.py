"""Converter memory and speed on a large synthetic checkpoint, next to a plain copy and convert_to_quant 1.3.4.

Generates (or reuses) a bf16 checkpoint with full-size Flux.1-dev tensor shapes, cut to ``--size-gb``; then in
one run: times a plain copy of it (``sendfile`` plus ``fsync``), converts it with ``comfyquant convert --format
int8`` in a subprocess (wall time; peak RSS from ``wait4``'s ``ru_maxrss`` plus polled anonymous/file-backed
RSS), and runs ``convert_to_quant==1.3.4`` from PyPI, installed in its own virtual environment, with its closest
equivalent (``--int8 --scaling_mode row --comfy_quant --simple``: per-row int8_tensorwise, RTN without learned
rounding; it still corrects biases from simulated calibration data and keeps fewer layers in bf16). Checks
peak RSS < 2 GiB + 4 x the largest tensor and reports the copy ratio (target <= 2). With ``--processes 1,2``
it also converts with ``torchrun --nproc-per-node 2 -m comfyquant convert`` (peak RSS per process, output
checked byte-identical to one process). Linux only.

    python benchmarks/bench_convert_memory.py --size-gb 8 --workdir /tmp/cq-bench \\
        --json docs/bench_convert_memory.json --markdown docs/bench_convert_memory.md --processes 1,2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.io.digest import file_sha256
from comfyquant.testing.architectures import arch_tensors
from comfyquant.testing.synthetic import ValueModel, write_streamed

GIB = 1 << 30
PEER_REQUIREMENT = "convert_to_quant==1.3.4"
# convert_to_quant declares no torch/safetensors dependency and imports scipy and triton unconditionally on its
# int8 path (triton only to import kernels it does not use on the CPU); torch is pinned so pip takes the CPU build.
PEER_PACKAGES = (PEER_REQUIREMENT, "torch==2.13.0", "safetensors", "numpy", "tqdm", "scipy", "triton")
PEER_ARGS = ("--int8", "--scaling_mode", "row", "--comfy_quant", "--simple", "--device", "cpu")


@dataclass
class Measured:
    """One subprocess run: exit status, wall time, peak memory (bytes) and the end of its output."""

    name: str
    command: list[str]
    returncode: int
    wall_s: float
    ru_maxrss_bytes: int
    polled_peak_rss_bytes: int
    polled_peak_anon_bytes: int
    polled_peak_file_bytes: int
    output_tail: list[str] = field(default_factory=list)
    output_bytes: int | None = None
    timed_out: bool = False
    per_process_peak_rss_bytes: dict[str, int] = field(default_factory=dict)  # "rank N" / "launcher" -> peak


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flux_specs(size_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Full-size Flux.1-dev tensors in checkpoint order: all non-block tensors, then block tensors until the
    bf16 total reaches ``size_gb`` GiB (the real model is ~22 GiB)."""
    target = size_gb * GIB
    specs = [(n, tuple(s)) for n, s in arch_tensors("flux", "full")]
    outer = [t for t in specs if not t[0].startswith(("double_blocks.", "single_blocks."))]
    blocks = [t for t in specs if t[0].startswith(("double_blocks.", "single_blocks."))]
    chosen, total = list(outer), sum(2 * math.prod(s) for _, s in outer)
    for name, shape in blocks:
        if total >= target:
            break
        chosen.append((name, shape))
        total += 2 * math.prod(shape)
    return chosen


def make_input(path: Path, size_gb: float, seed: int) -> dict[str, object]:
    """Write the synthetic checkpoint unless ``path`` already holds one of the same spec."""
    specs = flux_specs(size_gb)
    spec_id = {"arch": "flux", "size": "full", "cut_gib": size_gb, "seed": seed, "tensors": len(specs)}
    largest = max(2 * math.prod(s) for _, s in specs)
    stamp = path.with_name(path.name + ".spec.json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == spec_id:
        log(f"reusing {path} ({path.stat().st_size / GIB:.2f} GiB)")
        return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(specs), "largest_tensor_bytes":
                largest, "generated_s": None}
    log(f"generating {path}: {len(specs)} full-size Flux tensors, bf16, ~{size_gb} GiB")
    t0 = time.perf_counter()
    write_streamed(path, specs, dtype=torch.bfloat16, seed=seed, model=ValueModel(),
                   metadata={"comfyquant.synthetic": json.dumps(spec_id)})
    stamp.write_text(json.dumps(spec_id))
    dt = time.perf_counter() - t0
    log(f"generated {path.stat().st_size / GIB:.2f} GiB in {dt:.1f} s")
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(specs), "largest_tensor_bytes": largest,
            "generated_s": round(dt, 2)}


def describe_input(path: Path) -> dict[str, object]:
    """Size, tensor count and largest tensor of an existing safetensors file, from its header alone."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    spans = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(spans),
            "largest_tensor_bytes": max(spans), "generated_s": None}


def _proc_mem(pid: int) -> tuple[int, int, int]:
    """(RSS, RssAnon, RssFile) in bytes of one process from /proc, zeros if it is gone."""
    vals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in vals:
                    vals[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):  # exited between polls
        pass
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(x) for x in fh.read().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _role(pid: int) -> str:
    """``rank N`` for a process torchrun started (its RANK variable), else ``launcher`` (torchrun itself, or
    the only process of a plain run)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(x.split(b"=", 1) for x in fh.read().split(b"\0") if b"=" in x)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "launcher"
    return f"rank {env[b'RANK'].decode()}" if b"RANK" in env else "launcher"


def run_measured(name: str, cmd: list[str], log_path: Path, output: Path | None = None,
                 timeout: float | None = None, interval: float = 0.05, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``, polling its process tree's memory; ``wait4`` gives the kernel's peak RSS of the child.

    Past ``timeout`` seconds the process is killed and the run is recorded as timed out. Each process of the
    tree is also tracked on its own (a torchrun job: the launcher and one process per rank).
    """
    log(f"{name}: {' '.join(cmd)}")
    peaks = [0, 0, 0]
    per_pid: dict[int, int] = {}
    roles: dict[int, str] = {}
    timed_out = False
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        last = t0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sums = [0, 0, 0]
            for p in (proc.pid, *_children(proc.pid)):
                mem = _proc_mem(p)
                for i, v in enumerate(mem):
                    sums[i] += v
                if roles.get(p, "launcher") == "launcher":
                    # read again until a rank shows: between fork and exec a worker still has the launcher's
                    # environment (no RANK); caching that labelled rank 1 "launcher" (1 of 5 CI runs today)
                    roles[p] = _role(p)
                per_pid[p] = max(per_pid.get(p, 0), mem[0])
            peaks = [max(a, b) for a, b in zip(peaks, sums, strict=True)]
            if timeout is not None and not timed_out and time.perf_counter() - t0 > timeout:
                log(f"  {name}: killed after {timeout:.0f} s (--timeout)")
                proc.kill()
                timed_out = True
            if time.perf_counter() - last > 15:
                last = time.perf_counter()
                log(f"  {name}: {last - t0:.0f} s, RSS {sums[0] / GIB:.2f} GiB (anon {sums[1] / GIB:.2f})")
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
    per_role: dict[str, int] = {}
    ranked = any(r != "launcher" for r in roles.values())
    for p, v in per_pid.items():
        role = roles[p] if ranked else "process"  # a plain run: one process, no launcher
        per_role[role] = max(per_role.get(role, 0), v)
    m = Measured(name, cmd, proc.returncode, round(wall, 2), usage.ru_maxrss * 1024, *peaks, tail,
                 output.stat().st_size if output is not None and output.exists() else None, timed_out,
                 dict(sorted(per_role.items())))
    log(f"{name}: exit {m.returncode}, {m.wall_s:.1f} s, peak RSS {m.ru_maxrss_bytes / GIB:.2f} GiB "
        f"(polled anon {m.polled_peak_anon_bytes / GIB:.2f}, file {m.polled_peak_file_bytes / GIB:.2f})")
    return m


def timed_copy(src: Path, dst: Path) -> dict[str, float]:
    """Plain copy (``shutil.copyfile`` = sendfile on Linux) and the fsync that makes it durable, timed apart."""
    log(f"copy: {src} -> {dst}")
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    t1 = time.perf_counter()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    log(f"copy: {t1 - t0:.1f} s (+ fsync {t2 - t1:.1f} s)")
    return {"copy_s": round(t1 - t0, 2), "fsync_s": round(t2 - t1, 2), "copy_fsync_s": round(t2 - t0, 2)}


def setup_peer(venv: Path) -> tuple[Path | None, str | None]:
    """A virtual environment with convert_to_quant 1.3.4; returns (its console script, error line or None)."""
    script = venv / "bin" / "convert_to_quant"
    if script.exists():
        return script, None
    log(f"peer: creating {venv} and installing {' '.join(PEER_PACKAGES)}")
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              *PEER_PACKAGES])
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            lines = [x for x in (res.stderr or res.stdout).splitlines() if x.strip()]
            return None, f"{' '.join(cmd[:4])} failed: {lines[-1] if lines else res.returncode}"
    return script, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quantized_layers(path: Path) -> int:
    """How many ``comfy_quant`` layers a written file holds (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(k.endswith(".comfy_quant") for k in f.keys())


def to_markdown(res: dict[str, object]) -> str:
    inp = res["input"]
    rows = ["| run | wall s | x copy+fsync | peak RSS GiB (ru_maxrss) | polled anon GiB | polled file GiB | "
            "peak RSS per process GiB | output GiB | quantized layers | status |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    copy = res["copy"]
    rows.append(f"| plain copy (sendfile) + fsync | {copy['copy_fsync_s']:.1f} | 1.00 | - | - | - | - | "
                f"{inp['bytes'] / GIB:.2f} | - | copy {copy['copy_s']:.1f} s + fsync {copy['fsync_s']:.1f} s |")
    for m in res["runs"]:
        ratio = m["wall_s"] / copy["copy_fsync_s"] if copy["copy_fsync_s"] else float("nan")
        status = "ok" if m["returncode"] == 0 else f"exit {m['returncode']}: {(m['output_tail'] or [''])[-1][:80]}"
        if m["timed_out"]:
            status = f"killed after {m['wall_s']:.0f} s (timeout); time and memory are lower bounds"
        out = f"{m['output_bytes'] / GIB:.2f}" if m["output_bytes"] else "-"
        layers = m["quantized_layers"] if m["quantized_layers"] is not None else "-"
        if m.get("identical_to_1_process") is not None:
            status += "; output identical to 1 process" if m["identical_to_1_process"] else "; OUTPUT DIFFERS"
        per = ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.get("per_process_peak_rss_bytes", {}).items()) or "-"
        rows.append(f"| {m['name']} | {m['wall_s']:.1f} | {ratio:.2f} | {m['ru_maxrss_bytes'] / GIB:.2f} | "
                    f"{m['polled_peak_anon_bytes'] / GIB:.2f} | {m['polled_peak_file_bytes'] / GIB:.2f} | {per} | "
                    f"{out} | {layers} | {status} |")
    if res.get("peer_error"):
        rows.append(f"| convert_to_quant 1.3.4 | - | - | - | - | - | - | - | - | not run: {res['peer_error']} |")
    checks = res["checks"]
    load = res["machine"].get("loadavg_before")
    lines = [f"Input: {inp['bytes'] / GIB:.2f} GiB bf16, {inp['tensors']} full-size Flux.1-dev tensors, largest "
             f"{inp['largest_tensor_bytes'] / 2**20:.0f} MiB. Machine: {res['machine']['cpus']} CPUs, "
             f"{res['machine']['ram_gib']:.0f} GiB RAM, torch {res['machine']['torch']}"
             + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} before the runs" if load else "")
             + (". Page cache dropped before every run (the input read from disk)"
                if res["machine"].get("cold_cache") else ". Input possibly in the page cache")
             + ".", "", *rows, "",
             f"- memory: peak RSS {checks['peak_rss_gib']:.2f} GiB vs limit {checks['rss_limit_gib']:.2f} GiB "
             f"(2 GiB + 4 x largest tensor, every comfyquant process): {'PASS' if checks['rss_ok'] else 'FAIL'}",
             f"- speed: convert / (copy + fsync) = {checks['copy_ratio']:.2f} (target <= 2; our writer fsyncs its "
             f"output): {'PASS' if checks['copy_ok'] else 'MISS'}; convert / copy alone = "
             f"{checks['copy_ratio_no_fsync']:.2f}"]
    return "\n".join(lines) + "\n"


def drop_page_cache() -> None:
    """Write dirty pages and drop the page cache (Linux, root): the next read of the input comes from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"bench_convert_memory: --cold-cache needs root on Linux ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=8.0, help="input size in GiB (default 8)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/comfyquant-bench"),
                    help="input, outputs and the peer's venv go here (needs ~3.5x size-gb free)")
    ap.add_argument("--input", type=Path, default=None,
                    help="an existing checkpoint to convert instead of the synthetic one (never written to); by "
                         "default WORKDIR/flux-<size>gib.safetensors is generated, or reused if it has the same spec")
    ap.add_argument("--json", type=Path, required=True, help="results as JSON")
    ap.add_argument("--markdown", type=Path, required=True, help="results as a markdown table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="flux", help="comfyquant --model for the conversion (default flux)")
    ap.add_argument("--skip-peer", action="store_true", help="do not install/run convert_to_quant")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds after which a conversion is killed and recorded as timed out (default 600)")
    ap.add_argument("--keep", action="store_true", help="keep the input and outputs (default: keep input only)")
    ap.add_argument("--processes", default="1",
                    help="comma-separated process counts for comfyquant (default 1); N > 1 runs "
                         "`torchrun --nproc-per-node N -m comfyquant convert ...` and checks the output is "
                         "byte-identical to the 1-process one")
    ap.add_argument("--cold-cache", action="store_true",
                    help="drop the page cache before the copy and before each conversion (needs root), so "
                         "every run reads its input from disk, as a first conversion of a downloaded file does")
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("error: this benchmark reads /proc and needs Linux", file=sys.stderr)
        return 2
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.input is not None:
        if not args.input.is_file():
            print(f"error: input not found: {args.input}", file=sys.stderr)
            return 2
        src, inp = args.input, describe_input(args.input)
    else:
        src = work / f"flux-{args.size_gb:g}gib.safetensors"
        inp = make_input(src, args.size_gb, args.seed)

    load_before = list(os.getloadavg())
    log(f"load average before the runs: {load_before}")
    cold = (lambda: drop_page_cache()) if args.cold_cache else (lambda: None)
    copy_path = work / "copy.safetensors"
    cold()
    copy = timed_copy(src, copy_path)
    copy_path.unlink()

    runs: list[Measured] = []
    counts = sorted({int(x) for x in args.processes.split(",")})
    if counts[0] != 1:
        counts.insert(0, 1)  # the reference every multi-process output is compared with
    cli = Path(sys.executable).parent / "comfyquant"
    extra: dict[str, dict[str, object]] = {}
    ref_out = work / "ours-int8-1p.safetensors"
    for n in counts:
        out = work / f"ours-int8-{n}p.safetensors"
        out.unlink(missing_ok=True)
        conv = ["convert", str(src), "-o", str(out), "--format", "int8", "--model", args.model]
        if n == 1:
            name, cmd = "comfyquant convert --format int8", [str(cli), *conv]
        else:
            name = f"torchrun --nproc-per-node {n} -m comfyquant convert --format int8"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), "-m", "comfyquant", *conv]
        # N processes share the cores: cores / N threads each (what torchrun's default of 1 is on 2 cores)
        env = None if n == 1 else {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        cold()
        m = run_measured(name, cmd, work / f"ours-{n}p.log", out, args.timeout, env=env)
        runs.append(m)
        info: dict[str, object] = {}
        if m.returncode == 0:
            info["quantized_layers"] = quantized_layers(out)
            if n > 1 and ref_out.exists():
                info["identical_to_1_process"] = file_sha256(out) == file_sha256(ref_out)
                log(f"{name}: output identical to 1 process: {info['identical_to_1_process']}")
        extra[m.name] = info
        if n > 1 and not args.keep:
            out.unlink(missing_ok=True)
    ours = runs[0]
    ours_out = ref_out
    peer_error = None
    if not args.skip_peer:
        script, peer_error = setup_peer(work / "ctq-venv")
        if script is not None:
            peer_out = work / "peer-int8.safetensors"
            peer_out.unlink(missing_ok=True)
            cold()
            peer = run_measured("convert_to_quant 1.3.4 --int8 --scaling_mode row --simple",
                                [str(script), "-i", str(src), "-o", str(peer_out), *PEER_ARGS],
                                work / "peer.log", peer_out, args.timeout)
            runs.append(peer)
            if peer.returncode == 0 and peer_out.exists():
                extra[peer.name] = {"quantized_layers": quantized_layers(peer_out)}
            if not args.keep:
                peer_out.unlink(missing_ok=True)
    if not args.keep:
        ours_out.unlink(missing_ok=True)

    limit = 2 * GIB + 4 * int(inp["largest_tensor_bytes"])
    mine = [m for m in runs if "comfyquant" in m.name]
    worst = max(max(m.per_process_peak_rss_bytes.values(), default=m.ru_maxrss_bytes) for m in mine)
    checks = {"peak_rss_gib": ours.ru_maxrss_bytes / GIB, "rss_limit_gib": limit / GIB,
              "worst_process_peak_rss_gib": worst / GIB,
              "rss_ok": all(m.returncode == 0 for m in mine) and ours.ru_maxrss_bytes < limit and worst < limit,
              "copy_ratio": ours.wall_s / copy["copy_fsync_s"] if copy["copy_fsync_s"] else float("inf"),
              "copy_ratio_no_fsync": ours.wall_s / copy["copy_s"] if copy["copy_s"] else float("inf")}
    checks["copy_ok"] = ours.returncode == 0 and checks["copy_ratio"] <= 2.0
    res = {"input": inp, "copy": copy,
           "runs": [{**asdict(m), "quantized_layers": None, "identical_to_1_process": None, **extra.get(m.name, {})}
                    for m in runs],
           "peer_error": peer_error, "checks": checks,
           "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "cold_cache": args.cold_cache, "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
                       "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__},
           "note": "input written just before the runs, so copy and conversions read it from the page cache "
                   "when it fits in RAM; ru_maxrss counts file-backed (mmap) pages as well as private memory"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(md)
    print(md)
    return 0 if checks["rss_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
