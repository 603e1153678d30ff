"""``inspect_checkpoint``: the plan of a float file; layers, legacy forms, problems and stock-ComfyUI
loadability of quantized files (made by the real converter or written by hand for the broken cases)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfyquant
from comfyquant.cli.main import main as comfyquant_main
from comfyquant.convert.inspect import BLOCKWISE_NOTE, inspect_checkpoint
from comfyquant.io.comfy_meta import HEADER_KEY, encode_comfy_quant

P = "model.diffusion_model."


def _flux(prefix=P):
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)

    sd = {"img_in.weight": r(64, 64), "img_in.bias": r(64), "double_blocks.0.img_attn.qkv.weight": r(192, 64),
          "double_blocks.0.img_attn.qkv.bias": r(192), "double_blocks.0.img_mod.lin.weight": r(384, 64),
          "double_blocks.0.img_mlp.0.weight": r(256, 64), "single_blocks.0.linear1.weight": r(320, 64),
          "single_blocks.0.linear2.weight": r(64, 320),
          "double_blocks.0.img_attn.norm.key_norm.scale": r(32), "final_layer.linear.weight": r(64, 64)}
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture
def flux_file(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file(_flux(), str(path))
    return path


def test_float_plan(flux_file):
    r = inspect_checkpoint(flux_file)
    assert r.kind == "float" and r.preset == "flux" and r.stock_comfy
    by = {e.name: e for e in r.plan.entries}
    qkv = by[P + "double_blocks.0.img_attn.qkv.weight"]
    assert (qkv.action, qkv.format, qkv.shape) == ("quantize", "int8", (192, 64))
    assert qkv.bytes_in == 192 * 64 * 2 and qkv.bytes_out == 192 * 64 + 192 * 4 + len(b'{"format":"int8_tensorwise"}')
    mod = by[P + "double_blocks.0.img_mod.lin.weight"]
    assert mod.action == "keep" and mod.rule.startswith("flux:") and "modulation" in mod.reason
    d = json.loads(json.dumps(r.to_dict()))
    assert d["kind"] == "float" and d["bytes_after"] < d["bytes_before"] and d["counts"]["quantize"] == 4
    text = r.to_text()
    assert "img_mod.lin.weight" in text and "modulation" in text and "total: quantize 4" in text
    assert "other tensors kept unchanged" in text  # biases and norms are summarised, not hidden


def test_float_plan_blockwise_says_stock_comfy_rejects_it(flux_file):
    r = inspect_checkpoint(flux_file, fmt="int8-block")
    assert not r.stock_comfy and BLOCKWISE_NOTE in r.notes and BLOCKWISE_NOTE in r.to_text()
    assert "stock ComfyUI 0.30 rejects int8_blockwise (its loader fails with KeyError" in BLOCKWISE_NOTE


@pytest.mark.parametrize("fmt,cq,scale,extra", [
    ("int8", "int8_tensorwise", [192, 1], {}),
    ("int8-tensor", "int8_tensorwise", [], {}),
    ("int8-rot", "int8_tensorwise", [192, 1], {"convrot": True, "convrot_groupsize": 64}),
    ("int8-block", "int8_blockwise", [6, 2], {"group_size": 32}),
    ("fp8", "float8_e4m3fn", [], {}),
    ("int4-rot", "convrot_w4a4", [192], {"convrot": True, "convrot_groupsize": 64}),
    ("nvfp4", "nvfp4", [256, 4], {}),  # swizzled: [roundup(N, 128), roundup(K/16, 4)]
    ("mxfp8", "mxfp8", [256, 4], {}),  # [roundup(N, 128), roundup(K/32, 4)]
])
def test_converted_files(tmp_path, flux_file, fmt, cq, scale, extra):
    out = tmp_path / "q.safetensors"
    comfyquant.convert(flux_file, out, format=fmt, block_size=32, progress=False)
    r = inspect_checkpoint(out)
    assert r.kind == "quantized" and r.problems == [] and r.legacy == []
    x = {layer.name: layer for layer in r.layers}[P + "double_blocks.0.img_attn.qkv"]
    assert (x.format, x.shape, x.scale_shape, x.metadata) == (cq, [192, 64], scale, "layer")
    assert x.convrot == extra.get("convrot", False) and x.convrot_groupsize == extra.get("convrot_groupsize")
    assert x.group_size == extra.get("group_size")
    blockwise = cq == "int8_blockwise"
    assert r.stock_comfy is (not blockwise) and x.stock_comfy is (not blockwise)
    assert (BLOCKWISE_NOTE in r.notes) is blockwise
    assert ("can load it: NO" in r.to_text()) is blockwise
    json.dumps(r.to_dict())


def _hand_made(tmp_path, tensors, metadata=None):
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return inspect_checkpoint(path)


def _i8(n=32, k=32):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8)


def test_input_scale_and_full_precision_flags(tmp_path):
    r = _hand_made(tmp_path, {
        "te.q.weight": torch.zeros(32, 32, dtype=torch.float8_e4m3fn), "te.q.weight_scale": torch.tensor(0.1),
        "te.q.input_scale": torch.tensor(0.2),
        "te.q.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn", "full_precision_matrix_mult": True}),
        "te.k.weight": _i8(), "te.k.weight_scale": torch.ones(32, 1),
        "te.k.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise",
                                                "params": {"full_precision_matrix_mult": True}}),
    })
    q, k = sorted(r.layers, key=lambda x: x.name, reverse=True)
    assert q.input_scale and q.full_precision_matrix_mult and q.storage_dtype == "float8_e4m3fn"
    assert not k.input_scale and k.full_precision_matrix_mult
    assert r.stock_comfy and r.problems == []


def test_inconsistencies_are_flagged(tmp_path):
    r = _hand_made(tmp_path, {
        "a.weight": _i8(), "a.weight_scale": torch.ones(33, 1),
        "a.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise"}),
        "b.weight": _i8(), "b.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise"}),
        "c.weight": _i8(), "c.weight_scale": torch.tensor(1.0),
        "c.comfy_quant": encode_comfy_quant({"format": "int4_magic"}),
        "d.weight": _i8(), "d.weight_scale": torch.ones(32, 1),
        "e.weight": torch.randn(32, 32), "e.weight_scale": torch.tensor(1.0),
        "e.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"}),
        "f.weight": _i8(32, 48), "f.weight_scale": torch.ones(32, 1),
        "f.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}),
    })
    text = "\n".join(r.problems)
    assert "a: weight_scale shape [33, 1] does not match weight [32, 32]" in text
    assert "b: comfy_quant without weight_scale" in text
    assert "c: unknown format 'int4_magic'" in text
    assert "d.weight: int8 weight without a comfy_quant config" in text
    assert "d.weight_scale: weight_scale without a comfy_quant config" in text
    assert "e: weight is float32, format float8_e4m3fn stores float8_e4m3fn" in text
    assert "f: int8-rot: in_features 48 is not a multiple of the convrot group 64" in text
    assert not r.stock_comfy and "can load it: NO" in r.to_text()


def test_legacy_header_and_scaled_fp8(tmp_path):
    layers = {"a": {"format": "int8_tensorwise"}}
    r = _hand_made(tmp_path, {"a.weight": _i8(), "a.weight_scale": torch.ones(32, 1), "n.weight": torch.ones(4)},
                   {HEADER_KEY: json.dumps({"format_version": "1.0", "layers": layers})})
    assert r.legacy == ["header"] and r.layers[0].metadata == "header" and r.stock_comfy
    assert any("legacy" in n and "comfyquant edit" in n for n in r.notes)
    r = _hand_made(tmp_path, {"scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn),
                              "a.weight": torch.zeros(32, 32, dtype=torch.float8_e4m3fn),
                              "a.scale_weight": torch.tensor(0.5), "a.scale_input": torch.tensor(0.25)})
    assert r.legacy == ["scaled_fp8"] and r.problems == [] and r.stock_comfy
    (x,) = r.layers
    assert (x.format, x.metadata, x.scale_shape, x.input_scale, x.full_precision_matrix_mult) == (
        "float8_e4m3fn", "scaled_fp8", [], True, True)


def test_comfyquant_inspect_cli(tmp_path, flux_file, capsys):
    out = tmp_path / "q.safetensors"
    comfyquant.convert(flux_file, out, format="int8-block", progress=False)
    assert comfyquant_main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "quantized" and d["stock_comfyui_0_30_loads"] is False
    assert d["formats"] == {"int8_blockwise": 4}
    assert comfyquant_main(["inspect", str(flux_file)]) == 0
    assert "preset flux" in capsys.readouterr().out
    assert set(load_file(str(flux_file))) == set(_flux())  # inspect never touches the file


def test_unreadable_metadata_is_reported_not_fatal(tmp_path):
    r = _hand_made(tmp_path, {"a.weight": _i8(), "a.weight_scale": torch.ones(32, 1),
                              "a.comfy_quant": torch.tensor(list(b"{oops"), dtype=torch.uint8)})
    assert any("'a.comfy_quant' does not hold a JSON object" in p for p in r.problems)
    assert any("a.weight: int8 weight without a comfy_quant config" in p for p in r.problems)
    assert not r.stock_comfy
    r = _hand_made(tmp_path, {"a.weight": _i8()},
                   {HEADER_KEY: json.dumps({"format_version": "1.0", "layers": {"a": "int8_tensorwise"}})})
    assert any("layer 'a' is a bare string" in p for p in r.problems) and not r.stock_comfy
    r = _hand_made(tmp_path, {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                              "a.weight": torch.randn(32, 32, dtype=torch.bfloat16),
                              "a.scale_weight": torch.tensor(1.0)})
    assert r.problems == ["a: weight is bfloat16, format float8_e4m3fn stores float8_e4m3fn"]
