"""The ``convert_to_quant`` compatibility script: its flags give byte-identical files to the equivalent
``comfyquant.convert`` call (FP8 without a format flag, as convert_to_quant 1.3.4); dry-run, edit and legacy
modes; one-line refusals with exit 2. The format flags of issue 7 are in test_compat_formats.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyquant
from comfyquant.cli.convert_to_quant import main
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.layer_config import LayerConfig
from comfyquant.io.comfy_meta import HEADER_KEY, decode_comfy_quant
from comfyquant.io.digest import file_sha256


def _flux():
    g = torch.Generator().manual_seed(5)

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)

    return {"img_in.weight": r(64, 64), "img_in.bias": r(64), "txt_in.weight": r(64, 48),
            "double_blocks.0.img_attn.qkv.weight": r(192, 64), "double_blocks.0.img_mod.lin.weight": r(384, 64),
            "double_blocks.0.img_mlp.0.weight": r(256, 64), "single_blocks.0.linear1.weight": r(320, 64),
            "single_blocks.0.linear2.weight": r(64, 320), "final_layer.linear.weight": r(64, 64),
            "distilled_guidance_layer.in_proj.weight": r(64, 64)}


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_flux(), str(path))
    return path




def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


BF16 = LayerOptions(keep_dtype="bf16")  # --output-dtype's default: floats left unquantized are stored as bf16


@pytest.mark.parametrize("flags,kwargs", [
    ([], {"format": "fp8"}),
    (["--int8"], {"format": "int8-tensor"}),
    (["--int8", "--scaling-mode", "tensor"], {"format": "int8-tensor"}),
    (["--int8", "--scaling_mode", "axis"], {"format": "int8"}),
    (["--int8", "--scaling-mode", "row"], {"format": "int8"}),
    (["--int8", "--scaling-mode", "block", "--block_size", "32"], {"format": "int8-block", "block_size": 32}),
    (["--int8", "--scaling-mode", "block"], {"format": "int8-block", "block_size": 128}),
    (["--convrot"], {"format": "int8-rot"}),
    (["--int8", "--convrot", "--scaling-mode", "row"], {"format": "int8-rot"}),
    (["--fp16"], {"format": "fp16", "layers": None}),
    (["--distillation_large", "--low-memory"], {"format": "fp8", "model": "chroma", "low_memory": True}),
    (["--flux2", "--int8"], {"format": "int8-tensor", "model": "flux2"}),
    (["--verbose", "MINIMAL", "--manual_seed", "7", "--simple", "--no-normalize-scales"], {"format": "fp8"}),
    (["--ltxv2"], {"format": "fp8", "model": "ltxv"}),
])
def test_flags_give_the_same_file_as_comfyquant_convert(tmp_path, model, capsys, flags, kwargs):
    a, b = tmp_path / "compat.safetensors", tmp_path / "api.safetensors"
    rc, out, err = _run(capsys, "-i", model, "-o", a, "--comfy_quant", *flags)
    assert rc == 0, err
    assert "SQNR" in out and f"wrote {a}" in out
    comfyquant.convert(model, b, progress=False, **{"layers": BF16, **kwargs})
    assert file_sha256(a) == file_sha256(b)
    with safe_open(str(a), "pt") as f:
        assert f.metadata()["comfyquant.format"] == kwargs["format"]


@pytest.mark.parametrize("flags,name", [
    ([], "model_simple_fp8_tensor.safetensors"),
    (["--int8"], "model_simple_int8_tensorwise.safetensors"),
    (["--int8", "--scaling-mode", "axis"], "model_simple_int8_rowwise.safetensors"),
    (["--int8", "--scaling-mode", "block", "--block_size", "64"], "model_simple_int8_bs64.safetensors"),
    (["--distillation_small", "--int8"], "model_simple_int8mixed_tensorwise.safetensors"),
    (["--fp16"], "model_fp16.safetensors"),
])
def test_default_output_names(tmp_path, model, capsys, flags, name):
    rc, _, err = _run(capsys, "-i", model, "--comfy_quant", *flags)
    assert rc == 0, err
    assert (tmp_path / name).is_file()
    if "--distillation_small" in flags:
        assert "note: --distillation_small: comfyquant's chroma preset" in err


def test_fp16_casts_every_floating_tensor(tmp_path, model, capsys):
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(capsys, "-i", model, "-o", out, "--fp16")
    assert rc == 0, err
    assert "comfy_quant" not in err  # a plain cast has no comfy_quant metadata to talk about
    src, got = load_file(str(model)), load_file(str(out))
    assert got.keys() == src.keys()
    for k, v in src.items():  # biases, kept embedders and modulation too, not only the quantizable layers
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.to(torch.float16)), k


def test_without_comfy_quant_flag_says_it_is_implied(tmp_path, model, capsys):
    rc, _, err = _run(capsys, "-i", model, "-o", tmp_path / "o.safetensors")
    assert rc == 0 and "--comfy_quant is implied" in err


@pytest.mark.parametrize("flags,message", [
    (["--merge-lora", "x.safetensors"], "input not found: x.safetensors"),  # implemented: the LoRA is read
    (["--extract-lora", "--lora-depth", "2"], "not supported by comfyquant: --lora-depth"),
    (["--merge-lora", "x", "--make-hybrid-mxfp8", "--merge-loras", "y", "--lora-ar-threshold", "1"],
     "not supported by comfyquant: --make-hybrid-mxfp8 (hybrid_mxfp8 is"),
    (["--merge-lora", "x", "--make-hybrid-mxfp8", "--lora-ar-threshold", "1"],
     "which stock ComfyUI does not load), --lora-ar-threshold (a convert_to_quant feature"),  # all in one message
    (["--optimizer", "gptq", "--simple"], "--simple (round to nearest) cannot be combined with --optimizer"),
    (["--quip-requant-scheme", "block"], "need --optimizer quip"),
    (["--make-hybrid-mxfp8"], "not supported by comfyquant: --make-hybrid-mxfp8 (hybrid_mxfp8 is"),
    (["--dynamic_convrot"], "not supported by comfyquant: --dynamic_convrot (comfyquant picks"),
    (["--gemma4"], "flag --gemma4 is not supported yet"),
    (["--visual"], "flag --visual is not supported yet"),
    (["--wan", "--qwen"], "select different presets"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--scaling-mode", "diagonal"], "invalid choice: 'diagonal'"),
    (["--block_size", "64"], "--block_size applies to --scaling-mode block (INT8) and --heur only"),
    (["--fp16", "--scaling-mode", "axis"], "--fp16 cannot be combined"),
    (["--remove-keys", "a"], "--remove-keys needs --edit-quant"),
    (["--fullmatch"], "--fullmatch is not supported"),
])
def test_refusals_are_one_line_exit_2(tmp_path, model, capsys, flags, message):
    rc, _, err = _run(capsys, "-i", model, "-o", tmp_path / "o.safetensors", "--comfy_quant", *flags)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("convert_to_quant: error: ") and message in err
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_input_exit_2(tmp_path, capsys):
    rc, _, err = _run(capsys, "-i", tmp_path / "missing.safetensors", "--comfy_quant")
    assert rc == 2 and "input not found" in err
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(b"\x80\x02}q\x00.")
    rc, _, err = _run(capsys, "-i", pkl, "-o", tmp_path / "o.safetensors")
    assert rc == 2 and "never unpickles" in err and err.count("\n") == 1


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "comfyquant.cli.convert_to_quant", "-i", str(tmp_path / "x"),
                        "--lora-depth", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == (
        "convert_to_quant: error: not supported by comfyquant: --lora-depth (a convert_to_quant feature with no "
        "comfyquant equivalent)")


def test_optimizer_flags_map_onto_comfyquant(tmp_path, model, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", model, "-o", out, "--comfy_quant", "--optimizer", "quip",
                           "--quip-requant-scheme", "tensor", "--smoothquant", "--streaming-mode=balanced",
                           "--bf16-compute", "on", "--no-memory-limits", "--lr", "0.5", "--lr_schedule", "plateau")
    assert rc == 0, err
    assert "calibration: SYNTHETIC" in stdout and "optimizer: " in stdout and "on synthetic inputs" in err
    assert "--streaming-mode accepted, no effect" in err and "--no-memory-limits accepted, no effect" in err
    rc, stdout, err = _run(capsys, "-i", model, "-o", tmp_path / "p.safetensors", "--optimizer", "adamw",
                           "--num_iter", "20", "--int8", "--scaling-mode", "axis")
    assert rc == 0, err
    assert "optimizer: " in stdout and "learned" in stdout
    assert (tmp_path / "p.safetensors").is_file()


def test_dry_run_analyze_writes_nothing(tmp_path, model, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, _ = _run(capsys, "-i", model, "--dry-run", "--flux2")
    assert rc == 0 and "float checkpoint, preset flux2, format fp8" in out
    assert "double_blocks.0.img_attn.qkv.weight" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dry_run_create_template(tmp_path, model, capsys):
    rc, out, _ = _run(capsys, "-i", model, "--dry-run", "create-template")
    tpl = tmp_path / "model_layer_config_template.json"
    assert rc == 0 and f"wrote {tpl}" in out
    cfg = LayerConfig.load(tpl)
    assert cfg.match("double_blocks.0.img_attn.qkv.weight").format == "fp8"
    # and the template drives a conversion that equals the plain one
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _run(capsys, "-i", model, "-o", a, "--comfy_quant")[0] == 0
    assert _run(capsys, "-i", model, "-o", b, "--comfy_quant", "--layer-config", tpl)[0] == 0
    assert file_sha256(a) == file_sha256(b)


def test_save_quant_metadata_on_conversion(tmp_path, model, capsys):
    a, b = tmp_path / "plain.safetensors", tmp_path / "header.safetensors"
    assert _run(capsys, "-i", model, "-o", a, "--comfy_quant")[0] == 0
    rc, _, err = _run(capsys, "-i", model, "-o", b, "--comfy_quant", "--save-quant-metadata")
    assert rc == 0, err
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(str(b), "pt") as f:
        layers = json.loads(f.metadata()[HEADER_KEY])["layers"]
    assert layers == {k[: -len(".comfy_quant")]: decode_comfy_quant(v) for k, v in tb.items()
                      if k.endswith(".comfy_quant")}
    assert sorted(p.name for p in tmp_path.iterdir() if ".stage-" in p.name) == []


def test_edit_quant(tmp_path, model, capsys):
    q = tmp_path / "q.safetensors"
    comfyquant.convert(model, q, progress=False)
    rc, _, err = _run(capsys, "-i", q, "--edit-quant", "--remove-keys", "img_in.bias",
                        "--save-quant-metadata")
    assert rc == 0, err
    edited = tmp_path / "q_edited.safetensors"
    got = load_file(str(edited))
    assert "img_in.bias" not in got and "double_blocks.0.img_attn.qkv.comfy_quant" in got
    with safe_open(str(edited), "pt") as f:
        assert "double_blocks.0.img_attn.qkv" in json.loads(f.metadata()[HEADER_KEY])["layers"]
    rc, _, err = _run(capsys, "-i", q, "--edit-quant")
    assert rc == 2 and "needs --remove-keys" in err


def test_convert_fp8_scaled(tmp_path, capsys):
    src = tmp_path / "old.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
               "a.weight": torch.zeros(16, 16, dtype=torch.float8_e4m3fn), "a.scale_weight": torch.tensor(0.5)},
              str(src))
    rc, _, err = _run(capsys, "-i", src, "--convert-fp8-scaled")
    assert rc == 0, err
    got = load_file(str(tmp_path / "old_fp8mixed.safetensors"))
    assert set(got) == {"a.weight", "a.weight_scale", "a.comfy_quant"}
    assert decode_comfy_quant(got["a.comfy_quant"]) == {"format": "float8_e4m3fn"}
