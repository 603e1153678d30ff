"""The benchmark plot: speed-ups computed from timings, and a real PNG written."""

from __future__ import annotations

import json

import pytest

from comfyquant.bench.plot import main, speedups
from comfyquant.errors import UserError


def _rows():
    rows = []
    for m, (bf16, ours) in {1: (20.0, 40.0), 4096: (300.0, 200.0)}.items():
        rows.append({"model": "flux", "layer": "qkv", "k": 3072, "n": 9216, "m": m,
                     "us": {"bf16": bf16, "w8a8": ours, "fp8_rowwise": None}})
    return rows


def test_speedups_are_bf16_over_path_time():
    got = speedups(_rows())
    assert got == {"flux qkv 3072→9216": {"w8a8": [(1, 0.5), (4096, 1.5)]}}  # absent paths left out


def test_plot_writes_a_png(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"meta": {"device": "test", "date_utc": "2026-11-22"}, "rows": _rows()}))
    out = tmp_path / "bench.png"
    assert main([str(src), str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_refuses_rows_without_timings(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"rows": [{"model": "x", "layer": "y", "k": 1, "n": 1, "m": 1, "us": {}}]}))
    with pytest.raises(UserError, match="no benchmark rows"):
        main([str(src), str(tmp_path / "o.png")])
