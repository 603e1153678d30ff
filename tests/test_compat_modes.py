"""convert_to_quant's file modes: --convert-fp8-scaled (--hp-filter, --full-precision-mm, --input_scale),
--convert-int8-scaled, --cleanup-fp8-scaled (--scaled-fp8-marker), --legacy_input_add and --edit-quant
(--add-keys, --quant-filter). Files are written, read back and, where stock ComfyUI loads them, loaded by its
own code (``convert_old_quants``, ``mixed_precision_ops``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from comfyui_reference import check_layer, layer_tensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyquant
from comfyquant.cli.convert_to_quant import main
from comfyquant.convert.choices import LayerOptions
from comfyquant.formats import dequantize_weight, quantize_weight
from comfyquant.io.comfy_meta import HEADER_KEY, decode_comfy_quant

E4 = torch.float8_e4m3fn


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _confs(sd):
    return {k[: -len(".comfy_quant")]: decode_comfy_quant(v) for k, v in sd.items() if k.endswith(".comfy_quant")}


def _fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 50).to(E4)


def _scaled_fp8(path, marker=0):
    sd = {"scaled_fp8": torch.empty(marker, dtype=E4),
          "blocks.0.attn.weight": _fp8((32, 32), 0), "blocks.0.attn.scale_weight": torch.tensor([0.0125]),
          "blocks.0.attn.scale_input": torch.tensor(0.5),
          "blocks.0.mlp.weight": _fp8((64, 32), 1), "blocks.0.mlp.scale_weight": torch.tensor(0.25),
          "head.weight": torch.randn(16, 32, dtype=torch.bfloat16), "head.scale_weight": torch.tensor(1.0),
          "gone.scale_input": torch.tensor(1.0), "norm.weight": torch.ones(32, dtype=torch.bfloat16)}
    save_file(sd, str(path), metadata={"modelspec.title": "legacy"})
    return sd


def test_convert_fp8_scaled_with_its_options(tmp_path, capsys):
    src = tmp_path / "old.safetensors"
    sd = _scaled_fp8(src)
    sd.pop("head.scale_weight"), sd.pop("gone.scale_input")  # the upgrade refuses a scale on a bf16 weight
    save_file(sd, str(src))
    rc, _, err = _run(capsys, "-i", src, "--convert-fp8-scaled", "--hp-filter", "attn|mlp")
    assert rc == 2 and "2 layer(s) that should be in high precision are quantized: blocks.0.attn, blocks.0.mlp" in err
    assert not (tmp_path / "old_fp8mixed.safetensors").exists()
    rc, _, err = _run(capsys, "-i", src, "--convert-fp8-scaled", "--hp-filter", "^head$", "--full-precision-mm",
                      "--input_scale")
    assert rc == 0, err
    got = load_file(str(tmp_path / "old_fp8mixed.safetensors"))
    assert _confs(got) == {layer: {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
                           for layer in ("blocks.0.attn", "blocks.0.mlp")}
    assert float(got["blocks.0.attn.input_scale"]) == 0.5 and float(got["blocks.0.mlp.input_scale"]) == 1.0
    assert torch.equal(got["blocks.0.attn.weight_scale"], sd["blocks.0.attn.scale_weight"])
    plain = tmp_path / "plain.safetensors"
    save_file({"a.weight": torch.randn(4, 4)}, str(plain))
    rc, _, err = _run(capsys, "-i", plain, "--convert-fp8-scaled")
    assert rc == 2 and "not a scaled_fp8 checkpoint" in err


def _int8_scaled(path):
    """convert_to_quant's legacy INT8 form: int8 weights with .scale_weight (per tensor, per row as [N], tiles)."""
    g = torch.Generator().manual_seed(3)
    w = {n: torch.randn(shape, generator=g) * 0.05 for n, shape in
         (("t", (64, 64)), ("r", (48, 64)), ("b", (60, 60)))}
    qt = quantize_weight(w["t"], "int8-tensor").tensors
    qr = quantize_weight(w["r"], "int8").tensors
    qb = quantize_weight(w["b"], "int8-block", block_size=32).tensors
    sd = {"t.weight": qt["weight"], "t.scale_weight": qt["weight_scale"].reshape(1),
          "r.weight": qr["weight"], "r.scale_weight": qr["weight_scale"].reshape(-1), "r.scale_input": torch.ones(1),
          "b.weight": qb["weight"], "b.scale_weight": qb["weight_scale"],
          "hp.weight": torch.randn(16, 16, dtype=torch.bfloat16), "hp.scale_weight": torch.tensor(1.0),
          "r.bias": torch.zeros(48)}
    save_file(sd, str(path))
    return sd, w


