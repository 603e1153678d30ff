"""Session fixture: one real ComfyUI 0.30.0 server on 127.0.0.1 with the node pack installed by
``comfyquant install-nodes``, plus the model files the node tests load (made here from the bundled digits DiT).

Started once per test session, on a free port, and stopped at the end; every failure message of the client
carries the tail of the server's log.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.io.comfy_meta import encode_comfy_quant
from comfyquant.nodes.workflows import EXAMPLE_LORA
from comfyquant.testing.comfyui_server import ComfyServer, ServerError, missing_requirements, prepare_base

LORA_FILE = "digits_test_lora.safetensors"
LORA_B_FILE = "digits_test_lora_b.safetensors"
FOREIGN_LORA_FILE = "other_model_lora.safetensors"


def make_lora(seed: int = 0, rank: int = 4, scale: float = 0.08) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA (``diffusion_model.<layer>.lora_up/lora_down/alpha``) on every attention and MLP linear
    of the digits DiT's blocks; ``scale`` makes it move the samples clearly (tens of percent)."""
    sd = load_file(str(DIT_FIXTURE))
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, w in sorted(sd.items()):
        if not key.endswith(".weight") or w.dim() != 2 or "_blocks." not in key or "_mod." in key \
                or "modulation" in key:
            continue
        layer = "diffusion_model." + key[: -len(".weight")]
        n, k = w.shape
        out[f"{layer}.lora_down.weight"] = (torch.randn(rank, k, generator=g) * scale)
        out[f"{layer}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * scale)
        out[f"{layer}.alpha"] = torch.tensor(float(rank))
    return out


def dit_forward(patcher: Any, sd: dict[str, torch.Tensor], **load: Any) -> torch.Tensor:
    """One digits-DiT denoiser call through a ComfyUI MODEL (fixed noise, timesteps and digits 3 and 0): loaded
    by ``load_models_gpu``, or with ``load`` (``patch_model`` arguments, e.g. ``lowvram_model_memory``) patched
    in directly and unpatched after."""
    import comfy.model_management

    if load:
        comfy.model_management.unload_all_models()
        patcher.patch_model(**load)
    else:
        comfy.model_management.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    ctx, y = sd["conditioner.txt_table"][[3, 10]].float(), sd["conditioner.vec_table"][[3, 10]].float()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, ctx, y=y).clone()
    finally:
        if load:
            patcher.unpatch_model()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of ``a - b`` relative to the RMS of ``b`` (float64)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float((a64 - b64).square().mean().sqrt() / b64.square().mean().sqrt())


@dataclass
class NodeServer:
    """The running server and where its files are."""

    server: ComfyServer
    base: Path

    def run(self, workflow: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        return self.server.run(workflow, timeout)

    def latent(self, entry: dict[str, Any], node: str = "6") -> torch.Tensor:
        """The latent a SaveLatent node wrote (fails with the log when the prompt errored)."""
        outputs = entry.get("outputs", {}).get(node)
        if not outputs:
            raise AssertionError(f"no output from node {node}: {entry.get('status')}\n{self.server.log_tail()}")
        item = outputs["latents"][0]
        path = self.base / "output" / item["subfolder"] / item["filename"]
        return load_file(str(path))["latent_tensor"]

    def models(self) -> Path:
        return self.base / "models" / "diffusion_models"


def _write_model_files(models: Path) -> None:
    from comfyquant.convert.api import convert

    convert(DIT_FIXTURE, models / "dit-int8.safetensors", format="int8", progress=False)
    convert(DIT_FIXTURE, models / "dit-int8-block.safetensors", format="int8-block", block_size=32, progress=False)
    sd = load_file(str(models / "dit-int8.safetensors"))
    bad = dict(sd)
    layer = "double_blocks.0.img_attn.qkv"
    bad[f"{layer}.comfy_quant"] = encode_comfy_quant({"format": "nvfp4_experimental"})
    save_file(bad, str(models / "bad-format.safetensors"))
    nonlinear = dict(sd)
    norm = "double_blocks.0.img_attn.norm.key_norm"
    nonlinear[f"{norm}.comfy_quant"] = encode_comfy_quant({"format": "int8_tensorwise"})
    nonlinear[f"{norm}.weight_scale"] = torch.ones(())
    save_file(nonlinear, str(models / "nonlinear-quant.safetensors"))


@pytest.fixture(scope="session")
def node_server(comfyui_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    missing = missing_requirements()
    if missing:
        pytest.fail(f"ComfyUI's server needs {', '.join(missing)}: run `bash scripts/setup.sh` (test extra)")
    base = prepare_base(tmp_path_factory.mktemp("comfyui-base"))
    proc = subprocess.run([sys.executable, "-m", "comfyquant", "install-nodes", str(base), "--example-model"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    _write_model_files(base / "models" / "diffusion_models")
    save_file(make_lora(), str(base / "models" / "loras" / LORA_FILE))
    save_file(make_lora(), str(base / "models" / "loras" / EXAMPLE_LORA))
    save_file(make_lora(seed=1), str(base / "models" / "loras" / LORA_B_FILE))
    save_file({"diffusion_model.some_other_net.to_q.lora_up.weight": torch.ones(8, 4),
               "diffusion_model.some_other_net.to_q.lora_down.weight": torch.ones(4, 8)},
              str(base / "models" / "loras" / FOREIGN_LORA_FILE))
    server = ComfyServer(comfyui_root, base)
    try:
        server.start()
    except ServerError as e:
        pytest.fail(str(e))
    try:
        yield NodeServer(server, base)
    finally:
        server.stop()
