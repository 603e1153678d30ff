"""``edit_checkpoint``: legacy upgrades as ComfyUI's convert_old_quants reads them, metadata moves, key removal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyquant.cli.main import main as cli_main
from comfyquant.convert.edit import edit_checkpoint
from comfyquant.errors import UserError
from comfyquant.formats import quantize_weight
from comfyquant.io.comfy_meta import HEADER_KEY, decode_comfy_quant, encode_comfy_quant
from comfyquant.io.digest import file_sha256

E4 = torch.float8_e4m3fn


def _fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 50).to(E4)


def _same(a, b):
    """Bit-identical tensors (same dtype, shape and bytes)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))




def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _scaled_fp8_file(path, marker_elems=0, prefix=""):
    sd = {
        f"{prefix}scaled_fp8": torch.empty(marker_elems, dtype=E4),
        f"{prefix}blocks.0.attn.weight": _fp8((32, 32), 0),
        f"{prefix}blocks.0.attn.scale_weight": torch.tensor(0.0123),
        f"{prefix}blocks.0.attn.scale_input": torch.tensor(1.0),
        f"{prefix}blocks.0.attn.bias": torch.randn(32, dtype=torch.bfloat16),
        f"{prefix}blocks.0.mlp.weight": _fp8((64, 32), 1),
        f"{prefix}blocks.0.mlp.scale_weight": torch.tensor(0.5),
        f"{prefix}blocks.0.mlp.scale_input": torch.tensor(0.25),
        f"{prefix}norm.weight": torch.ones(32, dtype=torch.bfloat16),
    }
    save_file(sd, str(path), metadata={"modelspec.title": "legacy"})
    return sd


def _expected_convert_old_quants(sd, prefix, metadata):
    """ComfyUI 0.30 convert_old_quants as its source reads, written out by hand for these fixtures:
    marker dropped, scale_weight -> weight_scale + {"format": "float8_e4m3fn"} (plus
    full_precision_matrix_mult for a 2-element marker), scale_input -> input_scale unless exactly 1.0."""
    marker = sd[f"{prefix}scaled_fp8"]
    out, layers = {}, {}
    for k, v in sd.items():
        if k == f"{prefix}scaled_fp8":
            continue
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            conf = {"format": "float8_e4m3fn"}
            if marker.numel() == 2:
                conf["full_precision_matrix_mult"] = True
            layers[layer] = conf
            out[f"{layer}.weight_scale"] = v
        elif k.endswith(".scale_input"):
            if v.item() != 1.0:
                out[k[: -len(".scale_input")] + ".input_scale"] = v
        else:
            out[k] = v
    return out, layers


@pytest.mark.parametrize("marker_elems,prefix", [(0, ""), (2, ""), (0, "model.diffusion_model.")])
def test_scaled_fp8_upgrade_matches_comfyui_semantics(tmp_path, marker_elems, prefix):
    src, dst = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    sd = _scaled_fp8_file(src, marker_elems, prefix)
    before = file_sha256(src)
    res = edit_checkpoint(src, dst)
    assert file_sha256(src) == before
    exp_tensors, exp_layers = _expected_convert_old_quants(sd, prefix, {})
    got = load_file(str(dst))
    confs = {k[: -len(".comfy_quant")]: decode_comfy_quant(v) for k, v in got.items() if k.endswith(".comfy_quant")}
    assert confs == exp_layers
    assert set(got) - {f"{layer}.comfy_quant" for layer in confs} == set(exp_tensors)
    for k, v in exp_tensors.items():
        assert _same(got[k], v), k
    assert _meta(dst) == {"modelspec.title": "legacy"}
    assert res.metadata_in == "scaled_fp8" and res.metadata_out == "layer" and res.layers == 2


