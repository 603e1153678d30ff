"""``benchmarks/bench_lora.py --smoke`` runs on the CPU and writes its table (the H200 numbers come from the same
script; docs/PERFORMANCE.md)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
from convert_helpers import REPO

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.cpu_int8
def test_bench_lora_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_lora", REPO / "benchmarks" / "bench_lora.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = set(Path(tempfile.gettempdir()).glob("bench_lora_*"))
    assert bench.main(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--ranks", "16", "--counts", "1", "3",
                       "--iters", "1"]) == 0
    assert set(Path(tempfile.gettempdir()).glob("bench_lora_*")) == before  # its LoRA files' folder is removed
    data = json.loads((tmp_path / "lora_bench.json").read_text())
    rows = data["rows"]
    assert {(r["loras"], r["rank"]) for r in rows} == {(0, 16), (1, 16), (3, 16)}
    assert len({r["workload"] for r in rows}) == 6 and all(r["eager_ms"] > 0 and r["graph_ms"] is None for r in rows)
    # the self-attention workload twice: as is, and with its q / k / v fused into one GEMM (LoRAs included)
    fused = [r for r in rows if r["workload"].endswith("(q/k/v fused)")]
    assert len(fused) == 3 and all(r["fused_groups"] == [": q,k,v"] for r in fused)
    # every quantized linear call is counted on its backend (the CPU reference here; the GPU run shows which)
    assert all(set(r["backends"]) == {"torch"} for r in rows)
    assert {r["backends"]["torch"] for r in rows if r["workload"].startswith("flux double")} == {10}
    md = (tmp_path / "lora_bench.md").read_text()
    assert "| 3 x 16 |" in md and data["meta"]["device"] == "cpu"
