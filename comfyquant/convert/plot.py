"""Per-layer SQNR plot of a conversion report (matplotlib, Agg canvas, imported only when asked for)."""

from __future__ import annotations

import math
from pathlib import Path

from comfyquant.convert.report import Report
from comfyquant.errors import UserError


def require_matplotlib() -> None:
    """Fail early (before converting) when ``--plot`` is given but matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install comfyquant[plot]") from None


def plot_sqnr(report: Report, path: str | Path) -> None:
    """Write a PNG with one bar per measured layer (file order) and the mean SQNR as a line."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = report.measured()
    values = [x.sqnr_db if x.sqnr_db is not None and math.isfinite(x.sqnr_db) else 0.0 for x in layers]
    fig = Figure(figsize=(max(6.0, min(24.0, 0.12 * len(values) + 4)), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(values)), values, width=0.9, color="#3b7dd8")
    if values:
        mean = sum(values) / len(values)
        ax.axhline(mean, color="#d8593b", linewidth=1, label=f"mean {mean:.1f} dB")
        ax.legend(loc="lower right")
    if 0 < len(values) <= 40:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([x.name for x in layers], rotation=90, fontsize=6)
        fig.subplots_adjust(bottom=0.45)
    ax.set_xlabel("layer (file order)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title(f"{Path(report.output).name}: {report.format}, {len(values)} layers")
    try:
        fig.savefig(str(path), format="png")
    except OSError as e:
        raise UserError(f"cannot write plot {path}: {e.strerror or e}") from None
