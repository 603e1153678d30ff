"""The Wan GPU benchmark runs end to end on the CPU on a tiny video (every variant, json + md written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfyquant.nodes.attention import MODES, policy_for

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # children run our CPU int8 layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_comfyui_wan.py"


def test_tiny_video_measures_every_variant(comfyui_root: Path, tmp_path: Path) -> None:
    # 9 frames -> 3 latent frames; 80x48 -> 10x6 latent (even: no padding) -> 5x3 patches a frame: 45 tokens
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--comfyui-cache",
                           str(comfyui_root), "--frames", "9", "--width", "80", "--height", "48", "--depth", "1",
                           "--rounds", "2"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_comfyui_wan.json").read_text())
    env = report["env"]
    assert env["latent"] == [1, 16, 3, 6, 10] and env["tokens"] == 3 * 3 * 5 and env["depth"] == 1
    assert env["dims"]["heads"] * 128 == env["dims"]["dim"] and env["attention_modes"] == list(MODES)
    attentions = [m for m in MODES if m != "auto"]  # the node's default: the rows without an attention suffix
    exact = [m for m in MODES if m != "comfyui" and not getattr(policy_for(m), "quantize", False)]
    assert exact == ["auto", "sdpa", "cudnn"]
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["bf16", *(f"bf16 + attention {m}" for m in exact), "adapter int8", "adapter fp8",
                        *(f"adapter int8 + attention {m}" for m in attentions), "adapter int8 (norms in torch)",
                        "ComfyUI int8 (same file)"]
    assert all(r["resolution"] == "80x48x9" for r in report["results"])
    # two rounds pooled (2 smoke steps each), each round's median in the note
    assert env["rounds"] == 2 and "pooled over 2 rounds" in (tmp_path / "bench_comfyui_wan.md").read_text()
    assert all(r["step_ms"] > 0 and r["speedup_vs_bf16"] > 0 and len(r["step_ms_all"]) == 4
               and "round medians" in r["note"] for r in report["results"]), report["results"]
    # one block: self- and cross-attention q, k, v, o and the two ffn linears
    assert all(r["note"].startswith("10 layers converted") for r in report["results"]
               if r["variant"].startswith("adapter")), report["results"]
    # its two modulated norms handed to self_attn's q / k / v and ffn.0, except where the fold is off
    notes = {r["variant"]: r["note"] for r in report["results"]}
    assert all(("0 blocks'" if v.endswith("(norms in torch)") else "1 blocks'") in n
               for v, n in notes.items() if v.startswith("adapter")), notes
    assert env["output_shapes"] == {v: [1, 16, 3, 6, 10] for v in variants}
    err = {r["variant"]: r["rel_err_vs_bf16"] for r in report["results"]}
    assert all(err[f"bf16 + attention {m}"] == 0.0 for m in exact) and err["bf16"] == 0.0, err
    assert all(0 < e < 0.1 for v, e in err.items() if not v.startswith("bf16")), err
    assert err["adapter int8"] < err["adapter fp8"], err  # int8 per-channel beats fp8 e4m3 on Gaussian weights
    # on the CPU the attention override passes every call through to ComfyUI's own attention: int8's output
    assert all(err[f"adapter int8 + attention {m}"] == err["adapter int8"] for m in attentions), err
    assert abs(err["adapter int8 (norms in torch)"] - err["adapter int8"]) < 0.05 * err["adapter int8"], err
    assert (tmp_path / "bench_comfyui_wan.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "bench_comfyui_wan.md").read_text()
    assert "| adapter int8 | 80x48x9 |" in md and "-> 45 tokens" in md and "SMOKE RUN" in md
