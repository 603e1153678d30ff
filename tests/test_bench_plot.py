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


def test_the_fp8_baseline_column_is_plotted_and_a_title_can_be_given(tmp_path):
    """The sweep's pinned cuBLAS fp8 column (``fp8_cublas``, beside fp8 auto since run 51) is one of the plotted
    paths; ``gpu_session``'s sweep json has no meta, so its plot takes the title from the command line."""
    rows = [{"model": "flux", "layer": "qkv", "k": 3072, "n": 9216, "m": m,
             "us": {"bf16": 100.0, "fp8": 60.0, "fp8_cublas": 64.0}} for m in (4096, 16384)]
    assert speedups(rows)["flux qkv 3072→9216"]["fp8_cublas"] == [(4096, 100 / 64), (16384, 100 / 64)]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"rows": rows}))
    assert main([str(src), str(tmp_path / "o.png"), "run 53"]) == 0
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="usage"):
        main([str(src)])


def test_bad_input_and_unwritable_output_are_one_user_error_and_leave_nothing(tmp_path):
    """An unreadable or row-less json, or an output folder that is not there, is a ``UserError`` (one line, exit
    2 through ``exits.run_cli`` as ``python -m comfyquant.bench.plot`` runs it) and leaves no file; the PNG is
    written through a temporary file renamed when complete."""
    from comfyquant.exits import run_cli

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rowless = tmp_path / "rowless.json"
    rowless.write_text(json.dumps({"meta": {}}))
    good = tmp_path / "bench.json"
    good.write_text(json.dumps({"rows": _rows()}))
    for src, out, match in ((tmp_path / "missing.json", tmp_path / "a.png", "not a readable benchmark json"),
                            (bad, tmp_path / "b.png", "not a readable benchmark json"),
                            (rowless, tmp_path / "c.png", "no 'rows' list"),
                            (good, tmp_path / "no_such_dir" / "d.png", "d.png")):
        with pytest.raises(UserError, match=match):
            main([str(src), str(out)])
        assert run_cli("plot", main, [str(src), str(out)]) == 2
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "bench.json", "rowless.json"]


def test_a_saved_json_is_read_gzip_compressed_or_by_its_json_name(tmp_path):
    """``benchmarks/results`` keeps its larger JSON as ``.json.gz`` (``gzip -9 -n``): the plot reads that file,
    and a ``.json`` name whose ``.gz`` alone is there; a plain ``.json`` beside it is read first."""
    import gzip

    from comfyquant.bench.saved import read_saved_json, saved_path

    payload = {"meta": {"device": "test"}, "rows": _rows()}
    gz = tmp_path / "bench.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(payload).encode("utf-8"), mtime=0))
    named = tmp_path / "bench.json"
    assert saved_path(named) == gz and read_saved_json(gz) == read_saved_json(named) == payload
    assert main([str(gz), str(tmp_path / "a.png")]) == 0 and main([str(named), str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    named.write_text(json.dumps({"rows": []}))
    assert saved_path(named) == named and read_saved_json(named) == {"rows": []}
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(UserError, match="not a readable benchmark json"):
        main([str(broken), str(tmp_path / "c.png")])
