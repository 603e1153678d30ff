"""Plot end-to-end quality per rounding method and format for both reference models (docs/QUALITY.md).

``python -m comfyquant.eval.method_plot OUT.png REPORT.json ...`` (reports of ``comfyquant eval``); a
baseline row may be given as ``model,format,method,value`` instead of a report (numbers already in QUALITY.md).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def point(arg: str) -> tuple[str, str, str, float]:
    """(model, format, method, metric): DiT sample PSNR mean (dB), MiniLM min embedding cosine."""
    if not arg.endswith(".json"):
        m, f, meth, v = arg.split(",")
        return m, f, meth, float(v)
    r = json.loads(Path(arg).read_text())
    met = r["metrics"]
    value = met["psnr_db"]["mean"] if r["model"] == "digits-dit" else met["cosine"]["min"]
    method = r.get("optimizer") or r["quantizer"]
    return r["model"], r["format"], method, float(value)


def plot(out: Path, points: list[tuple[str, str, str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, model, label in ((axes[0], "digits-dit", "digits DiT: sample PSNR mean vs bf16 (dB)"),
                             (axes[1], "minilm", "MiniLM: min embedding cosine vs fp32")):
        by: dict[str, dict[str, float]] = defaultdict(dict)
        for m, f, meth, v in points:
            if m == model:
                by[meth][f] = v
        formats = sorted({f for d in by.values() for f in d})
        width = 0.8 / max(1, len(by))
        for i, (meth, d) in enumerate(sorted(by.items())):
            xs = [j + i * width for j, f in enumerate(formats) if f in d]
            ax.bar(xs, [d[f] for f in formats if f in d], width, label=meth)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(formats))], formats)
        vals = [v for d in by.values() for v in d.values()]
        if vals:
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), [point(a) for a in sys.argv[2:]])
