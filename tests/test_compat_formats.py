"""convert_to_quant's format flags: real conversions of a float32 Flux-layout file, read back, and the
mixed file loaded by ComfyUI 0.30's own Linear against float64 references; each compat command line equals
the ``comfyquant convert`` flags it maps onto."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from comfyui_reference import check_layer, layer_tensors
from compat_model import SHAPES, save_flux_like
from safetensors.torch import load_file

from comfyquant.cli.convert_to_quant import main
from comfyquant.cli.main import main as cq_main
from comfyquant.formats import dequantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.io.digest import file_sha256
from comfyquant.quant.metrics import error_stats

QUANTIZED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "double_blocks.0.img_mlp.0",
             "double_blocks.0.img_mlp.2", "single_blocks.0.linear1", "single_blocks.0.linear2")  # under --flux2
KEPT = ("img_in", "txt_in", "time_in.in_layer", "final_layer.linear")  # the flux2 preset's high-precision layers


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("compat_formats")
    path = d / "model.safetensors"
    return path, save_flux_like(path)


def _convert(tmp_path, src, *flags, name="out.safetensors"):
    out = tmp_path / name
    rc = main(["-i", str(src[0]), "-o", str(out), "--comfy_quant", "--flux2", *map(str, flags)])
    assert rc == 0
    return out, load_file(str(out))


def _conf(sd, layer):
    return decode_comfy_quant(sd[f"{layer}.comfy_quant"]) if f"{layer}.comfy_quant" in sd else None


def _sqnr(sd, src, layer):
    tensors = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".") and "." not in k[len(layer) + 1:]}
    conf = _conf(sd, layer)
    return error_stats(src[1][f"{layer}.weight"], dequantize_weight(tensors, conf)).sqnr_db




def test_default_is_fp8_and_kept_tensors_become_bf16(tmp_path, src):
    _, sd = _convert(tmp_path, src)
    for layer in QUANTIZED:
        assert _conf(sd, layer) == {"format": "float8_e4m3fn"} and sd[f"{layer}.weight"].dtype == torch.float8_e4m3fn
        assert sd[f"{layer}.weight_scale"].shape == () and _sqnr(sd, src, layer) > 25
    for name, t in sd.items():  # --output-dtype's default, bfloat16: every float tensor left unquantized
        if not name.endswith(("comfy_quant", "weight_scale")) and name.rsplit(".", 1)[0] not in QUANTIZED:
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, src[1][name].to(torch.bfloat16)), name


@pytest.mark.parametrize("flag,fmt,storage", [("--nvfp4", "nvfp4", torch.uint8),
                                               ("--mxfp8", "mxfp8", torch.float8_e4m3fn)])
def test_nvfp4_and_mxfp8(tmp_path, src, flag, fmt, storage):
    _, sd = _convert(tmp_path, src, flag, "--exclude-layers", "img_mod")
    for layer in QUANTIZED:
        if layer.endswith("img_mod.lin"):
            assert _conf(sd, layer) is None and sd[f"{layer}.weight"].dtype == torch.bfloat16
            continue
        assert _conf(sd, layer)["format"] == fmt and sd[f"{layer}.weight"].dtype == storage
        assert _sqnr(sd, src, layer) > (15 if fmt == "nvfp4" else 25)


def test_fallback_stores_the_excluded_layers_in_its_format(tmp_path, src):
    _, sd = _convert(tmp_path, src, "--int8", "--scaling-mode", "block", "--fallback", "int8",
                       "--fallback-block-size", "32", "--exclude-layers", r"img_mod\.lin")
    for layer in (*KEPT, "double_blocks.0.img_mod.lin"):
        assert _conf(sd, layer) == {"format": "int8_blockwise", "group_size": 32}, layer
        assert sd[f"{layer}.weight_scale"].shape == tuple(-(-d // 32) for d in SHAPES[layer])
    assert _conf(sd, "single_blocks.0.linear1") == {"format": "int8_blockwise", "group_size": 128}
    _, sd2 = _convert(tmp_path, src, "--mxfp8", "--fallback", "fp8", name="mx.safetensors")
    assert {_conf(sd2, layer)["format"] for layer in KEPT} == {"float8_e4m3fn"}
    assert _conf(sd2, "single_blocks.0.linear1")["format"] == "mxfp8"


def test_custom_layers_and_their_options(tmp_path, src):
    _, sd = _convert(tmp_path, src, "--custom-layers", r"img_mlp\.\d", "--custom-type", "int8",
                       "--custom-scaling-mode", "block2d", "--custom-block-size", "64", "--custom-fpmm",
                       "--custom-simple", "--exclude-layers", "img_mlp")  # custom layers win over exclusions
    for layer in ("double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"):
        assert _conf(sd, layer) == {"format": "int8_blockwise", "group_size": 64, "full_precision_matrix_mult": True}
    assert _conf(sd, "single_blocks.0.linear1") == {"format": "float8_e4m3fn"}
    _, sd = _convert(tmp_path, src, "--custom-layers", "linear", "--custom-type", "int8", "--custom-convrot",
                       "--custom-convrot-group-size", "16", "--custom-heur", "--int8", "--block_size", "128",
                       name="rot.safetensors")
    assert _conf(sd, "single_blocks.0.linear1") is None  # 320x64: not a multiple of 128 (--custom-heur)
    assert _conf(sd, "double_blocks.0.img_mod.lin") == {"format": "int8_tensorwise"}  # --heur is not global
    _, sd = _convert(tmp_path, src, "--custom-layers", "linear1", "--custom-type", "int8", "--custom-convrot",
                       "--custom-convrot-group-size", "16", name="rot2.safetensors")
    assert _conf(sd, "single_blocks.0.linear1") == {"format": "int8_tensorwise", "convrot": True,
                                                    "convrot_groupsize": 16}
    assert _sqnr(sd, src, "single_blocks.0.linear1") > 35


def test_format_options_output_dtype_and_heur(tmp_path, src):
    _, sd = _convert(tmp_path, src, "-fpmm", "--input_scale", "--output-dtype", "float16",
                       "--preserve-layers", r"^txt_in\.", "--heur")
    for layer in QUANTIZED:
        if layer.endswith("img_mod.lin"):  # 96x64: not a multiple of 64, FP8's --heur block
            assert _conf(sd, layer) is None and sd[f"{layer}.weight"].dtype == torch.float16
            continue
        assert _conf(sd, layer) == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
        assert sd[f"{layer}.input_scale"].shape == () and float(sd[f"{layer}.input_scale"]) == 1.0
    assert sd["txt_in.weight"].dtype == torch.float32 and sd["img_in.bias"].dtype == torch.float16
    _, rot = _convert(tmp_path, src, "--convrot", "--convrot-group-size", "16", name="rot.safetensors")
    assert {_conf(rot, layer)["convrot_groupsize"] for layer in QUANTIZED} == {16}


@pytest.mark.parametrize("mode", ["block2d", "block3d"])
def test_block2d_and_block3d_are_int8_block(tmp_path, src, mode):
    a, _ = _convert(tmp_path, src, "--int8", "--scaling_mode", mode, "--block_size", "32", name="a.safetensors")
    b, _ = _convert(tmp_path, src, "--int8", "--scaling_mode", "block", "--block_size", "32", name="b.safetensors")
    assert file_sha256(a) == file_sha256(b)
    assert _conf(load_file(str(a)), "single_blocks.0.linear1") == {"format": "int8_blockwise", "group_size": 32}


def test_the_same_file_as_comfyquant_convert_flags(tmp_path, src):
    a, _ = _convert(tmp_path, src, "--int8", "--scaling-mode", "row", "--custom-layers", "linear2",
                    "--custom-type", "fp8", "--exclude-layers", "img_mod", "--fallback", "fp8", "-fpmm",
                    "--output-dtype", "float16", "--preserve-layers", "final_layer", name="compat.safetensors")
    b = tmp_path / "cq.safetensors"
    assert cq_main(["convert", str(src[0]), "-o", str(b), "-q", "--model", "flux2", "--format", "int8",
                    "--rule", "linear2=fp8,align=0", "--exclude", "img_mod", "--excluded-format", "fp8",
                    "--full-precision-matrix-mult", "--keep-dtype", "fp16", "--preserve-dtype", "final_layer"]) == 0
    assert file_sha256(a) == file_sha256(b)


@pytest.mark.stock_comfy_int8_cpu
def test_mixed_file_loads_in_comfyui(tmp_path, src, comfy: Any, torch_single_thread: None):
    """One file with every conversion path of these flags, layer by layer through ComfyUI's own Linear."""
    _, sd = _convert(tmp_path, src, "--int8", "--scaling_mode", "row", "--convrot", "--convrot-group-size", "16",
                       "--custom-layers", "img_mlp", "--custom-type", "fp8", "--custom-fpmm", "--input_scale",
                       "--fallback", "nvfp4", "--output-dtype", "float16")
    formats = {}
    for layer in SHAPES:
        tensors = layer_tensors(sd, layer)
        formats[layer] = (_conf(sd, layer) or {}).get("format")
        for dtype in (torch.float32, torch.bfloat16):
            check_layer(comfy, tensors, dtype, f"compat/{layer}/{dtype}")
    assert formats["double_blocks.0.img_mlp.0"] == "float8_e4m3fn" and formats["img_in"] == "nvfp4"
    assert formats["single_blocks.0.linear1"] == "int8_tensorwise" and sd["img_in.bias"].dtype == torch.float16
    _, sd = _convert(tmp_path, src, "--mxfp8", "--fallback", "fp8", "--input_scale", name="mx.safetensors")
    for layer in SHAPES:
        check_layer(comfy, layer_tensors(sd, layer), torch.float32, f"compat-mxfp8/{layer}")
    assert _conf(sd, "single_blocks.0.linear1") == {"format": "mxfp8"} and _conf(sd, "img_in") == {"format": "float8_e4m3fn"}


