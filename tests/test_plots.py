"""The PNGs a user looks at: axes that span the data (not from 0), legends clear of the data, readable
labels, sample grids with gaps and row labels. Checked on the figures matplotlib lays out."""

from __future__ import annotations

import math

import torch

from comfyquant.convert.plot import sqnr_figure
from comfyquant.convert.report import LayerReport, Report
from comfyquant.eval.layerstats import LayerStat
from comfyquant.eval.plots import grid_figure, layers_figure, sample_grid


def _check_axes(fig, lo: float, hi: float, axis: str) -> None:
    fig.canvas.draw()
    ax = fig.axes[0]
    a, b = ax.get_xlim() if axis == "x" else ax.get_ylim()
    assert lo - 3 <= a <= lo and hi <= b <= hi + 3, (a, b)  # spans the data, not 0..max
    legend = ax.get_legend()
    assert legend.get_window_extent().y0 >= ax.get_window_extent().y1  # above the plot, covers nothing
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        if label.get_text():
            assert label.get_fontsize() >= 8, label.get_text()


def test_layers_png_spans_the_data_and_keeps_the_legend_off_the_markers():
    stats = [LayerStat(f"double_blocks.{i}.img_mlp.0", "int8_tensorwise", (512, 128), 46.0 - i, 40.0 - i / 2,
                       33.0 + i / 3) for i in range(12)]
    stats.append(LayerStat("pooler.dense", "int8_tensorwise", (64, 64), 45.0, math.nan, math.nan))  # never run
    fig = layers_figure(stats, "digits-dit int8")
    _check_axes(fig, 33.0, 46.0, "x")
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names[0] == "double_blocks.0.img_mlp.0" and names[-1] == "pooler.dense"  # file order, top down


def test_convert_plot_spans_the_data_for_few_and_many_layers():
    for n in (20, 400):
        layers = [LayerReport(f"blocks.{i}.attn.qkv.weight", (64, 64), "quantize", "int8", "r", "why",
                              sqnr_db=38.0 + 6 * math.sin(i)) for i in range(n)]
        layers.append(LayerReport("final.weight", (64, 64), "cast", "fp16", "r", "why", sqnr_db=math.inf))
        fig = sqnr_figure(Report("in.safetensors", "out.safetensors", "int8", "flux", layers))
        values = [x.sqnr_db for x in layers if math.isfinite(x.sqnr_db)]
        _check_axes(fig, min(values), max(values), "x" if n <= 60 else "y")
        assert "+1 exact, not drawn" in fig.axes[0].get_title(loc="left")


def test_sample_grid_has_gaps_and_labelled_rows():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(30, 1, 32, 32, generator=g) * 2 - 1
    quant = -ref
    img = sample_grid(ref, quant, 3, 10, show=4, gap=2, middle=14)
    assert img.shape == (3 * 34 - 2, 2 * 4 * 34 - 4 + 14)
    assert torch.equal(img[:32, :32], ref[0, 0]) and torch.equal(img[34:66, 34:66], ref[11, 0])
    right = 4 * 34 - 2 + 14
    assert torch.equal(img[:32, right:right + 32], quant[0, 0])
    assert bool((img[32:34] == 1).all()) and bool((img[:, 32:34] == 1).all())  # white rows and columns
    assert bool((img[:, 4 * 34 - 2: right] == 1).all())  # the wide gap between the two halves
    fig = grid_figure(ref, quant, 3, 10, show=4, labels=("bf16 reference", "int8"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16 reference", "int8"]