@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.parametrize("block,group", [(None, 30), (32, 32)])
def test_convert_int8_scaled(tmp_path, capsys, comfy: Any, torch_single_thread: None, block, group):
    src = tmp_path / "i8.safetensors"
    sd, _ = _int8_scaled(src)
    rc, _, err = _run(capsys, "-i", src, "--convert-int8-scaled", *(["--block_size", block] if block else []))
    assert rc == 0, err
    got = load_file(str(tmp_path / "i8_int8_comfy.safetensors"))
    assert _confs(got) == {"t": {"format": "int8_tensorwise"}, "r": {"format": "int8_tensorwise"},
                           "b": {"format": "int8_blockwise", "group_size": group}}
    assert got["t.weight_scale"].shape == () and got["r.weight_scale"].shape == (48, 1)
    assert "hp.scale_weight" not in got and "r.scale_input" not in got and "r.input_scale" not in got
    for layer in ("t", "r"):  # what ComfyUI 0.30 computes with them matches a float64 reference
        check_layer(comfy, layer_tensors(got, layer), torch.float32, f"int8-scaled/{layer}")
    if group == 32:  # the tiling the file was written with: the weights read back exactly
        deq = dequantize_weight(layer_tensors(got, "b"), _confs(got)["b"])
        ref = sd["b.weight"].float() * sd["b.scale_weight"].repeat_interleave(32, 0)[:60].repeat_interleave(32, 1)[:, :60]
        assert torch.equal(deq, ref)
    rc, _, err = _run(capsys, "-i", src, "--convert-int8-scaled", "--input_scale", "-o", tmp_path / "x.safetensors")
    assert rc == 2 and "int8 layers take no input_scale" in err


@pytest.mark.parametrize("marker,flags,want", [(2, [], 2), (2, ["--scaled-fp8-marker", "0"], 0), (0, [], 0)])
def test_cleanup_fp8_scaled(tmp_path, capsys, comfy: Any, marker, flags, want):
    src = tmp_path / "old.safetensors"
    sd = _scaled_fp8(src, marker)
    rc, out, err = _run(capsys, "-i", src, "--cleanup-fp8-scaled", "--input_scale", *flags)
    assert rc == 0, err
    dst = tmp_path / "old_cleaned.safetensors"
    got = load_file(str(dst))
    assert got["scaled_fp8"].numel() == want and got["scaled_fp8"].dtype == E4
    assert "head.scale_weight" not in got and "gone.scale_input" not in got  # scales of no fp8 weight
    assert got["blocks.0.attn.scale_weight"].shape == () and float(got["blocks.0.mlp.scale_input"]) == 1.0
    assert float(got["blocks.0.attn.scale_input"]) == 0.5 and torch.equal(got["head.weight"], sd["head.weight"])
    assert "removed 2 scale(s)" in out
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"modelspec.title": "legacy"}
    state, _ = comfy.utils.convert_old_quants(dict(got), "", metadata={})  # how ComfyUI 0.30 reads it
    confs = {k[: -len(".comfy_quant")]: json.loads(v.numpy().tobytes()) for k, v in state.items()
             if k.endswith(".comfy_quant")}
    fpmm = {"full_precision_matrix_mult": True} if want == 2 else {}
    assert confs == {layer: {"format": "float8_e4m3fn", **fpmm} for layer in ("blocks.0.attn", "blocks.0.mlp")}


def test_legacy_input_add(tmp_path, capsys):
    src = tmp_path / "old.safetensors"
    sd = _scaled_fp8(src, 2)
    rc, _, err = _run(capsys, "-i", src, "--legacy_input_add")
    assert rc == 0, err
    got = load_file(str(tmp_path / "old_with_input_scale.safetensors"))
    assert set(got) == set(sd) | {"blocks.0.mlp.scale_input"} and float(got["blocks.0.mlp.scale_input"]) == 1.0
    assert all(torch.equal(got[k].reshape(v.shape), v) for k, v in sd.items())  # the marker too; [1] -> scalar


