"""Helpers for the converter tests: tiny real checkpoints on disk, hashing, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyquant.io.digest import file_sha256

REPO = Path(__file__).resolve().parents[1]


def flux_like(dtype: torch.dtype = torch.bfloat16, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """A small Flux-layout state dict with real key names (hidden 64) and a few awkward shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    sd = {
        "img_in.weight": r(64, 64), "img_in.bias": r(64),
        "txt_in.weight": r(64, 48), "txt_in.bias": r(64),
        "time_in.in_layer.weight": r(64, 32), "time_in.in_layer.bias": r(64),
        "double_blocks.0.img_attn.qkv.weight": r(192, 64), "double_blocks.0.img_attn.qkv.bias": r(192),
        "double_blocks.0.img_attn.norm.key_norm.scale": r(32),
        "double_blocks.0.img_attn.proj.weight": r(64, 64),
        "double_blocks.0.img_mlp.0.weight": r(256, 64), "double_blocks.0.img_mlp.2.weight": r(64, 256),
        "double_blocks.0.img_mod.lin.weight": r(384, 64),
        "double_blocks.0.txt_mlp.0.weight": r(40, 40),
        "single_blocks.0.linear1.weight": r(320, 64), "single_blocks.0.linear2.weight": r(64, 320),
        "final_layer.linear.weight": r(64, 64),
        "conv.weight": r(16, 4, 3, 3), "tiny.weight": r(8, 8), "steps": torch.tensor([3], dtype=torch.int64),
    }
    return {prefix + k: v for k, v in sd.items()}


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def sha256(path: Path) -> str:
    return file_sha256(path)


def leftovers(directory: Path) -> list[str]:
    """Temporary files a conversion may have left in ``directory``."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name) if d.is_dir() else []


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for ``python -m comfyquant`` subprocesses."""
    return dict(os.environ)


def run_cli(tmp_path: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``python -m comfyquant ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "comfyquant", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(tmp_path), cwd=tmp_path, timeout=300, **kw)
