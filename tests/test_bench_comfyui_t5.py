"""The T5 text-encoder benchmark's --smoke mode runs end to end on the CPU in ComfyUI's own T5 class: every
variant measured, the quantized ones close to bf16's conditioning, json + md written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # children run our CPU int8 layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_comfyui_t5.py"


def test_smoke_mode_measures_every_variant(comfyui_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path),
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_t5.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "comfyquant_int8", "comfyquant_int8_unfused", "comfyquant_int8_nonorm",
                          "comfyquant_int8_rot", "comfyquant_int8_rot_nonorm", "comfyquant_fp8", "stock_ck_int8"]
    assert all(r["encode_ms"] > 0 and r["speedup_vs_bf16"] > 0 for r in rows.values()), rows
    assert rows["bf16"]["max_rel_err"] == 0.0
    # per-token relative error of the conditioning against bf16: int8 within a few percent, fp8 within ~10%
    assert 0 < rows["comfyquant_int8"]["max_rel_err"] < 0.08
    # sibling fusion (q / k / v, wi_0 / wi_1 as one GEMM) changes no number on the CPU reference
    assert rows["comfyquant_int8_unfused"]["max_rel_err"] == rows["comfyquant_int8"]["max_rel_err"]
    # nor the RMSNorms' fold (the CPU reference applies the norm in float32 first, as T5LayerNorm computes it)
    assert 0 < rows["comfyquant_int8_nonorm"]["max_rel_err"] < 0.08
    # rotated int8 (its norms folded into the rotating quantizer on a GPU; on the CPU reference first in torch)
    assert 0 < rows["comfyquant_int8_rot"]["max_rel_err"] < 0.08
    assert 0 < rows["comfyquant_int8_rot_nonorm"]["max_rel_err"] < 0.08
    assert 0 < rows["stock_ck_int8"]["max_rel_err"] < 0.08
    assert 0 < rows["comfyquant_fp8"]["max_rel_err"] < 0.2
    assert "layers converted" in rows["comfyquant_int8"]["note"]
    assert "| comfyquant_int8 |" in (tmp_path / "bench_comfyui_t5.md").read_text()
