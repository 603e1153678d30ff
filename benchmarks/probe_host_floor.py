"""What one eager linear call costs the host, shape by shape, next to the dispatch calibration's single figure.

The cost model prices bf16 and each quantized path's host time from one tiny shape (``calibrate.HOST_SHAPE``,
1 x 256 x 256). H100 runs 130-131 read that table at bf16 23.1 / triton 25.7 µs where the sweep, minutes later in
the same process, timed the floor rows (M up to 4,096, 640-768 wide) at 14.5 / ~18.4: the dense copy was then
refused on five rows that ran 0.73-0.96x bf16. This times, in interleaved rounds (``calibrate.host_rounds``),
the calibration's own calls on its shape and on the sweep's floor shapes, bf16 with and without a bias, and
lists the CUDA runtime calls each bf16 call makes (a ``cudaMemsetAsync`` beside the GEMM costs the host ~8 µs):
whether the table's figure is the shape's or the host's phase. The profiler runs last, after every host round (run
132 read the same bf16 call at 12.5 µs before it had run and 15.8 after; run 136 saw the same rise between passes
with no profiler: the host's phase).

    python benchmarks/probe_host_floor.py --out /tmp/floor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.runtime.kernels import calibrate

# (M, N, K): the calibration's shape, then rows of the SDXL / CLIP-L sweep that sit on the host floor
SHAPES = ((1, 256, 256), (256, 256, 256), (1, 640, 640), (4096, 640, 640), (1, 1280, 1280), (256, 1280, 1280),
          (4096, 768, 768), (1024, 768, 3072), (256, 768, 3072), (1, 3072, 768), (1, 1280, 5120))
PATHS = ("triton", "triton_fused", "triton_w8a16")


def runtime_calls(fn, n: int = 20) -> dict[str, float]:
    """CUDA runtime / driver calls per ``fn()`` call, and the kernels it ran (names per call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    calls: Counter = Counter()
    for e in prof.events():
        name = e.name
        if name.startswith(("cuda", "cu")) and name != "cudaDeviceSynchronize":
            calls[name] += 1
        elif e.device_type == torch.autograd.DeviceType.CUDA:
            calls["kernel " + name[:60]] += 1
    return {k: v / n for k, v in sorted(calls.items())}


def calls_of(shape: tuple[int, int, int], dev: torch.device) -> dict:
    """The calibration's calls on ``shape`` (bf16 first, as it times them) and bf16 with a bias."""
    paths = tuple(p for p in PATHS if p in calibrate.measurable_paths(dev))
    fns, o = calibrate.timed_calls(shape, dev, ("bf16", *paths))
    bias = torch.randn(shape[1], device=dev, dtype=torch.bfloat16)
    fns["bf16_bias"] = lambda: F.linear(o["x"], o["wb"], bias)
    return fns


def probe(shape: tuple[int, int, int], dev: torch.device) -> dict:
    per = calibrate.host_rounds(calls_of(shape, dev))
    return {"m": shape[0], "n": shape[1], "k": shape[2], "host_us": calibrate.medians(per), "rounds_us": per}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--passes", type=int, default=2, help="passes over the shapes (a phase shows as a drift)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    table = calibrate.measure(dev)
    res: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                 "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                 "calibration": {"host_us": dict(table.host_us), "measured": table.measured}, "passes": []}
    print(f"calibrate.measure: bf16 {table.host('bf16'):.1f} µs, triton {table.host('triton'):.1f}, "
          f"fused {table.host('triton_fused'):.1f}, w8a16 {table.host('triton_w8a16'):.1f} ({table.measured})")
    for i in range(args.passes):
        rows = []
        for shape in SHAPES:
            r = probe(shape, dev)
            rows.append(r)
            print(f"pass {i} M={shape[0]:5d} N={shape[1]:5d} K={shape[2]:5d} " + " ".join(
                f"{p} {v:5.1f}" for p, v in r["host_us"].items()), flush=True)
        res["passes"].append(rows)
    again = calibrate.measure(dev)
    # the profiler last: nothing it leaves behind can reach the host rounds
    res["bf16_calls"] = {}
    for shape in SHAPES:
        fns = calls_of(shape, dev)
        calls = {p: runtime_calls(fns[p]) for p in ("bf16", "bf16_bias")}
        res["bf16_calls"][str(shape)] = calls
        kern = [c[7:] for c in calls["bf16"] if c.startswith("kernel ")]
        print(f"M={shape[0]:5d} N={shape[1]:5d} K={shape[2]:5d} bf16 memsets/call "
              f"{calls['bf16'].get('cudaMemsetAsync', 0.0):.1f} {kern}", flush=True)
    res["calibration_again"] = {"host_us": dict(again.host_us), "measured": again.measured}
    print(f"calibrate.measure again: bf16 {again.host('bf16'):.1f} µs, triton {again.host('triton'):.1f} "
          f"({again.measured}); {time.time() - t0:.0f} s")
    (args.out / "host_floor.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
