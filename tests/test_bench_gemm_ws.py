"""``benchmarks/bench_gemm_ws.py`` without a GPU: which rows time the 128x64 Gluon tiles, and a report whose rows
time different variants."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gemm_ws

    return bench_gemm_ws


@pytest.mark.parametrize(("m", "n", "want"), [
    (256, 3072, True), (512, 21504, True),  # below 1,024 rows: ws_config's own domain
    (1024, 3072, True), (4096, 768, True), (4096, 640, True),  # 192 / 192 / 160 tiles of 128x128: 1.2-1.5 waves
    (4096, 1280, False), (4608, 3072, False), (16384, 768, False)])  # two waves or more
def test_128x64_tiles_are_timed_where_128x128_ones_leave_a_partial_wave(bench, m: int, n: int, want: bool) -> None:
    """From 1,024 rows too, where 128x128 tiles fill under two waves of an H100 / H200's 132 SMs (CLIP fc2 at
    4,096 rows: 192 tiles, 1.45 waves; run 31 timed 128x64 only below 1,024 rows, where it won such grids)."""
    assert bench.n64_candidate(m, n, 132) is want


def test_report_has_a_column_for_every_variant_any_row_timed(bench) -> None:
    """A row that times the 128x64 tiles after one that does not: the table still has their columns, and the row
    without them shows a dash."""
    import recorded_results

    rows = recorded_results.recorded("gemm_ws_small_m_run31_h200_2026-12-03.json")["rows"]
    without = next(r for r in rows if "ws 128x64 s8" not in r["us"])
    with_n64 = next(r for r in rows if "ws 128x64 s8" in r["us"])
    md = bench.to_markdown([without, with_n64])
    head, _, first, second = md.strip().splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    i = cols.index("ws 128x64 s8 ×")
    assert [c.strip() for c in first.strip("|").split("|")][i] == "-"
    assert float([c.strip() for c in second.strip("|").split("|")][i]) > 0
    assert not any(c == "" for c in cols)


def test_unknown_shape_names_are_refused_with_one_line_before_any_device_work(bench, capsys, tmp_path) -> None:
    """``--only`` names outside the table the run uses (Flux / Wan, or with ``--narrow`` SDXL / CLIP / T5): exit
    2 with one line naming them, before any GPU is asked for (they used to select nothing: a step that timed no
    shape)."""
    assert bench.main(["--out", str(tmp_path), "--only", "flux.proj,clip_l.mlp2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip_l.mlp2" in err[0] and "flux.proj," not in err[0].split(";")[0]
    assert bench.main(["--out", str(tmp_path), "--narrow", "--only", "clip_l.mlp9"]) == 2
    assert "clip_l.mlp9" in capsys.readouterr().err
