"""torch._int_mm on a CPU whose oneDNN has no VNNI returns wrong int8 x int8 sums, with no error.

Self-contained (torch only), the text to attach to a report to pytorch/pytorch and ComfyUI. It runs one
64 x 256 x 128 product of random int8 codes in two fresh processes, oneDNN uncapped and capped with
``ONEDNN_MAX_CPU_ISA=AVX2`` (what oneDNN does on a CPU without VNNI: AMD Zen 2-3, Intel before Ice Lake), and
compares each with the exact int64 product. It also checks a model of the wrong sums: the s8 x s8 GEMM shifts A to
u8 (a + 128), multiplies adjacent pairs along K into int16 with saturation (``vpmaddubsw``), then subtracts
128 x colsum(B); where that model equals torch's output bit for bit, the error is that int16 saturation.

    python benchmarks/repro_int_mm_vnni.py
"""

from __future__ import annotations

import os
import subprocess
import sys

M, K, N = 64, 256, 128


def measure() -> None:
    """One product in this process: print torch, oneDNN's ISA, wrong entries and the largest error."""
    import torch

    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):  # oneDNN names its ISA on stdout
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
    sys.stdout.flush()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    got = torch._int_mm(a, b).long()
    want = a.long() @ b.long()
    pairs = (a.long() + 128).reshape(M, K // 2, 2, 1) * b.long().reshape(1, K // 2, 2, N)
    saturated = pairs.sum(2).clamp(-32768, 32767).sum(1) - 128 * b.long().sum(0)
    wrong = int((got != want).sum())
    onednn = next((line.strip(" -") for line in torch.__config__.show().splitlines() if "MKL-DNN" in line), "none")
    print(f"torch {torch.__version__}; oneDNN: {onednn}; ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}")
    print(f"  torch._int_mm {M}x{K} @ {K}x{N}: {wrong} of {M * N} entries wrong ({100.0 * wrong / (M * N):.1f}%), "
          f"max |error| {int((got - want).abs().max())}; "
          f"equals the int16-saturating model: {torch.equal(got, saturated)}")


def main() -> int:
    """Run :func:`measure` in a fresh process per oneDNN setting (oneDNN reads the cap once, at first use)."""
    if "--child" in sys.argv:
        measure()
        return 0
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    for label, env in (("oneDNN uncapped", base), ("oneDNN capped to AVX2", {**base, "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True, stdout=subprocess.PIPE,
                             text=True).stdout.splitlines()
        isa = next((line.split("isa:", 1)[1] for line in out if "isa:" in line), "(not reported)")
        print(f"{label} (oneDNN ISA in use: {isa}):")
        print("\n".join(line for line in out if not line.startswith("onednn_verbose")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
