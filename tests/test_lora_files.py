"""LoRA files and merges that must fail, or report, clearly: a LoRA for another model, unknown key formats, corrupt
and pickled files, partial matches; one line naming the file and the first offending key, and nothing written.
Also: quantized LoRA files read back dequantized, and the command-line scale syntax."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_helpers import leftovers
from lora_fixtures import LoraBuilder, base_weights
from safetensors.torch import load_file, save_file

from comfyquant.convert.api import convert
from comfyquant.errors import CorruptFileError, UserError
from comfyquant.io.reader import CheckpointReader
from comfyquant.lora.files import read_lora
from comfyquant.lora.merge import LoRAMerge, LoraSpec, MergeConfig

H = 256

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "flux.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in base_weights("flux").items()}, str(path))
    return path


def _save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def _fails(flux_file: Path, tmp_path: Path, lora: Path, *match: str) -> str:
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError) as e:
        convert(flux_file, out, merge_loras=[str(lora)], progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(lora) in msg, msg
    for m in match:
        assert m in msg, msg
    assert not out.exists() and leftovers(tmp_path) == []
    return msg


def test_lora_for_another_model_is_refused(flux_file: Path, tmp_path: Path) -> None:
    sdxl = LoraBuilder().lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640).sd
    _fails(flux_file, tmp_path, _save(tmp_path, "sdxl.safetensors", sdxl), "none of its 1 modules matches",
           "first key 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_", "(flux)")


def test_shape_mismatch_names_file_and_key(flux_file: Path, tmp_path: Path) -> None:
    """Right names, other widths (a Flux-dev LoRA on a smaller Flux): an error, not a silent skip."""
    big = LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", 3072, 3072).sd
    _fails(flux_file, tmp_path, _save(tmp_path, "big.safetensors", big),
           "(key 'lora_unet_double_blocks_0_img_attn_proj.lora_",
           "double_blocks.0.img_attn.proj.weight is [256, 256]",
           "made for another model")


def test_dora_scale_of_wrong_shape_is_refused(flux_file: Path, tmp_path: Path) -> None:
    sd = LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd
    sd["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(7, 1)
    _fails(flux_file, tmp_path, _save(tmp_path, "dora.safetensors", sd), "dora_scale")


@pytest.mark.parametrize("key, what", [
    ("lora_unet_double_blocks_0_img_attn_proj.weird_up.weight", "unknown LoRA key format"),
    ("lora_unet_double_blocks_0_img_attn_proj.oft_blocks", "OFT adapters are not supported"),
    ("transformer.blocks.0.attn1.to_q.lora_magnitude_vector", "PEFT DoRA"),
])
def test_unknown_or_unsupported_keys_are_refused(flux_file: Path, tmp_path: Path, key: str, what: str) -> None:
    sd = LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H).sd
    sd[key] = torch.zeros(4, 4)
    _fails(flux_file, tmp_path, _save(tmp_path, "odd.safetensors", sd), key, what)


def test_incomplete_adapters_are_refused(tmp_path: Path) -> None:
    sd = LoraBuilder().lora("lora_unet_x", 8, 8).sd
    del sd["lora_unet_x.lora_down.weight"]
    with pytest.raises(UserError, match=r"lacks its down tensor.*lora_unet_x.lora_up.weight"):
        read_lora(_save(tmp_path, "half.safetensors", sd))
    sd = LoraBuilder().lora("lora_unet_x", 8, 8, rank=4).sd
    sd["lora_unet_x.lora_down.weight"] = torch.zeros(3, 8)
    with pytest.raises(UserError, match="ranks differ"):
        read_lora(_save(tmp_path, "rank.safetensors", sd))
    sd = LoraBuilder().lora("lora_unet_x", 8, 8).sd
    sd["lora_unet_x.alpha"] = torch.ones(2)
    with pytest.raises(UserError, match="alpha must be one number"):
        read_lora(_save(tmp_path, "alpha.safetensors", sd))


def test_nan_in_a_lora_is_an_error_not_a_nan_model(flux_file: Path, tmp_path: Path) -> None:
    sd = LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][0, 0] = float("nan")
    _fails(flux_file, tmp_path, _save(tmp_path, "nan.safetensors", sd), "NaN or Inf",
           "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight")


def test_pickled_and_corrupt_files_are_refused(flux_file: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "lora.ckpt"
    torch.save(LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd, str(pickled))
    with pytest.raises(CorruptFileError, match="never unpickles"):
        convert(flux_file, tmp_path / "o.safetensors", merge_loras=[str(pickled)], progress=False)
    good = _save(tmp_path, "good.safetensors", LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="truncated"):
        convert(flux_file, tmp_path / "o.safetensors", merge_loras=[str(cut)], progress=False)
    with pytest.raises(UserError, match="input not found"):
        convert(flux_file, tmp_path / "o.safetensors", merge_loras=[str(tmp_path / "missing.safetensors")],
                progress=False)
    assert not (tmp_path / "o.safetensors").exists() and leftovers(tmp_path) == []


def test_partial_match_is_reported_with_counts_and_first_keys(flux_file: Path, tmp_path: Path) -> None:
    sd = (LoraBuilder().lora("lora_unet_double_blocks_0_img_attn_proj", H, H)
          .lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", 1024, 256)
          .lora("lora_te1_text_model_encoder_layers_1_mlp_fc1", 1024, 256).sd)
    out = tmp_path / "out.safetensors"
    report = convert(flux_file, out, merge_loras=[str(_save(tmp_path, "mixed.safetensors", sd))], progress=False)
    note = next(n for n in report.notes if n.startswith("LoRA mixed.safetensors"))
    assert "1 of 3 modules matched, 1 base tensors changed; 2 NOT matched: " \
           "lora_te1_text_model_encoder_layers_0_mlp_fc1, lora_te1_text_model_encoder_layers_1_mlp_fc1" in note
    assert note in report.to_text()


def test_quantized_lora_reads_back_dequantized_and_merges_the_same(flux_file: Path, tmp_path: Path) -> None:
    """A LoRA converted with ``--model lora`` (int8 up/down) merges like the float LoRA it came from, up to
    int8 rounding of the factors."""
    sd = (LoraBuilder(scale=0.05).lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, rank=16)
          .lora("lora_unet_single_blocks_0_linear2", H, 5 * H, rank=16).sd)
    f = _save(tmp_path, "float.safetensors", {k: v.to(torch.bfloat16) for k, v in sd.items()})
    q = tmp_path / "q.safetensors"
    convert(f, q, model="lora", progress=False)
    assert any(k.endswith(".comfy_quant") for k in load_file(str(q)))
    lq, lf = read_lora(q), read_lora(f)
    assert lq.is_quantized() and not lf.is_quantized() and lq.adapters.keys() == lf.adapters.keys()
    for m, ad in lf.adapters.items():
        for role, key in ad.keys.items():
            a, b = lf.tensor(key), lq.tensor(lq.adapters[m].keys[role])
            assert float((a - b).abs().max()) <= float(a.abs().amax(dim=-1).max()) / 127 * 0.51 + 1e-6
    infos = CheckpointReader(flux_file).infos
    base = load_file(str(flux_file))
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"):
        merged = [LoRAMerge(MergeConfig((LoraSpec(p),))).bind(infos)(name, base[name].float()) for p in (f, q)]
        delta = merged[0] - base[name].float()
        assert delta.norm() > 0.03 * base[name].float().norm()
        assert (merged[1] - merged[0]).norm() < 0.02 * delta.norm()  # int8 rounding of both factors


def test_scale_syntax_and_dampening() -> None:
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec(Path("style.safetensors"), 0.8)
    assert LoraSpec.parse("style.safetensors:-1.5e-1").scale == -0.15
    assert LoraSpec.parse("C:\\loras\\a.safetensors") == LoraSpec(Path("C:\\loras\\a.safetensors"))
    three = tuple(LoraSpec(Path(f"{i}.safetensors"), s) for i, s in enumerate((1.0, 1.0, 0.5)))
    assert MergeConfig(three, 0.8).strengths() == pytest.approx([0.8, 0.72, 0.324])
    assert MergeConfig(three, 0.8, dampen=False).strengths() == pytest.approx([0.8, 0.8, 0.4])
    assert MergeConfig(three[:1], 0.8).strengths() == pytest.approx([0.8])


def test_cli_merge_flags_and_one_line_errors(flux_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``comfyquant convert --merge-lora A:S --merge-lora B --merge-lora-scale --no-dampen`` equals the API call;
    the convert_to_quant spellings (``--merge-loras``, ``--merge-lora-dampen=False``) reach the same result."""
    from comfyquant.cli import convert_to_quant, main

    a = _save(tmp_path, "a.safetensors", LoraBuilder(seed=1).lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd)
    b = _save(tmp_path, "b.safetensors", LoraBuilder(seed=2).lora("lora_unet_double_blocks_0_img_attn_proj", H, H).sd)
    api = tmp_path / "api.safetensors"
    convert(flux_file, api, merge_loras=[f"{a}:0.5", str(b)], merge_lora_scale=0.8, merge_lora_dampen=False,
            progress=False)
    cli = tmp_path / "cli.safetensors"
    assert main.main(["convert", str(flux_file), "-o", str(cli), "--merge-lora", f"{a}:0.5", "--merge-lora",
                      str(b), "--merge-lora-scale", "0.8", "--no-dampen", "-q"]) == 0
    want = load_file(str(api))
    assert all(torch.equal(v, want[k]) for k, v in load_file(str(cli)).items())
    capsys.readouterr()
    assert main.main(["convert", str(flux_file), "-o", str(tmp_path / "x.safetensors"), "--merge-lora",
                      str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input not found" in err and not (tmp_path / "x.safetensors").exists()
    c2q = tmp_path / "c2q.safetensors"
    assert convert_to_quant.main(["-i", str(flux_file), "-o", str(c2q), "--int8", "--scaling-mode", "row",
                                  "--merge-loras", str(a), str(b), "--merge-lora-scale", "0.4",
                                  "--merge-lora-dampen=False"]) == 0, capsys.readouterr().err
    api2 = tmp_path / "api2.safetensors"
    convert(flux_file, api2, merge_loras=[str(a), str(b)], merge_lora_scale=0.4, merge_lora_dampen=False,
            progress=False)
    want = load_file(str(api2))
    assert all(torch.equal(v, want[k]) for k, v in load_file(str(c2q)).items())
    assert convert_to_quant.main(["-i", str(flux_file), "-o", str(c2q), "--merge-lora", str(a),
                                  "--merge-lora-dampen=maybe"]) == 2
    assert "expected True or False" in capsys.readouterr().err


def test_bundled_checkpoint_prefixes(tmp_path: Path) -> None:
    """A full SDXL checkpoint (``model.diffusion_model.``, ``conditioner.embedders.N.``): kohya unet and te keys land
    on the prefixed tensors; the difference is alpha/rank * up @ down."""
    base = base_weights("sdxl-checkpoint")
    path = _save(tmp_path, "ckpt.safetensors", base)
    b = LoraBuilder(seed=5).lora("lora_unet_input_blocks_4_1_proj_in", 128, 128, rank=4, alpha=2.0)
    b.lora("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", 256, 256, rank=4, alpha=None)
    lora = _save(tmp_path, "l.safetensors", b.sd)
    bound = LoRAMerge(MergeConfig((LoraSpec(lora, 0.5),))).bind(CheckpointReader(path).infos)
    unet = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    te = "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight"
    assert bound.names == {unet, te}
    for name, module, factor in ((unet, "lora_unet_input_blocks_4_1_proj_in", 0.5 * 2.0 / 4),
                                 (te, "lora_te1_text_model_encoder_layers_1_self_attn_out_proj", 0.5)):
        want = base[name] + factor * b.sd[f"{module}.lora_up.weight"] @ b.sd[f"{module}.lora_down.weight"]
        assert torch.allclose(bound(name, base[name].clone()), want, atol=1e-6)


def test_optimizers_see_the_merged_weights(flux_file: Path, tmp_path: Path) -> None:
    """GPTQ with bias correction reads weights through the converter's reader: the quantized layer is the merged
    weight rounded (its error a small fraction of the LoRA's change), not the base weight."""
    from comfyquant.formats import dequantize_weight
    from comfyquant.io.comfy_meta import decode_comfy_quant
    from comfyquant.optimize.config import OptimizerConfig

    sd = LoraBuilder(seed=4).lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, rank=8).sd
    lora = _save(tmp_path, "l.safetensors", sd)
    out = tmp_path / "o.safetensors"
    convert(flux_file, out, merge_loras=[str(lora)], optimizer=OptimizerConfig(method="gptq", bias_correction=True),
            calibration="synthetic", progress=False)
    q, base = load_file(str(out)), load_file(str(flux_file))
    layer = "double_blocks.0.img_attn.qkv"
    merged = LoRAMerge(MergeConfig((LoraSpec(lora),))).bind(CheckpointReader(flux_file).infos)(
        f"{layer}.weight", base[f"{layer}.weight"].float())
    stored = dequantize_weight({k[len(layer) + 1:]: v for k, v in q.items() if k.startswith(layer + ".")},
                               decode_comfy_quant(q[f"{layer}.comfy_quant"]))
    delta = (merged - base[f"{layer}.weight"].float()).norm()
    assert float((stored - merged).norm()) < 0.1 * float(delta)