def test_scaled_fp8_two_markers_each_governs_its_prefix(tmp_path):
    src, dst = tmp_path / "ckpt.safetensors", tmp_path / "out.safetensors"
    sd = {
        "model.diffusion_model.scaled_fp8": torch.empty(0, dtype=E4),
        "model.diffusion_model.x.weight": _fp8((16, 16), 2),
        "model.diffusion_model.x.scale_weight": torch.tensor(2.0),
        "text_encoders.t5xxl.transformer.scaled_fp8": torch.empty(2, dtype=E4),
        "text_encoders.t5xxl.transformer.y.weight": _fp8((16, 16), 3),
        "text_encoders.t5xxl.transformer.y.scale_weight": torch.tensor(3.0),
        "vae.z.weight": torch.randn(4, 4),
    }
    save_file(sd, str(src))
    edit_checkpoint(src, dst)
    got = load_file(str(dst))
    assert decode_comfy_quant(got["model.diffusion_model.x.comfy_quant"]) == {"format": "float8_e4m3fn"}
    assert decode_comfy_quant(got["text_encoders.t5xxl.transformer.y.comfy_quant"]) == {
        "format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert not any(k.endswith("scaled_fp8") or k.endswith("scale_weight") for k in got)
    assert torch.equal(got["vae.z.weight"], sd["vae.z.weight"])


def test_scaled_fp8_scale_on_non_fp8_weight_is_user_error(tmp_path):
    src = tmp_path / "bad.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=E4), "a.weight": torch.randn(16, 16),
               "a.scale_weight": torch.tensor(1.0)}, str(src))
    with pytest.raises(UserError, match=r"a\.scale_weight.*not fp8"):
        edit_checkpoint(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _int8_file(path, header=False, extra_conf=None):
    """Two int8 layers (one per-row, one rotated), a bias and a norm; metadata per layer or in the header."""
    tensors, layers = {}, {}
    g = torch.Generator().manual_seed(7)
    for layer, fmt in (("blocks.0.qkv", "int8"), ("blocks.0.proj", "int8-rot")):
        qw = quantize_weight(torch.randn(32, 64, generator=g), fmt)
        tensors[f"{layer}.weight"] = qw.tensors["weight"]
        tensors[f"{layer}.weight_scale"] = qw.tensors["weight_scale"]
        layers[layer] = {**qw.comfy_quant, **(extra_conf or {})}
    tensors["blocks.0.qkv.bias"] = torch.randn(32, dtype=torch.bfloat16)
    tensors["final.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    metadata = {"note": "kept"}
    if header:
        metadata[HEADER_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
    else:
        tensors.update({f"{k}.comfy_quant": encode_comfy_quant(v) for k, v in layers.items()})
    save_file(tensors, str(path), metadata=metadata)
    return tensors, layers


def test_header_metadata_upgraded_to_layer(tmp_path):
    src, dst = tmp_path / "h.safetensors", tmp_path / "l.safetensors"
    tensors, layers = _int8_file(src, header=True)
    res = edit_checkpoint(src, dst)
    got = load_file(str(dst))
    for layer, conf in layers.items():  # convert_old_quants: L.comfy_quant = json of the header entry
        assert decode_comfy_quant(got[f"{layer}.comfy_quant"]) == conf
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k
    assert _meta(dst) == {"note": "kept"}
    assert res.metadata_in == "header"


def test_layer_header_round_trip_is_byte_identical(tmp_path):
    src, mid, back = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
    tensors, layers = _int8_file(src)
    edit_checkpoint(src, mid, to_header_metadata=True)
    mid_sd = load_file(str(mid))
    assert not any(k.endswith(".comfy_quant") for k in mid_sd)
    header = json.loads(_meta(mid)[HEADER_KEY])
    assert header == {"format_version": "1.0", "layers": layers}
    edit_checkpoint(mid, back, to_layer_metadata=True)
    got = load_file(str(back))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert _same(got[k], v), k
    assert _meta(back) == {"note": "kept"}


def test_keep_layer_metadata_writes_both(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors, layers = _int8_file(src)
    res = edit_checkpoint(src, dst, to_header_metadata=True, keep_layer_metadata=True)
    got = load_file(str(dst))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert json.loads(_meta(dst)[HEADER_KEY])["layers"] == layers
    assert res.metadata_out == "header+layer"


def test_remove_tensor_and_config_keys(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _int8_file(src, extra_conf={"full_precision_matrix_mult": True})
    res = edit_checkpoint(src, dst, remove_keys=["blocks.0.qkv.bias", "full_precision_matrix_mult"])
    got = load_file(str(dst))
    assert "blocks.0.qkv.bias" not in got
    assert decode_comfy_quant(got["blocks.0.qkv.comfy_quant"]) == {"format": "int8_tensorwise"}
    assert decode_comfy_quant(got["blocks.0.proj.comfy_quant"]) == {
        "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
    assert res.removed_tensors == ["blocks.0.qkv.bias"]
    assert res.removed_config_keys == {"full_precision_matrix_mult": 2}


def test_removing_a_required_scale_is_refused_unless_forced(tmp_path, capsys):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _int8_file(src)
    rc = cli_main(["edit", str(src), "-o", str(dst), "--remove-keys", "blocks.0.qkv.weight_scale"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "'blocks.0.qkv'" in err and "weight_scale" in err, err
    assert not dst.exists()
    for key in ("blocks.0.proj.weight", "blocks.0.proj.weight_scale"):  # a weight or scale of a quantized layer
        with pytest.raises(UserError, match=r"'blocks\.0\.proj' would have"):
            edit_checkpoint(src, dst, remove_keys=[key])
    res = edit_checkpoint(src, dst, remove_keys=["blocks.0.qkv.weight_scale"], force=True)
    assert "blocks.0.qkv.weight_scale" not in load_file(str(dst))
    assert any("'blocks.0.qkv'" in n and "no weight_scale" in n and "--force" in n for n in res.notes)
    dst2 = tmp_path / "c.safetensors"
    res = edit_checkpoint(src, dst2, remove_keys=["blocks.0.proj.comfy_quant"])
    assert "blocks.0.proj.comfy_quant" not in load_file(str(dst2))
    assert any("blocks.0.proj.comfy_quant" in n and "plain (unscaled)" in n for n in res.notes)


@pytest.mark.parametrize("kwargs,match", [
    ({"remove_keys": ["nope"]}, "neither a tensor"),
    ({"remove_keys": ["format"]}, "cannot remove 'format'"),
    ({"to_header_metadata": True, "to_layer_metadata": True}, "choose one"),
])
def test_bad_edit_requests(tmp_path, kwargs, match):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _int8_file(src)
    with pytest.raises(UserError, match=match):
        edit_checkpoint(src, dst, **kwargs)
    assert not dst.exists()


def test_output_rules(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _int8_file(src)
    before = file_sha256(src)
    with pytest.raises(UserError, match="is the input"):
        edit_checkpoint(src, src)
    dst.write_bytes(b"existing")
    with pytest.raises(UserError, match="exists"):
        edit_checkpoint(src, dst)
    assert dst.read_bytes() == b"existing"
    edit_checkpoint(src, dst, force=True, to_header_metadata=True)
    assert HEADER_KEY in _meta(dst)
    assert file_sha256(src) == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_corrupt_comfy_quant_is_user_error(tmp_path):
    src = tmp_path / "a.safetensors"
    save_file({"l.weight": torch.zeros(16, 16, dtype=torch.int8), "l.weight_scale": torch.tensor(1.0),
               "l.comfy_quant": torch.tensor(list(b"{not json"), dtype=torch.uint8)}, str(src))
    with pytest.raises(UserError, match=r"l\.comfy_quant"):
        edit_checkpoint(src, tmp_path / "b.safetensors")


def test_sharded_legacy_input_becomes_one_upgraded_file(tmp_path):
    a = {"scaled_fp8": torch.empty(0, dtype=E4), "x.weight": _fp8((16, 16), 4), "x.scale_weight": torch.tensor(2.0)}
    b = {"y.weight": _fp8((16, 16), 5), "y.scale_weight": torch.tensor(3.0), "y.scale_input": torch.tensor(0.5)}
    save_file(a, str(tmp_path / "m-1.safetensors"))
    save_file(b, str(tmp_path / "m-2.safetensors"))
    wm = {**{k: "m-1.safetensors" for k in a}, **{k: "m-2.safetensors" for k in b}}
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}), encoding="utf-8")
    out = tmp_path / "one.safetensors"
    edit_checkpoint(idx, out)
    got = load_file(str(out))
    assert set(got) == {"x.weight", "x.weight_scale", "x.comfy_quant", "y.weight", "y.weight_scale",
                        "y.input_scale", "y.comfy_quant"}
    assert _same(got["y.weight"], b["y.weight"]) and float(got["y.input_scale"]) == 0.5
    with pytest.raises(UserError, match="is the input"):
        edit_checkpoint(idx, tmp_path / "m-2.safetensors", force=True)
