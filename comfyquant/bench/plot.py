"""Plot a ``comfyquant bench`` sweep: speed-up over bf16 against the batch rows M, one panel per layer shape.

Reads the ``rows`` of ``bench.json`` (each with ``us`` timings per path, ``bf16`` among them) and writes a PNG.
Used by ``comfyquant bench`` and runnable on a saved result: ``python -m comfyquant.bench.plot IN OUT``.
``plot_bars`` draws the grouped speed-up bars of the GEMM and whole-model benchmarks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comfyquant.bench.saved import read_saved_json
from comfyquant.errors import UserError

# (column, label); "w8a8" / "fp8_rowwise": the 2026-11-22 JSON's names, "auto" / "fp8": this session's
PATHS = (("w8a8", "W8A8 (ours, auto)"), ("fp8_rowwise", "FP8 rowwise (ours)"), ("auto", "int8 (ours, auto)"),
         ("auto_copy", "int8 auto + dense copies"),
         ("fp8", "FP8 (ours, auto)"), ("fp8_cublas", "FP8 cuBLAS _scaled_mm"), ("w4a8", "int4_rot W4A8 (ours)"),
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


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a UserError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install comfyquant[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw the speed-up panels to ``path`` (PNG); needs matplotlib."""
    plt = _pyplot()

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
    return _save(fig, path)


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, title: str,
              xlabel: str = "× bf16 in the same run", target: float | None = None) -> Path:
    """Grouped horizontal bars: one group per ``groups`` key (a layer shape, a resolution), one bar per series
    (a kernel, a variant) with its value printed, a line at 1.0 (bf16) and a dashed one at ``target``; writes a
    PNG (needs matplotlib)."""
    plt = _pyplot()

    if not groups:
        raise UserError("nothing to plot")
    series = list(dict.fromkeys(name for g in groups.values() for name in g))
    colors = plt.get_cmap("tab10").colors
    height = 0.8 / len(series)
    legend_in = 0.45 + 0.2 * -(-(len(series) + (target is not None)) // 2)  # two columns below the axes
    height_in = 1.2 + legend_in + 0.26 * len(series) * len(groups)
    fig, ax = plt.subplots(figsize=(9.0, height_in))
    labelled: set[str] = set()
    for gi, values in enumerate(groups.values()):
        for si, name in enumerate(series):
            v = values.get(name)
            if v is None:
                continue
            y = gi + (si - (len(series) - 1) / 2) * height
            ax.barh(y, v, height=height * 0.92, color=colors[si % len(colors)],
                    label=None if name in labelled else name)
            labelled.add(name)
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8)
    if target is not None:
        ax.axvline(target, color="gray", lw=0.8, ls="--", label=f"target {target:g}x")
    ax.set_yticks(range(len(groups)), list(groups), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, max(max(g.values(), default=1.0) for g in groups.values()) * 1.12)  # room for the values
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, legend_in / height_in, 1, 1))  # the legend below the axes, never over a bar
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` through ``io.writer.write_small_file`` (a temporary file renamed when complete;
    a full disk or read-only folder is one ``UserError`` line and leaves nothing), then closed."""
    import io

    from comfyquant.io.writer import write_small_file

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        _pyplot().close(fig)
    out = Path(path)
    write_small_file(out, buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m comfyquant.bench.plot bench.json out.png [title]`` (the title defaults to the json's device and
    date; ``gpu_session``'s sweep json records neither, so its plots are titled on the command line). The json
    may be gzip-compressed (``bench.json.gz``, as ``benchmarks/results`` stores its larger ones), or named as
    ``.json`` where only its ``.json.gz`` is there."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise UserError("usage: python -m comfyquant.bench.plot BENCH.json OUT.png [TITLE]")
    try:
        payload = read_saved_json(args[0])  # a .json, or its gzip-compressed .json.gz
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{args[0]}: not a readable benchmark json ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise UserError(f"{args[0]}: no 'rows' list (a comfyquant bench json has one)")
    meta = payload.get("meta", {})
    title = f"speed-up over bf16 F.linear, same run: {meta.get('device', '')} {meta.get('date_utc', '')} UTC".strip()
    print(plot_bench(payload["rows"], args[1], args[2] if len(args) == 3 else title))
    return 0


if __name__ == "__main__":
    from comfyquant.exits import run_cli

    raise SystemExit(run_cli("python -m comfyquant.bench.plot", main, None))
