"""Per-layer SQNR plot of a conversion report (matplotlib on an Agg canvas, imported only when asked for).

Up to ``NAMED_MAX`` layers: one row per layer with its name. More (a Flux file has ~500): SQNR against the
layer's position in the file, the five worst circled and named. The dB axis always spans the data (from 0 it would squash
30-50 dB into a band at the top), and the legend sits above the plot, clear of the data.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from comfyquant.convert.report import Report
from comfyquant.errors import UserError
from comfyquant.io.writer import write_small_file

NAMED_MAX = 60
_BLUE, _RED = "#1f77b4", "#d62728"


def require_matplotlib() -> None:
    """Fail early (before converting) when ``--plot`` is given but matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install comfyquant[plot]") from None


def _limits(values: list[float], pad: float = 1.5) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    return math.floor(min(values) - pad), math.ceil(max(values) + pad)


def plot_sqnr(report: Report, path: str | Path) -> None:
    """Write :func:`sqnr_figure` as a PNG (through the temp-file-and-rename writer)."""
    fig = sqnr_figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)
    write_small_file(path, buf.getvalue())


def sqnr_figure(report: Report) -> Any:
    """A matplotlib Figure of every measured layer's weight SQNR and the mean (exact layers, SQNR inf, are
    counted in the title but not drawn)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = report.measured()
    layers = [x for x in measured if x.sqnr_db is not None and math.isfinite(x.sqnr_db)]
    values = [float(x.sqnr_db) for x in layers]  # type: ignore[arg-type]
    named = len(layers) <= NAMED_MAX
    height = 1.9 + 0.28 * len(layers) if named else 5.0
    fig = Figure(figsize=(9.0 if named else 12.0, max(3.0, height)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = _limits(values)
    mean = sum(values) / len(values) if values else float("nan")
    if named:
        ys = list(range(len(layers)))
        ax.hlines(ys, lo, values, color="#d0d0d0", linewidth=1.0, zorder=1)
        ax.scatter(values, ys, s=36, color=_BLUE, zorder=2, label="weight SQNR")
        ax.set_yticks(ys)
        ax.set_yticklabels([x.name.removesuffix(".weight") for x in layers], fontsize=9)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("weight SQNR (dB, higher is better)", fontsize=10)
        if values:
            ax.axvline(mean, color=_RED, linewidth=1.2, label=f"mean {mean:.1f} dB")
        ax.grid(axis="x", color="#e4e4e4", linewidth=0.8)
    else:
        xs = list(range(len(layers)))
        ax.scatter(xs, values, s=10, color=_BLUE, label="weight SQNR, one dot per layer (file order)")
        ax.axhline(mean, color=_RED, linewidth=1.2, label=f"mean {mean:.1f} dB")
        worst = sorted(xs, key=lambda i: values[i])[:5]
        ax.scatter(worst, [values[i] for i in worst], s=60, facecolors="none", edgecolors=_RED, linewidths=1.2,
                   label="the 5 worst (named below)")
        ax.set_ylim(lo, hi)
        ax.set_xlim(-1, len(layers))
        names = "; ".join(f"{layers[i].name.removesuffix('.weight')} {values[i]:.1f} dB" for i in worst)
        ax.set_xlabel("layer (position in the file)\n" + textwrap.fill(f"worst: {names}", 120), fontsize=10)
        ax.set_ylabel("weight SQNR (dB, higher is better)", fontsize=10)
        ax.grid(axis="y", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)
    if values:
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), borderaxespad=0.3, ncol=3, fontsize=9,
                  frameon=False)
    exact = len(measured) - len(layers)
    ax.set_title(f"{Path(report.output).name}: {report.format}, {len(layers)} layers"
                 + (f" (+{exact} exact, not drawn)" if exact else ""), fontsize=11, loc="left", pad=26)
    return fig
