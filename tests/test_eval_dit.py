"""The digits DiT: Flux's key names and shapes, forward shape, RoPE math, the committed fixture."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyquant.eval.data import from_latent, load_digits, to_latent
from comfyquant.eval.dit import (
    AXES_DIM,
    DigitsDiT,
    DiTConfig,
    apply_rope,
    config_from_state_dict,
    flux_keys,
    rope_freqs,
)
from comfyquant.eval.workloads import DIT_FIXTURE


def _flux_key_set(depth: int, single: int) -> set[str]:
    """Flux.1's diffusion-model keys (without guidance_in), as in the published checkpoints."""
    keys = {f"{m}.{p}" for m in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                                 "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear",
                                 "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"):
                keys |= {f"{b}_{m}.weight", f"{b}_{m}.bias"}
            keys |= {f"{b}_attn.norm.query_norm.scale", f"{b}_attn.norm.key_norm.scale"}
    for i in range(single):
        b = f"single_blocks.{i}"
        keys |= {f"{b}.{m}.{p}" for m in ("linear1", "linear2", "modulation.lin") for p in ("weight", "bias")}
        keys |= {f"{b}.norm.query_norm.scale", f"{b}.norm.key_norm.scale"}
    return keys


def test_flux_key_names_and_fixed_shapes() -> None:
    cfg = DiTConfig(hidden=256, depth=2, depth_single=3)
    sd = DigitsDiT(cfg).state_dict()
    assert set(flux_keys(sd)) == _flux_key_set(2, 3)
    assert set(sd) - set(flux_keys(sd)) == {"conditioner.txt_table", "conditioner.vec_table"}
    # What ComfyUI reads from the shapes: in_channels = cols/4 = 16, out 16*2*2, heads of 128.
    assert sd["img_in.weight"].shape == (256, 64)
    assert sd["final_layer.linear.weight"].shape == (64, 256)
    assert sd["double_blocks.0.img_attn.norm.key_norm.scale"].shape == (128,)
    assert sd["single_blocks.0.linear1.weight"].shape == (256 * 7, 256)
    assert sd["single_blocks.0.linear2.weight"].shape == (256, 256 * 5)
    assert config_from_state_dict(sd) == cfg


def test_forward_shape_and_conditioning_matters() -> None:
    torch.manual_seed(0)
    model = DigitsDiT(DiTConfig()).eval()
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        v = model.velocity(x, torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 2, 10]))
        v2 = model.velocity(x, torch.tensor([0.2, 0.5, 0.9]), torch.tensor([4, 2, 10]))
    assert v.shape == x.shape
    assert not torch.allclose(v[0], v2[0]) and torch.allclose(v[1:], v2[1:])


def test_rope_is_pairwise_complex_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (2, 7, 3), generator=g).float()
    x = torch.randn(2, 1, 7, sum(AXES_DIM), generator=g, dtype=torch.float64)
    cos, sin = rope_freqs(ids)
    got = apply_rope(x, cos.double(), sin.double())
    angles = []
    for i, d in enumerate(AXES_DIM):
        omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[..., i].double()[..., None] * omega)
    z = torch.view_as_complex(x.reshape(2, 1, 7, -1, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones(1, dtype=torch.float64),
                                              torch.cat(angles, -1)[:, None])).reshape(x.shape)
    assert torch.allclose(got, want, atol=1e-5)


def test_latent_encoding_round_trips() -> None:
    d = load_digits()
    assert d.images.shape == (1797, 1, 32, 32) and float(d.images.min()) >= -1 and float(d.images.max()) <= 1
    lat = to_latent(d.images[:5])
    assert lat.shape == (5, 16, 8, 8)
    assert torch.equal(from_latent(lat), d.images[:5])


def test_committed_fixture_records_how_it_was_made() -> None:
    with safe_open(str(DIT_FIXTURE), "pt") as f:
        meta = f.metadata()
    assert "--seed 0" in meta["train_command"] and json.loads(meta["train_config"])["seed"] == 0
    assert int(meta["steps_run"]) > 1000
    sd = load_file(str(DIT_FIXTURE))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert set(flux_keys(sd)) == _flux_key_set(2, 2)
    assert DIT_FIXTURE.stat().st_size < 8_000_000
