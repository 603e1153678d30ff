"""The GPU benchmark's --smoke mode runs end to end on the CPU (every variant, json + md written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # children run our CPU int8 layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_comfyui_flux.py"


def test_smoke_mode_measures_every_variant(comfyui_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--rounds", "2",
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_flux.json").read_text())
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["bf16", "bf16 + attention auto", "bf16 + attention sdpa", "bf16 + attention cudnn",
                        "adapter int8", "adapter int8 + attention sdpa", "adapter int8 + attention comfyui",
                        "adapter int8 (stock RoPE)", "adapter int8 (norms in torch)",
                        "adapter int8-rot", "adapter fp8", "adapter fp8 (norms in torch)",
                        "adapter int8 + attention cudnn", "adapter int8 + attention int8-fp8",
                        "adapter fp8 + attention cudnn", "ComfyUI int8 (same file)", "comfyquant loader (same file)"]
    assert all(r["step_ms"] > 0 and r["speedup_vs_bf16"] > 0 for r in report["results"])
    # the host's time a step beside it (on the CPU the step's own wall time: the same numbers)
    assert all(r["host_ms_all"] == r["step_ms_all"] and r["host_ms"] == r["step_ms"] for r in report["results"])
    assert "| host ms / step |" in (tmp_path / "bench_comfyui_flux.md").read_text()
    # two rounds pooled: every row holds both rounds' steps (2 each in the smoke run) and their medians
    assert all(len(r["step_ms_all"]) == 4 and r["note"].count("round medians") == 1 for r in report["results"])
    assert report["env"]["rounds"] == 2
    assert all("layers converted" in r["note"] for r in report["results"] if r["variant"].startswith("adapter"))
    assert "pooled over 2 rounds" in (tmp_path / "bench_comfyui_flux.md").read_text()
    assert (tmp_path / "bench_comfyui_flux.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the bars, as a picture
    assert "| adapter int8 | 64 |" in (tmp_path / "bench_comfyui_flux.md").read_text()
    err = {r["variant"]: r["rel_err_vs_bf16"] for r in report["results"]}
    assert err["bf16"] == err["bf16 + attention cudnn"] == err["bf16 + attention sdpa"] == 0.0, err
    assert err["bf16 + attention auto"] == 0.0  # on the CPU no call has a cuDNN choice: ComfyUI's own kernel
    assert all(0 < e < 0.1 for v, e in err.items() if not v.startswith("bf16")), err
    # on the CPU the attention override passes every call through to ComfyUI's own SDPA: same output as int8
    assert err["adapter int8 + attention int8-fp8"] == err["adapter int8 + attention cudnn"] == err["adapter int8"]
    assert err["adapter int8 + attention comfyui"] == err["adapter int8"]  # the default attention: the same kernel
    assert err["adapter int8 + attention sdpa"] == err["adapter int8"]
    assert err["adapter int8 (stock RoPE)"] == err["adapter int8"]  # the fused RoPE runs on CUDA only
    assert err["adapter fp8 + attention cudnn"] == err["adapter fp8"]
    # the norms folded into the quantized layers (torch on the CPU, from the block replacements) or not: the same
    # model within the rounding of the gated residual add
    for fmt in ("int8", "fp8"):
        assert abs(err[f"adapter {fmt}"] - err[f"adapter {fmt} (norms in torch)"]) < 0.02 * err[f"adapter {fmt}"]


def test_graphs_mode_steps_through_apply_model_with_the_nodes_wrapper(comfyui_root: Path, tmp_path: Path) -> None:
    """``--graphs --only``: the named variants and bf16, every step through ``BaseModel.apply_model`` (where the
    node's CUDA-graph wrapper sits; on the CPU it runs the model eagerly, so the graph rows equal their eager
    twins), errors against bf16's apply_model output."""
    only = "bf16 + cuda graphs,adapter int8 + attention cudnn,adapter int8 + attention cudnn + cuda graphs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--graphs", "--only", only,
                           "--comfyui-cache", str(comfyui_root)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_flux.json").read_text())
    assert report["env"]["apply_model"] is True
    err = {r["variant"]: r["rel_err_vs_bf16"] for r in report["results"]}
    assert list(err) == ["bf16", *only.split(",")]
    assert err["bf16"] == err["bf16 + cuda graphs"] == 0.0
    assert 0 < err["adapter int8 + attention cudnn"] == err["adapter int8 + attention cudnn + cuda graphs"] < 0.1


