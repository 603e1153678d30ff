"""The memory/speed benchmark runs end to end on a small cut of full-size Flux (the peer is skipped here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_small_run_records_memory_and_time(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "res.json", tmp_path / "res.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_convert_memory.py"), "--size-gb", "0.25",
           "--workdir", str(tmp_path / "work"), "--json", str(out_json), "--markdown", str(out_md), "--skip-peer", "--processes", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out_json.read_text())
    inp = data["input"]
    assert inp["bytes"] >= 0.25 * 2**30 and inp["largest_tensor_bytes"] == 18432 * 3072 * 2  # img_mod.lin
    ours, two = data["runs"]
    assert ours["returncode"] == 0 and not ours["timed_out"]
    assert two["returncode"] == 0 and two["identical_to_1_process"] is True  # torchrun, 2 ranks: same bytes
    assert set(two["per_process_peak_rss_bytes"]) == {"launcher", "rank 0", "rank 1"}
    assert two["quantized_layers"] == ours["quantized_layers"]
    assert ours["quantized_layers"] >= 1 and 0 < ours["output_bytes"] < inp["bytes"]
    assert 0 < ours["ru_maxrss_bytes"] < data["checks"]["rss_limit_gib"] * 2**30
    assert data["checks"]["rss_ok"] is True and data["copy"]["copy_fsync_s"] > 0
    assert "comfyquant convert --format int8" in out_md.read_text() and "rank 1 " in out_md.read_text()
    assert not list((tmp_path / "work").glob("ours-int8*"))  # outputs removed unless --keep