def test_edit_quant_add_keys_with_filter_keeps_convrot(tmp_path, capsys):
    src, q = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({f"blocks.{i}.{n}.weight": torch.randn(64, 64, generator=g) for i in range(2) for n in ("attn", "mlp")},
              str(src))
    comfyquant.convert(src, q, format="int8-rot", model="none", progress=False, layers=LayerOptions())
    rc, _, err = _run(capsys, "-i", q, "--edit-quant", "--add-keys", "'full_precision_matrix_mult': true, "
                        "'note': 'x', \"scale\": 2.5", "--quant-filter", "mlp", "--save-quant-metadata")
    assert rc == 0, err
    edited = tmp_path / "q_edited.safetensors"
    got = load_file(str(edited))
    confs = _confs(got)
    rot = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
    for i in range(2):
        assert confs[f"blocks.{i}.attn"] == rot
        assert confs[f"blocks.{i}.mlp"] == {**rot, "full_precision_matrix_mult": True, "note": "x", "scale": 2.5}
    with safe_open(str(edited), "pt") as f:  # convert_to_quant's header drops convrot; ComfyUI reads the header
        assert json.loads(f.metadata()[HEADER_KEY])["layers"] == confs
    for key in ("'group_size': 64", "'convrot': false", "'format': 'float8_e4m3fn'"):
        rc, _, err = _run(capsys, "-i", q, "--edit-quant", "--add-keys", key, "-o", tmp_path / "bad.safetensors")
        assert rc == 2 and "decides how the stored weights decode" in err
    rc, _, err = _run(capsys, "-i", q, "--edit-quant", "--add-keys", "oops", "-o", tmp_path / "bad.safetensors")
    assert rc == 2 and "--add-keys: cannot read" in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_misplaced_mode_flags_are_named_at_once(tmp_path, capsys):
    rc, _, err = _run(capsys, "-i", tmp_path / "x.safetensors", "--add-keys", "'a': 1", "--quant-filter", "x",
                      "--scaled-fp8-marker", "2", "--full-precision-mm")
    assert rc == 2 and err.count("\n") == 1
    assert all(f in err for f in ("--add-keys needs --edit-quant", "--quant-filter needs --edit-quant",
                                  "--scaled-fp8-marker needs --cleanup-fp8-scaled",
                                  "--full-precision-mm needs --convert-fp8-scaled"))
    rc, _, err = _run(capsys, "-i", tmp_path / "x.safetensors", "--edit-quant", "--cleanup-fp8-scaled")
    assert rc == 2 and "are separate modes" in err


def test_modes_equal_comfyquant_edit(tmp_path, capsys):
    """Each mode writes the same bytes as the ``comfyquant edit`` flags it maps onto."""
    from comfyquant.cli.main import main as cq_main

    fp8, i8, q = tmp_path / "fp8.safetensors", tmp_path / "i8.safetensors", tmp_path / "q.safetensors"
    sd = _scaled_fp8(fp8, 2)
    sd.pop("head.scale_weight"), sd.pop("gone.scale_input")
    save_file(sd, str(tmp_path / "clean.safetensors"))
    _int8_scaled(i8)
    save_file({"a.weight": torch.randn(32, 32), "b.weight": torch.randn(32, 32)}, str(tmp_path / "f.safetensors"))
    comfyquant.convert(tmp_path / "f.safetensors", q, format="fp8", model="none", progress=False)
    pairs = [
        (["-i", fp8, "--cleanup-fp8-scaled", "--input_scale"], ["edit", fp8, "--tidy-scaled-fp8", "--add-input-scale"]),
        (["-i", i8, "--convert-int8-scaled", "--block_size", "32"], ["edit", i8, "--scaled-int8", "--int8-block-size", "32"]),
        (["-i", tmp_path / "clean.safetensors", "--convert-fp8-scaled", "--full-precision-mm", "--input_scale"],
         ["edit", tmp_path / "clean.safetensors", "--add-keys", "'full_precision_matrix_mult': true", "--add-input-scale"]),
        (["-i", q, "--edit-quant", "--add-keys", "'x': 1", "--quant-filter", "^a$"],
         ["edit", q, "--add-keys", "'x': 1", "--layers", "^a$"]),
    ]
    for i, (compat, edit) in enumerate(pairs):
        a, b = tmp_path / f"a{i}.safetensors", tmp_path / f"b{i}.safetensors"
        assert _run(capsys, *compat, "-o", a)[0] == 0
        assert cq_main([str(x) for x in edit] + ["-o", str(b)]) == 0
        assert a.read_bytes() == b.read_bytes(), compat
    assert _confs(load_file(str(tmp_path / "a3.safetensors"))) == {"a": {"format": "float8_e4m3fn", "x": 1},
                                                                   "b": {"format": "float8_e4m3fn"}}
