"""Synthetic checkpoints: valid safetensors with the spec's names/shapes, heavy-tailed values, streamed writing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyquant.errors import UserError
from comfyquant.presets.registry import detect_preset
from comfyquant.testing.architectures import arch_tensors
from comfyquant.testing.synthetic import ValueModel, student_t4, tensor_kind, write_synthetic_checkpoint


def _excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2 - 3.0)


@pytest.mark.parametrize("arch", ["flux", "wan", "sdxl", "t5xxl", "lora"])
def test_file_loads_with_the_spec_names_shapes_and_dtype(tmp_path: Path, arch: str) -> None:
    out = tmp_path / f"{arch}.safetensors"
    info = write_synthetic_checkpoint(out, arch, "tiny", seed=3, prefix="model.diffusion_model.")
    tensors = load_file(out)
    spec = [("model.diffusion_model." + n, s) for n, s in arch_tensors(arch, "tiny")]
    assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(spec)
    assert all(t.dtype is torch.bfloat16 for t in tensors.values())
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert info.tensors == len(spec) and info.bytes == out.stat().st_size
    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["comfyquant.synthetic"])
    assert meta == {"arch": arch, "size": "tiny", "seed": 3}
    assert detect_preset({n: tuple(t.shape) for n, t in tensors.items()}).name == arch
    assert not list(tmp_path.glob("*.tmp-*"))


def test_values_are_heavy_tailed_with_outlier_input_channels(tmp_path: Path) -> None:
    out = tmp_path / "wan.safetensors"
    write_synthetic_checkpoint(out, "wan", "tiny", dtype=torch.float32)
    t = load_file(out)
    w = t["blocks.0.ffn.0.weight"]  # [768, 256]
    col_rms = w.pow(2).mean(0).sqrt()
    top = col_rms.topk(4).values
    median = col_rms.median()
    assert torch.all(top / median > 10), "four outlier input channels x20 expected"
    assert float(col_rms.sort().values[-5] / median) < 2, "only four outlier channels expected"
    normal_cols = w[:, col_rms < 3 * median]
    assert 0.012 < float(normal_cols.std()) < 0.03
    assert _excess_kurtosis(normal_cols) > 1.0  # Gaussian: 0; Student-t(4): heavy tails
    norm = t["blocks.0.norm3.weight"]
    assert abs(float(norm.mean()) - 1) < 0.02 and float(norm.std()) < 0.1
    bias = t["blocks.0.ffn.0.bias"]
    assert float(bias.abs().max()) < 0.05


def test_student_t4_matches_its_distribution() -> None:
    x = student_t4(2_000_000, torch.Generator().manual_seed(0)).double()
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.var()) - 2.0) < 0.15  # df / (df - 2)
    # P(|T| > 4) for Student-t(4) is 0.0161 (vs 6.3e-5 for a standard normal)
    assert abs(float((x.abs() > 4).double().mean()) - 0.0161) < 0.001


def test_writing_is_deterministic_per_seed(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    write_synthetic_checkpoint(a, "clip", "tiny", seed=1)
    write_synthetic_checkpoint(b, "clip", "tiny", seed=1)
    write_synthetic_checkpoint(c, "clip", "tiny", seed=2)
    assert a.read_bytes() == b.read_bytes()
    ta, tc = load_file(a), load_file(c)
    assert not torch.equal(ta["text_model.encoder.layers.0.mlp.fc1.weight"], tc["text_model.encoder.layers.0.mlp.fc1.weight"])


def test_tensor_kinds() -> None:
    assert tensor_kind("double_blocks.0.img_attn.qkv.weight", (768, 256)) == "linear"
    assert tensor_kind("double_blocks.0.img_attn.qkv.bias", (768,)) == "bias"
    assert tensor_kind("double_blocks.0.img_attn.norm.key_norm.scale", (128,)) == "norm"
    assert tensor_kind("blocks.0.norm3.weight", (256,)) == "norm"
    assert tensor_kind("shared.weight", (1024, 256)) == "other"
    assert tensor_kind("x.alpha", ()) == "scalar"
    assert tensor_kind("patch_embedding.weight", (256, 16, 1, 2, 2)) == "other"


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown architecture"):
        write_synthetic_checkpoint(tmp_path / "x.safetensors", "flux3", "tiny")
    with pytest.raises(UserError, match="no size 'small'"):
        write_synthetic_checkpoint(tmp_path / "x.safetensors", "qwen-image", "small")
    with pytest.raises(UserError, match="unsupported dtype"):
        write_synthetic_checkpoint(tmp_path / "x.safetensors", "flux", "tiny", dtype=torch.int8)
    with pytest.raises(UserError, match="does not exist"):
        write_synthetic_checkpoint(tmp_path / "missing" / "x.safetensors", "flux", "tiny")
    assert not list(tmp_path.iterdir())


def test_generation_is_streamed_peak_rss_stays_small(tmp_path: Path) -> None:
    """A ~290 MB checkpoint is written while the process's peak RSS grows by far less than the file."""
    out = tmp_path / "flux_small.safetensors"
    script = textwrap.dedent(f"""
        import resource, json
        from comfyquant.testing.synthetic import write_synthetic_checkpoint, ValueModel
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info = write_synthetic_checkpoint({str(out)!r}, "flux", "small",
                                          model=ValueModel(chunk_elements=1 << 20, pool_size=1 << 22))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grow_kib": after - before, "bytes": info.bytes, "largest": info.largest_tensor_bytes}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["bytes"] == out.stat().st_size > 250e6
    grow = stats["grow_kib"] * 1024
    assert grow < 0.25 * stats["bytes"], stats  # holding the model would grow RSS by >= the file size


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "t5.safetensors"
    cmd = [sys.executable, "-m", "comfyquant.testing", "--arch", "t5xxl-with-decoder", "--size", "tiny",
           "-o", str(out), "--dtype", "fp16", "--prefix", "text_encoders.t5xxl.transformer."]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tensors" in proc.stdout
    tensors = load_file(out)
    assert "text_encoders.t5xxl.transformer.decoder.final_layer_norm.weight" in tensors
    assert all(t.dtype is torch.float16 for t in tensors.values())
    bad = subprocess.run([*cmd[:3], "--arch", "flux3", "-o", str(tmp_path / "y")], capture_output=True, text=True)
    assert bad.returncode == 2 and not (tmp_path / "y").exists()


def test_value_model_validates_chunking() -> None:
    with pytest.raises(ValueError):
        ValueModel(chunk_elements=1 << 23, pool_size=1 << 23)


@pytest.mark.comfyui
@pytest.mark.parametrize(("arch", "prefix"), [("flux", "model.diffusion_model."), ("wan", ""), ("sd3", ""),
                                              ("hunyuan", ""), ("ltxv", "diffusion_model.")])
def test_tiny_files_load_into_comfyui_models(comfy, tmp_path: Path, arch: str, prefix: str) -> None:
    """ComfyUI detects the model in the file, builds its class, and takes every tensor (strict load)."""
    path = tmp_path / f"{arch}.safetensors"
    write_synthetic_checkpoint(path, arch, "tiny", prefix=prefix)
    sd = comfy.utils.load_torch_file(str(path))
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    assert config is not None
    model = config.get_model(sd, prefix)
    weights = config.process_unet_state_dict({k[len(prefix):]: v for k, v in sd.items()})
    model.diffusion_model.load_state_dict(weights, strict=True)
    if arch == "flux":  # and it runs: a finite prediction of the latent's shape
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model.diffusion_model(x, torch.tensor([0.5]), torch.randn(1, 8, 256), y=torch.randn(1, 256),
                                        guidance=torch.tensor([3.5]))
        assert out.shape == x.shape and torch.isfinite(out).all()
