"""The eval's pictures: per-layer SQNR as a dot plot (``layers.png``) and the side-by-side sample grid
(``samples.png``). matplotlib's object API on an Agg canvas (no pyplot state), imported only when drawing."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from comfyquant.eval.layerstats import LayerStat
from comfyquant.io.writer import write_small_file

SERIES = (("weight_sqnr_db", "weight SQNR", "o", "#1f77b4"),
          ("out_sqnr_db", "output SQNR, layer alone", "s", "#ff7f0e"),
          ("out_sqnr_e2e_db", "output SQNR, inside the quantized model", "D", "#2ca02c"))


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)
    write_small_file(path, buf.getvalue())


def data_range(values: Sequence[float], pad: float = 1.5) -> tuple[float, float]:
    """Axis limits around the finite values (not from 0: SQNRs of 33-46 dB would be squashed at the top)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return math.floor(lo - pad), math.ceil(hi + pad)


def plot_layers(stats: Sequence[LayerStat], path: Path, title: str) -> None:
    """Write :func:`layers_figure` as ``path`` (PNG)."""
    _save(layers_figure(stats, title), path)


def layers_figure(stats: Sequence[LayerStat], title: str) -> Any:
    """One row per layer (file order, names readable), three markers: weight SQNR and output SQNR alone and
    inside the model. The dB axis spans the data; the legend sits above the plot, clear of the markers.
    A layer the workload never runs has no output markers."""
    n = max(len(stats), 1)
    fig = _figure(9.0, 1.9 + 0.3 * n)
    ax = fig.add_subplot(1, 1, 1)
    values = [getattr(s, key) for s in stats for key, *_ in SERIES]
    lo, hi = data_range(values)
    ys = range(len(stats))
    for y, s in zip(ys, stats, strict=True):
        row = [v for key, *_ in SERIES if math.isfinite(v := getattr(s, key))]
        if row:
            ax.plot([min(row), max(row)], [y, y], color="#c8c8c8", linewidth=1.2, zorder=1)
    for key, label, marker, color in SERIES:
        pts = [(getattr(s, key), y) for y, s in zip(ys, stats, strict=True) if math.isfinite(getattr(s, key))]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=36, color=color, label=label,
                   zorder=2, edgecolors="white", linewidths=0.5)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([s.name for s in stats], fontsize=9)
    ax.set_ylim(len(stats) - 0.5, -0.5)  # first layer on top
    ax.set_xlim(lo, hi)
    ax.set_xlabel("SQNR (dB, higher is better)", fontsize=10)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), borderaxespad=0.3, ncol=3, fontsize=8.5, frameon=False,
              handletextpad=0.3, columnspacing=1.2)
    ax.set_title(title, fontsize=11, loc="left", pad=26)
    return fig


def sample_grid(ref: torch.Tensor, quant: torch.Tensor, n_cls: int, per_class: int, show: int = 5,
                gap: int = 2, middle: int = 14) -> torch.Tensor:
    """``[rows, cols]`` image in [-1, 1]: per class ``show`` reference tiles, a wide white gap, the same seeds
    quantized; tiles separated by ``gap`` white pixels (white = 1.0)."""
    k = min(show, per_class)
    size = ref.shape[-1]
    pitch = size + gap
    width = 2 * k * pitch - 2 * gap + middle
    img = torch.ones(n_cls * pitch - gap, width)
    for c in range(n_cls):
        for j in range(k):
            i = c * per_class + j
            y = c * pitch
            img[y:y + size, j * pitch: j * pitch + size] = ref[i, 0]
            x = k * pitch - gap + middle + j * pitch
            img[y:y + size, x:x + size] = quant[i, 0]
    return img


def save_grid(ref: torch.Tensor, quant: torch.Tensor, n_cls: int, per_class: int, path: Path, show: int = 5,
              labels: tuple[str, str] = ("float reference", "quantized")) -> None:
    """Write :func:`grid_figure` as ``path`` (``samples.png``)."""
    _save(grid_figure(ref, quant, n_cls, per_class, show, labels), path)


def grid_figure(ref: torch.Tensor, quant: torch.Tensor, n_cls: int, per_class: int, show: int = 5,
                labels: tuple[str, str] = ("float reference", "quantized")) -> Any:
    """One row per class (labelled with the digit), reference on the left, the same seeds through the
    quantized model on the right, a header over each half, white gaps between the tiles."""
    img = sample_grid(ref, quant, n_cls, per_class, show)
    size = ref.shape[-1]
    k = min(show, per_class)
    rows, cols = img.shape
    fig = _figure(cols / 40 + 0.6, rows / 40 + 0.7)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    pitch = size + 2
    ax.set_yticks([c * pitch + size / 2 for c in range(n_cls)])
    ax.set_yticklabels([str(c) for c in range(n_cls)], fontsize=10)
    ax.set_ylabel("digit class", fontsize=10)
    half = (k * pitch - 2) / 2
    ax.set_xticks([half, cols - half])
    ax.set_xticklabels(list(labels), fontsize=10)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("same seeds and labels, left and right", fontsize=9, pad=22, color="#555555")
    return fig
