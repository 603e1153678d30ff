"""Shared memory of every kernel launch the runtime makes, compiled on the CPU for the GPUs ComfyUI users run.

For each target of ``comfyquant.testing.kernel_targets.TARGETS`` (A100, B200, RTX 3090 / 4090 / 4060 / 5090): the
launches the int8 / fp8 / int4-rot host functions and the int8 attention make for Flux / SDXL / Wan / T5 / CLIP
layers at 1-4,096 rows, each compiled by Triton for that compute capability; the largest shared memory per kernel
against the card's limit. No GPU needed (Triton and its ptxas). Writes ``--out``/kernel_targets.json, .md, .png.

    python benchmarks/kernel_targets_report.py --out /tmp/targets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere


def measure() -> dict[str, Any]:
    """{target: {"limit": bytes, "kernels": {kernel: largest shared bytes}, "launches": n, "distinct": n}}."""
    from comfyquant.testing import kernel_targets as kt

    out: dict[str, Any] = {}
    for name, target in kt.TARGETS.items():
        t0 = time.perf_counter()
        with kt.recorded_launches(target) as launches:
            kt.drive(target)
        kernels: dict[str, int] = {}
        distinct = kt.distinct(launches)
        for la in distinct:
            b = kt.shared_bytes(la, target.cc)
            kernels[la.fn.__name__] = max(kernels.get(la.fn.__name__, 0), b)
        out[name] = {"limit": target.smem, "kernels": dict(sorted(kernels.items())), "launches": len(launches),
                     "distinct": len(distinct)}
        print(f"{name}: {len(distinct)} kernels compiled in {time.perf_counter() - t0:.0f} s; largest "
              f"{max(kernels.values()) / 1024:.0f} KB of {target.smem / 1024:.0f} KB", file=sys.stderr)
    return out


def to_markdown(report: dict[str, Any]) -> str:
    """A table: KB per kernel (largest launch) per target, and the limit."""
    targets = report["targets"]
    names = sorted({k for t in targets.values() for k in t["kernels"]})
    lines = [f"# Shared memory per kernel, compiled for each GPU ({report['date']})", "",
             f"Triton {report['triton']}; command `{report['command']}`. KB a block of the largest launch of each "
             "kernel (Flux / SDXL / Wan / T5 / CLIP layers at 1-4,096 rows; attention at head 64 / 128).", "",
             "| kernel | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for k in names:
        cells = [f"{t['kernels'][k] / 1024:.0f}" if k in t["kernels"] else "-" for t in targets.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **limit** | " + " | ".join(f"**{t['limit'] / 1024:.0f}**" for t in targets.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], png: Path) -> Path:
    """Grouped bars: each kernel's largest shared memory per target, the target's limit as a line over its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report["targets"]
    names = sorted({k for t in targets.values() for k in t["kernels"]})
    fig, ax = plt.subplots(figsize=(13, 5.5))
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab20").colors
    for j, k in enumerate(names):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(targets))]
        ax.bar(xs, [t["kernels"].get(k, 0) / 1024 for t in targets.values()], width, color=colors[j % 20],
               label=k.lstrip("_"))  # (matplotlib leaves labels starting with "_" out of the legend)
    for i, t in enumerate(targets.values()):
        ax.hlines(t["limit"] / 1024, i - 0.45, i + 0.45, colors="black", linewidth=2)
    ax.set_xticks(range(len(targets)), list(targets), fontsize=9)
    ax.set_ylabel("KB of shared memory a block (largest launch)")
    ax.set_title("Every kernel launch fits each GPU's shared memory (black line: the card's limit)")
    ax.set_ylim(0, max(t["limit"] for t in targets.values()) / 1024 * 1.35)
    ax.legend(ncol=6, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    import triton

    a.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__,
              "command": "python benchmarks/kernel_targets_report.py --out " + str(a.out), "targets": measure()}
    (a.out / "kernel_targets.json").write_text(json.dumps(report, indent=1))
    (a.out / "kernel_targets.md").write_text(to_markdown(report))
    print(plot(report, a.out / "kernel_targets.png"))
    over = [(n, k) for n, t in report["targets"].items() for k, b in t["kernels"].items() if b > t["limit"]]
    if over:
        print(f"over the limit: {over}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