@pytest.mark.parametrize("flags,message", [
    (["--scaling-mode", "row"], "FP8 with --scaling-mode row is refused"),
    (["--int8", "--nvfp4"], "--int8 and --nvfp4 select different formats"),
    (["--custom-layers", "x"], "--custom-layers and --custom-type go together"),
    (["--convrot-group-size", "64"], "--convrot-group-size needs --convrot"),
    (["--convrot", "--convrot-group-size", "512"], "must be a power of 4"),
    (["--int8", "--input_scale"], "--input_scale adds the static activation scale of FP8 layers"),
    (["--fallback-block-size", "32"], "need --fallback"),
    (["--nvfp4", "--scaling-mode", "block"], "--scaling-mode does not apply to --nvfp4"),
    (["--optimizer", "adamw", "--custom-layers", "x", "--custom-type", "int8", "--custom-simple"],
     "--custom-simple with --optimizer"),
])
def test_bad_format_flags_are_refused(tmp_path, src, capsys, flags, message):
    rc = main(["-i", str(src[0]), "-o", str(tmp_path / "o.safetensors"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_every_problem_is_named_at_once(tmp_path, src, capsys):
    rc = main(["-i", str(src[0]), "--make-hybrid-mxfp8", "--dynamic-convrot", "--verbose-pinned"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert all(f in err for f in ("--make-hybrid-mxfp8 (", "--dynamic-convrot (", "--verbose-pinned ("))
    rc = main(["-i", str(src[0]), "--scaling-mode", "block", "--custom-type", "int8", "--hp-filter", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "--hp-filter needs" in err
    rc = main(["-i", str(src[0]), "--scaling-mode", "block", "--custom-type", "int8", "--int8", "--mxfp8"])
    err = capsys.readouterr().err
    assert rc == 2 and "select different formats" in err and "go together" in err
    rc = main(["-i", str(src[0]), "--visual", "--gemma4", "--scaling-mode", "row"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and all(f in err for f in ("--visual", "--gemma4", "--scaling-mode row"))


@pytest.mark.parametrize("flags,name", [
    ([], "model_simple_fp8mixed_tensor.safetensors"),
    (["--int8", "--scaling-mode", "block", "--block_size", "64"], "model_simple_int8mixed_bs64.safetensors"),
    (["--nvfp4"], "model_simple_nvfp4mixed.safetensors"),
    (["--mxfp8", "--fallback", "fp8"], "model_mxfp8_mixed.safetensors"),
])
def test_default_output_names(tmp_path, src, flags, name):
    import shutil

    shutil.copy(src[0], tmp_path / "model.safetensors")
    assert main(["-i", str(tmp_path / "model.safetensors"), "--comfy_quant", "--flux2", *flags]) == 0
    assert (tmp_path / name).is_file()


def test_dry_run_shows_the_mapped_plan(tmp_path, src, capsys):
    rc = main(["-i", str(src[0]), "--dry-run", "--flux2", "--exclude-layers", "linear1", "--fallback", "int8"])
    out = capsys.readouterr().out
    assert rc == 0 and "exclude:linear1" in out and "int8-tensor" in out
    assert sorted(p.name for p in src[0].parent.iterdir()) == ["model.safetensors"]
