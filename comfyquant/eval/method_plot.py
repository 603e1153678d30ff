"""Plot end-to-end quality per rounding method and format for both reference models (docs/QUALITY.md).

``python -m comfyquant.eval.method_plot OUT.png REPORT.json ...`` (reports of ``comfyquant eval``); a
baseline row may be given as ``model,format,method,value`` instead of a report (numbers already in QUALITY.md).
One dot per (format, method), the same colour per method in both panels, the value written next to it. MiniLM's
min cosine is drawn on a "nines" axis (-log10(1 - cos)), so 0.994 and 0.9994 are as far apart as they matter.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("rtn", "gptq", "learned", "quip", "gptq+smoothquant+bias", "peer learned (default)")
FORMAT_ORDER = ("int8", "int8-rot", "fp8", "mxfp8", "nvfp4", "int4-rot", "int8-tensor")
MODELS = (("digits-dit", "digits DiT: sample PSNR mean vs bf16 (dB), higher is better"),
          ("minilm", "MiniLM: min sentence cosine vs fp32 (W8A8 where int), higher is better"))


def method_label(report: dict) -> str:
    """Short method name of a report: ``learned-adamw`` -> ``learned``; the peer's default -> its own label."""
    meth = report.get("optimizer") or report["quantizer"]
    return "learned" if meth.startswith("learned") else meth


def point(arg: str) -> tuple[str, str, str, float]:
    """(model, format, method, metric): DiT sample PSNR mean (dB), MiniLM min embedding cosine."""
    if not arg.endswith(".json"):
        m, f, meth, v = arg.split(",")
        return m, f, meth, float(v)
    r = json.loads(Path(arg).read_text())
    met = r["metrics"]
    value = met["psnr_db"]["mean"] if r["model"] == "digits-dit" else met["cosine"]["min"]
    return r["model"], r["format"], method_label(r), float(value)


def nines(cos: float) -> float:
    """-log10(1 - cos): 0.99 -> 2, 0.999 -> 3 (capped at 7 for an exact match)."""
    return min(7.0, -math.log10(max(1e-7, 1.0 - cos)))


def _rank(seq: tuple[str, ...], x: str) -> tuple[int, str]:
    return (seq.index(x) if x in seq else len(seq), x)


def plot(out: Path, points: list[tuple[str, str, str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({p[2] for p in points}, key=lambda m: _rank(METHOD_ORDER, m))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (model, title) in zip(axes, MODELS, strict=True):
        by: dict[str, dict[str, float]] = defaultdict(dict)
        for m, f, meth, v in points:
            if m == model:
                by[f][meth] = v
        formats = sorted(by, key=lambda f: _rank(FORMAT_ORDER, f))
        for j, f in enumerate(formats):
            present = [m for m in methods if m in by[f]]
            for i, meth in enumerate(present):
                x = j + (i - (len(present) - 1) / 2) * 0.16
                raw = by[f][meth]
                y = raw if model == "digits-dit" else nines(raw)
                ax.plot(x, y, "o", ms=8, color=colors[meth])
                ax.annotate(f"{raw:.2f}" if model == "digits-dit" else f"{raw:.4f}", (x, y), fontsize=6.5,
                            xytext=(0, 6), textcoords="offset points", ha="center", rotation=90, va="bottom")
        ax.set_xticks(range(len(formats)), formats)
        ax.set_xlim(-0.6, len(formats) - 0.4)
        if model == "minilm":
            cos_ticks = (0.9, 0.95, 0.99, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9998)
            ax.set_yticks([nines(c) for c in cos_ticks], [str(c) for c in cos_ticks])
            ax.axhline(3, color="grey", ls="--", lw=0.8)
            ax.text(len(formats) - 0.45, 3, "target 0.999 (int8)", fontsize=7, ha="right", va="bottom")
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], marker="o", ls="", ms=8, color=colors[m]) for m in methods]
    fig.legend(handles, methods, loc="upper center", ncol=len(methods), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), [point(a) for a in sys.argv[2:]])
