"""Plot a ``comfyquant bench`` sweep: speed-up over bf16 against the batch rows M, one panel per layer shape.

Reads the ``rows`` of ``bench.json`` (each with ``us`` timings per path, ``bf16`` among them) and writes a PNG.
Used by ``comfyquant bench`` and runnable on a saved result: ``python -m comfyquant.bench.plot IN OUT``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comfyquant.errors import UserError

# (column, label); "w8a8" / "fp8_rowwise": the 2026-11-22 JSON's names, "auto" / "fp8": this session's
PATHS = (("w8a8", "W8A8 (ours, auto)"), ("fp8_rowwise", "FP8 rowwise (ours)"), ("auto", "int8 (ours, auto)"),
         ("fp8", "FP8 (ours, auto)"), ("w4a8", "int4_rot W4A8 (ours)"),
         ("w8a8_convrot", "W8A8 convrot (ours)"), ("ck_int8", "comfy-kitchen int8_linear"),
         ("int_mm_torch", "torch._int_mm + torch quant"))


def speedups(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{shape label: {path: [(M, bf16_us / path_us), ...]}}`` for the paths present in the rows."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        label = f"{r['model']} {r['layer']} {r['k']}→{r['n']}"
        us = r["us"]
        for key, _ in PATHS:
            if us.get(key) and us.get("bf16"):
                out.setdefault(label, {}).setdefault(key, []).append((int(r["m"]), us["bf16"] / us[key]))
    return out


def plot_bench(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw the speed-up panels to ``path`` (PNG); needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install comfyquant[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = speedups(rows)
    if not data:
        raise UserError("no benchmark rows with bf16 timings to plot")
    cols = 4
    nrows = -(-len(data) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (label, series) in zip(axes.flat, data.items(), strict=False):
        for key, name in PATHS:
            if key in series:
                ms, sp = zip(*sorted(series[key]), strict=True)
                ax.plot(ms, sp, marker="o", ms=3, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("M (rows)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(data):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("× bf16 F.linear")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title or "speed-up over bf16, same run (eager, do_bench median)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m comfyquant.bench.plot bench.json out.png``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise UserError("usage: python -m comfyquant.bench.plot BENCH.json OUT.png")
    payload = json.loads(Path(args[0]).read_text())
    meta = payload.get("meta", {})
    title = f"speed-up over bf16 F.linear, same run: {meta.get('device', '')} {meta.get('date_utc', '')} UTC".strip()
    print(plot_bench(payload["rows"], args[1], title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
