"""The Z-Image / Qwen-Image / LTX-Video GPU benchmark runs end to end on the CPU on tiny models (every variant, json + md + png
written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # children run our CPU int8 layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_comfyui_dit.py"
# converted layers and folded blocks of the two-block smoke models: Z-Image's 2 main + 2 noise-refiner + 2
# context-refiner blocks, 5 linears each (qkv, out, w1, w2, w3; the preset keeps embedders, adaLN and the final
# layer), the modulated ones (not the context refiner) folded; Qwen-Image's 2 blocks, 12 linears each (both
# streams' q / k / v, out and MLP pairs; the preset keeps img_mod / txt_mod), both folded; LTX-Video's 2 blocks,
# 10 linears each (both attentions' q / k / v / out, the feed-forward's two), both folded
EXPECTED = {"zimage": (30, 4), "qwen_image": (24, 2), "ltxv": (20, 2)}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_tiny_models_measure_every_variant(comfyui_root: Path, tmp_path: Path, family: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--family", family, "--smoke", "--out", str(tmp_path),
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / f"bench_comfyui_{family}.json").read_text())
    env, rows = report["env"], {r["variant"]: r for r in report["results"]}
    rope = ["adapter int8 (stock RoPE)"] if family == "qwen_image" else []  # Qwen's fused q / k norm + RoPE off
    assert list(rows) == ["bf16", "bf16 + attention auto", "adapter int8", "adapter int8 (norms in torch)",
                          "adapter fp8", "adapter int8 + attention sdpa", "adapter int8 + attention comfyui", *rope,
                          "ComfyUI int8 (same file)"]
    assert env["family"] == family and env["blocks"] == 2 and env["batch"] == 1 and env["resolution"] == 64
    layers, folded = EXPECTED[family]
    notes = {v: r["note"] for v, r in rows.items()}
    assert notes["adapter int8"] == f"{layers} layers converted, {folded} blocks' modulated norms folded", notes
    assert notes["adapter int8 (norms in torch)"] == f"{layers} layers converted, 0 blocks' modulated norms folded"
    err = {v: r["rel_err_vs_bf16"] for v, r in rows.items() if v != "ComfyUI int8 (same file)"}
    assert err["bf16"] == 0.0 and all(0 < e < 0.1 for v, e in err.items() if not v.startswith("bf16")), err
    # the fold moves the norm, not the numbers (on the CPU the quantizer applies it in torch either way)
    assert abs(err["adapter int8"] - err["adapter int8 (norms in torch)"]) < 1e-3 * err["adapter int8"], err
    assert err["bf16 + attention auto"] == 0.0 and err["adapter int8 + attention comfyui"] == err["adapter int8"]
    assert err["adapter int8 + attention sdpa"] == err["adapter int8"]
    if rope:  # on the CPU both run the stock ops after the projections: the same numbers
        assert err["adapter int8 (stock RoPE)"] == err["adapter int8"]
    assert rows["ComfyUI int8 (same file)"]["note"] == "not run: CPU smoke run"
    assert (tmp_path / f"bench_comfyui_{family}.png").read_bytes()[:4] == b"\x89PNG"
    assert "SMOKE RUN" in (tmp_path / f"bench_comfyui_{family}.md").read_text()


def test_profile_of_the_tiny_qwen_model(comfyui_root: Path, tmp_path: Path) -> None:
    """``profile_comfyui_sdxl.py --smoke --family qwen_image`` (the device step ``profile_qwen``): bf16, the int8
    defaults (fused attention) and the stock ops each profiled, their op tables and host times written."""
    script = SCRIPT.parent / "profile_comfyui_sdxl.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--family", "qwen_image", "--out", str(tmp_path),
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "profile_comfyui_qwen_image.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "adapter int8", "adapter int8 (stock RoPE)"] and report["family"] == "qwen_image"
    assert all(0 < r["host_ms"] <= r["wall_ms"] * 1.5 and r["top_by_count"] for r in rows.values())
    assert "== adapter int8 (stock RoPE):" in (tmp_path / "profile_comfyui_qwen_image.txt").read_text()
