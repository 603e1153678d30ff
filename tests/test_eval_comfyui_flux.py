"""ComfyUI 0.30's own Flux detection and model class load the digits DiT and compute what ours computes;
the int8 file from the converter loads there too and stays close to the float model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from comfyquant.eval.dit import DigitsDiT, config_from_state_dict, flux_keys
from comfyquant.eval.workloads import DIT_FIXTURE

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]


def _inputs(model: DigitsDiT) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.4, 0.7, 0.95])
    ctx, y = model.conditioner(torch.tensor([0, 3, 7, 10]))
    return x, t, ctx.detach().float(), y.detach().float()


def _ours() -> DigitsDiT:
    sd = load_file(str(DIT_FIXTURE))
    m = DigitsDiT(config_from_state_dict(sd))
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m.eval()


def _comfy_flux(comfy: Any, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(flux_keys(sd)), model_options={"dtype": torch.float32})
    return patcher.model.diffusion_model


def test_comfyui_detects_a_flux_model(comfy: Any) -> None:
    sd = {k: v.float() for k, v in flux_keys(load_file(str(DIT_FIXTURE))).items()}
    conf = comfy.model_detection.detect_unet_config(sd, "")
    assert conf["image_model"] == "flux"
    assert (conf["hidden_size"], conf["num_heads"], conf["in_channels"], conf["context_in_dim"],
            conf["vec_in_dim"], conf["depth"], conf["depth_single_blocks"], conf["guidance_embed"]) == \
        (128, 1, 16, 64, 32, 2, 2, False)


def test_comfyui_flux_class_matches_our_forward(comfy: Any) -> None:
    ours = _ours()
    sd = {k: v.float() for k, v in load_file(str(DIT_FIXTURE)).items()}
    dm = _comfy_flux(comfy, sd)
    assert type(dm).__module__ == "comfy.ldm.flux.model"
    x, t, ctx, y = _inputs(ours)
    with torch.no_grad():
        a = ours(x, t, ctx, y)
        b = dm(x, t, ctx, y=y)
    assert b.shape == a.shape
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


@pytest.mark.stock_comfy_int8_cpu
def test_comfyui_runs_the_converted_int8_file(comfy: Any, tmp_path: Path) -> None:
    from comfyquant.convert.api import convert

    out = tmp_path / "dit-int8.safetensors"
    convert(DIT_FIXTURE, out, format="int8", progress=False)
    dm = _comfy_flux(comfy, load_file(str(out)))
    qkv = dm.double_blocks[0].img_attn.qkv
    assert type(qkv.weight).__name__ == "QuantizedTensor"
    ours = _ours()
    x, t, ctx, y = _inputs(ours)
    with torch.no_grad():
        ref = ours(x, t, ctx, y)
        got = dm(x, t, ctx, y=y)
    rel = float((got - ref).square().mean().sqrt() / ref.square().mean().sqrt())
    assert rel < 0.01  # measured 0.0028: W8A8 error, far from a wrong model (rel ~1)
