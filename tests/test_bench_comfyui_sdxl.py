"""The SDXL GPU benchmark runs end to end on the CPU on a tiny UNet (every variant, json + md + png written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # children run our CPU int8 layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_comfyui_sdxl.py"


def test_tiny_unet_measures_every_variant(comfyui_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--comfyui-cache",
                           str(comfyui_root)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_sdxl.json").read_text())
    env, rows = report["env"], {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "bf16 + attention auto", "adapter int8", "adapter int8 (norms in torch)",
                          "adapter fp8", "adapter int8 + attention sdpa", "adapter int8 + attention comfyui",
                          "adapter int8 + dense_copy_mb", "ComfyUI int8 (same file)"]
    blocks = env["transformer_blocks"]
    assert blocks == 11 and env["batch"] == 2 and env["resolution"] == 64
    # every transformer block's three LayerNorms folded, or none (the same layers converted either way)
    assert rows["adapter int8"]["note"].endswith(f"{3 * blocks} norms folded"), rows["adapter int8"]
    assert rows["adapter int8 (norms in torch)"]["note"].endswith(" 0 norms folded")
    err = {v: r["rel_err_vs_bf16"] for v, r in rows.items() if v != "ComfyUI int8 (same file)"}
    assert err["bf16"] == 0.0 and all(0 < e < 0.15 for v, e in err.items() if not v.startswith("bf16")), err
    # the fold changes where the norm is computed, not the numbers (on the CPU it runs in torch either way)
    assert abs(err["adapter int8"] - err["adapter int8 (norms in torch)"]) < 1e-4, err
    # the node's default attention computes what ComfyUI's own does (the same kernel, or ComfyUI's call itself)
    assert err["bf16 + attention auto"] == 0.0 and err["adapter int8 + attention comfyui"] == err["adapter int8"]
    assert err["adapter int8 + attention sdpa"] == err["adapter int8"]
    # the CPU has no cost model: a copy budget copies nothing there, the numbers are the int8 row's
    assert err["adapter int8 + dense_copy_mb"] == err["adapter int8"]
    assert rows["adapter int8 + dense_copy_mb"]["note"].endswith("dense copies: 0 layers, 0.0 of 8192.0 MiB")
    assert rows["ComfyUI int8 (same file)"]["note"] == "not run: CPU smoke run"
    assert (tmp_path / "bench_comfyui_sdxl.png").read_bytes()[:4] == b"\x89PNG"
    assert "SMOKE RUN" in (tmp_path / "bench_comfyui_sdxl.md").read_text()


def test_graphs_rows_step_through_apply_model(comfyui_root: Path, tmp_path: Path) -> None:
    """``--graphs``: every row steps through ``BaseModel.apply_model`` (sigmas, a float32 latent), with the node's
    cuda_graphs option on bf16 and on the folded int8 adapter; on the CPU the option runs eagerly (its wrapper
    says why), so each graph row computes its eager row's output."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--graphs", "--out", str(tmp_path),
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_sdxl.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "bf16 + attention auto", "bf16 + cuda graphs", "adapter int8",
                          "adapter int8 (norms in torch)", "adapter fp8", "adapter int8 + attention sdpa",
                          "adapter int8 + attention comfyui",
                          "adapter int8 + cuda graphs", "ComfyUI int8 (same file)"]
    assert report["env"]["apply_model"] is True
    assert rows["bf16 + cuda graphs"]["rel_err_vs_bf16"] == 0.0
    graphs, eager = rows["adapter int8 + cuda graphs"], rows["adapter int8"]
    assert 0 < eager["rel_err_vs_bf16"] < 0.15 and graphs["rel_err_vs_bf16"] == eager["rel_err_vs_bf16"]
    assert graphs["note"] == eager["note"] and graphs["step_ms"] > 0


def test_profile_of_the_tiny_unet_counts_ops_and_the_folds_work(comfyui_root: Path, tmp_path: Path) -> None:
    """``profile_comfyui_sdxl.py --smoke``: bf16 and the adapter variants profiled; the fold derives each norm's
    row once (in the warm-up), adds no memo entries from step to step and makes no syncs, and the unfolded adapter
    derives none; each variant's host time a step and Python's profile name the functions that carry it."""
    script = SCRIPT.parent / "profile_comfyui_sdxl.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--comfyui-cache",
                           str(comfyui_root)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "profile_comfyui_sdxl.json").read_text())
    bf16, folded, plain, sdpa, copies = report["results"]
    assert copies["variant"] == "adapter int8 + dense_copy_mb"  # (the CPU has no cost model: nothing copied)
    assert bf16["variant"] == "bf16" and bf16["memo_entries_after_warmup"] == 0
    assert folded["variant"] == "adapter int8" and plain["variant"] == "adapter int8 (norms in torch)"
    assert sdpa["variant"] == "adapter int8 + attention sdpa" and sdpa["norm_rows_derived_in_warmup"] == 3 * 11
    assert folded["norm_rows_derived_in_warmup"] == 3 * 11 and plain["norm_rows_derived_in_warmup"] == 0
    assert folded["norm_rows_derived_while_profiled"] == 0 and folded["memo_entries_added_while_profiled"] == 0
    assert folded["syncs_per_step"] == {} and folded["top_by_count"][0]["count"] > 0
    # which path each layer memoized, by shape: every entry counted, on the CPU the reference (no plans)
    assert sum(folded["memo_backends"].values()) == folded["memo_entries_after_warmup"] > 0
    assert all(key.startswith("torch ") and " M=" in key for key in folded["memo_backends"])
    assert folded["copy_budget"] is None and copies["copy_budget"] == "0 layers, 0.0 of 8192.0 MiB"
    assert plain["top_by_device"][0]["device_us"] > 0  # (on the CPU: its host time)
    for r in (bf16, folded, plain):
        assert 0 < r["host_ms"] <= r["wall_ms"] * 1.5 and r["cprofile_ms"] > 0
        assert r["cprofile_top"][0]["self_ms"] >= r["cprofile_top"][-1]["self_ms"]
    # the adapter's layers run the quantized path: our dispatch is in its profile, not in bf16's
    def ours(r: dict) -> bool:
        return any("kernels/dispatch.py" in f["function"] for f in r["cprofile_top"])

    assert ours(plain) and not ours(bf16)
