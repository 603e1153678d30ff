"""``--extract-lora RANK``: the quantization error of each quantized layer written as a rank-r LoRA, which
comfyquant's dynamic path and stock ComfyUI's LoRA loader both read, and which moves the quantized layer
towards the float weight by exactly the energy its singular values hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import base_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyquant.lora as cql
from comfyquant.convert.api import convert
from comfyquant.errors import UserError
from comfyquant.formats import dequantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.lora.extract import low_rank_svd

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "flux.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in base_weights("flux").items()}, str(path))
    return path


def test_low_rank_svd_finds_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g) @ torch.randn(6, 500, generator=g)
    e = a + 0.01 * torch.randn(300, 500, generator=g)
    exact = torch.linalg.svdvals(e)
    for limit in (0, 1 << 30):  # the randomized range finder, and the exact SVD small matrices take
        u, s, vh = low_rank_svd(e, 6, exact_limit=limit)
        assert torch.allclose(s, exact[:6], rtol=1e-4)
        residual = (e - u @ torch.diag(s) @ vh).norm()
        assert float(residual) <= float(exact[6:].norm()) * 1.001
    u, _, vh = low_rank_svd(e, 6, exact_limit=0)
    u2, _, vh2 = low_rank_svd(e, 6, exact_limit=0)
    assert torch.equal(u, u2) and torch.equal(vh, vh2)  # seeded: the same file every run


def _layers(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant"))


def test_extracted_lora_corrects_each_layer_by_its_captured_energy(flux_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    report = convert(flux_file, out, extract_lora=8, progress=False)
    lora_path = tmp_path / "q_qerr_r8.safetensors"
    assert any(n.startswith(f"--extract-lora 8: wrote {lora_path}") for n in report.notes)
    q, lora, base = load_file(str(out)), load_file(str(lora_path)), load_file(str(flux_file))
    layers = _layers(q)
    assert len(layers) == 20 and len(lora) == 3 * len(layers)
    with safe_open(str(lora_path), "pt") as f:
        assert '"rank": 8' in f.metadata()["comfyquant.extract_lora"]
    for layer in layers:
        m = f"diffusion_model.{layer}"
        up, down = lora[f"{m}.lora_up.weight"].float(), lora[f"{m}.lora_down.weight"].float()
        assert up.shape[1] == 8 and float(lora[f"{m}.alpha"]) == 8.0
        w = base[f"{layer}.weight"].float()
        wq = dequantize_weight({"weight": q[f"{layer}.weight"], "weight_scale": q[f"{layer}.weight_scale"]},
                               decode_comfy_quant(q[f"{layer}.comfy_quant"]))
        err = w - wq
        best = err.norm() ** 2 - torch.linalg.svdvals(err)[:8].square().sum()
        assert float((err - up @ down).norm() ** 2) <= float(best) * 1.01 + 1e-10


def test_full_rank_extraction_restores_the_float_weights_through_the_dynamic_path(flux_file: Path,
                                                                                  tmp_path: Path) -> None:
    """rank >= min(N, K): quantized layer + side path computes the float layer (fp16 storage of the factors)."""
    from comfyquant.runtime.loader import load_quantized

    sd = {"a.weight": torch.randn(48, 32) * 0.05, "a.bias": torch.zeros(48), "b.weight": torch.randn(32, 48) * 0.05}
    src = tmp_path / "small.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "small-q.safetensors"
    convert(src, out, model="none", extract_lora=32, progress=False)
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(32, 48))
    model.add_module("b", torch.nn.Linear(48, 32, bias=False))
    load_quantized(model, out)
    for mod in model:
        mod.set_backend("dequant")  # weight-only compute: the activations' own int8 rounding is not the LoRA's job
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = x @ sd["a.weight"].T @ sd["b.weight"].T
        before = model(x)
        h = cql.apply(model, tmp_path / "small-q_qerr_r32.safetensors", 1.0, "dynamic")
        after = model(x)
    assert len(h.layers) == 2
    e0, e1 = float((before - want).norm()), float((after - want).norm())
    assert e1 < 0.01 * e0, (e0, e1)


def test_extract_target_regex_and_bad_rank(flux_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    convert(flux_file, out, extract_lora=2, extract_lora_target=r"single_blocks\.1\.", progress=False,
            extract_lora_output=tmp_path / "only.safetensors")
    keys = load_file(str(tmp_path / "only.safetensors"))
    assert sorted({k.removesuffix(".alpha").removesuffix(".lora_up.weight").removesuffix(".lora_down.weight")
                   for k in keys}) == ["diffusion_model.single_blocks.1.linear1",
                                                          "diffusion_model.single_blocks.1.linear2"]
    with pytest.raises(UserError, match="needs a rank >= 1"):
        convert(flux_file, tmp_path / "u.safetensors", extract_lora=-1, progress=False)
    with pytest.raises(UserError, match="LoRA output exists"):
        convert(flux_file, tmp_path / "v.safetensors", extract_lora=2, extract_lora_output=tmp_path / "only.safetensors",
                progress=False)
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "v.safetensors").exists()


def test_cli_spellings(flux_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from comfyquant.cli import convert_to_quant, main

    assert main.main(["convert", str(flux_file), "-o", str(tmp_path / "c.safetensors"), "--extract-lora", "4",
                      "-q"]) == 0
    assert (tmp_path / "c_qerr_r4.safetensors").is_file()
    assert convert_to_quant.main(["-i", str(flux_file), "-o", str(tmp_path / "p.safetensors"), "--extract-lora",
                                  "--lora-rank", "4", "--lora_target", "img_attn"]) == 0
    keys = load_file(str(tmp_path / "p_lora.safetensors"))  # convert_to_quant's default name
    assert keys and all("img_attn" in k for k in keys)
    capsys.readouterr()
    assert convert_to_quant.main(["-i", str(flux_file), "--extract-lora", "--lora-depth", "2"]) == 2
    assert "--lora-depth" in capsys.readouterr().err


@pytest.mark.comfyui
def test_stock_comfyui_reads_the_extracted_file_as_a_lora(comfy: Any, flux_file: Path, tmp_path: Path) -> None:
    from lora_fixtures import comfy_flux_like_keymap, comfy_merged

    out = tmp_path / "q.safetensors"
    convert(flux_file, out, extract_lora=4, progress=False)
    lora = load_file(str(tmp_path / "q_qerr_r4.safetensors"))
    base = {k: v.float() for k, v in load_file(str(flux_file)).items()}
    merged = comfy_merged(comfy, lora, comfy_flux_like_keymap(comfy, base),
                          {f"diffusion_model.{k}": v for k, v in base.items()})
    assert len(merged) == 20
    for key, w in merged.items():
        m = key[: -len(".weight")]
        want = base[key[len("diffusion_model."):]] + lora[f"{m}.lora_up.weight"].float() @ \
            lora[f"{m}.lora_down.weight"].float()
        assert torch.allclose(w, want, atol=1e-6)