def test_merge_rounds_pools_each_rows_steps_and_keeps_untimed_rows() -> None:
    """``merge_rounds``: one row per (variant, resolution), the median of every round's steps pooled (not the
    median of medians), the peak VRAM the largest seen, each round's median in the note; a row that was not
    timed in any round (a failure, a variant not run) stays as its first round left it."""
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_comfyui_flux import Result, merge_rounds

    r1 = [Result("bf16", 512, 10.0, [9.0, 10.0, 11.0], 2.0, 1.0, host_ms=8.0, host_ms_all=[8.0, 8.0, 9.0]),
          Result("x", 512, note="failed: boom")]
    r2 = [Result("bf16", 512, 20.0, [20.0, 21.0, 19.0], 3.0, 1.0, host_ms=18.0, host_ms_all=[18.0, 17.0, 19.0]),
          Result("x", 512, note="failed: boom")]
    rows = merge_rounds([r1, r2])
    assert [(r.variant, r.resolution) for r in rows] == [("bf16", 512), ("x", 512)]
    bf16, failed = rows
    assert bf16.step_ms_all == [9.0, 10.0, 11.0, 20.0, 21.0, 19.0] and bf16.step_ms == 15.0  # median of all six
    assert bf16.host_ms_all == [8.0, 8.0, 9.0, 18.0, 17.0, 19.0] and bf16.host_ms == 13.0  # the host's, pooled too
    assert bf16.peak_vram_gib == 3.0 and bf16.note.endswith("round medians 10.0/20.0")
    assert failed.step_ms is None and failed.note == "failed: boom"
    assert merge_rounds([r1]) is r1  # one round: the rows as measured


def test_the_fast_quartile_reads_through_a_noisy_hosts_slow_phases() -> None:
    """Run 117's SDXL steps (H100, ms): bf16 and int8 with ``sdpa`` each lost a phase of steps to the host. The
    median's ratio takes the phases as they fell; the fast quartile compares the steady steps (bf16 55 ms, the int8
    variant 51): 1.08x."""
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_comfyui_flux import Result, add_speedups, fast_steps

    bf16 = [65, 66, 66, 64, 64, 54, 58, 59, 57, 56, 58, 56, 55, 55, 56, 55, 55, 55]
    sdpa = [74, 74, 74, 76, 57, 52, 51, 51, 51, 50, 51, 53, 77, 75, 77, 51, 50, 51]
    assert fast_steps([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0 and fast_steps([]) is None
    assert fast_steps([1.0, 2.0]) == 1.25  # linear between neighbours
    rows = [Result("bf16", 1024, 56.5, [float(t) for t in bf16]), Result("int8", 1024, 52.0, [float(t) for t in sdpa]),
            Result("failed", 1024, note="failed: boom")]
    add_speedups(rows)
    assert rows[0].speedup_vs_bf16 == rows[0].speedup_fast_vs_bf16 == 1.0
    assert round(rows[1].speedup_vs_bf16, 3) == round(56.5 / 52.0, 3)
    assert round(rows[1].speedup_fast_vs_bf16, 3) == round(55.0 / 51.0, 3)
    assert rows[2].speedup_vs_bf16 is None and rows[2].speedup_fast_vs_bf16 is None


def test_gemm_bench_draws_a_saved_report_without_a_gpu(tmp_path: Path) -> None:
    """``bench_gemm_ws.py --plot-from``: run 26's saved timings as bars, each the bf16 time over the variant's
    best pass (the table's numbers), the whole layers among them."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_gemm_ws
    import recorded_results

    name = "gemm_layers_run26_h200_2026-12-03.json"
    saved = recorded_results.path(name)  # the .json.gz as stored: the script reads either form
    assert bench_gemm_ws.main(["--out", str(tmp_path), "--plot-from", str(saved)]) == 0
    assert (tmp_path / "gemm_ws.png").read_bytes()[:4] == b"\x89PNG"
    groups = bench_gemm_ws.bar_groups(recorded_results.recorded(name)["rows"])
    qkv = groups["flux qkv 3072->9216, M 4096"]
    assert round(qkv["whole int8 layer (activation pass + picked GEMM)"], 2) == 1.58
    assert round(qkv["Gluon GEMM (picked)"], 2) == 1.71 and len(groups) == 18
