"""``--layer-config`` parsing, matching and validation, and the template round trip (template -> config ->
the same plan and the same output file as the preset alone)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfyquant
from comfyquant.convert.layer_config import LayerConfig
from comfyquant.convert.plan import PlanOptions, build_plan
from comfyquant.convert.template import template_rules, write_template
from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.io.reader import CheckpointReader


def _cfg(obj, **kw):
    return LayerConfig.from_obj(obj, **kw)


def _flux(prefix=""):
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)

    sd = {
        "img_in.weight": r(64, 64), "img_in.bias": r(64), "txt_in.weight": r(64, 48),
        "double_blocks.0.img_attn.qkv.weight": r(192, 64), "double_blocks.0.img_attn.proj.weight": r(64, 64),
        "double_blocks.0.img_attn.norm.key_norm.scale": r(32), "double_blocks.0.img_mod.lin.weight": r(384, 64),
        "double_blocks.0.img_mlp.0.weight": r(256, 64), "double_blocks.0.img_mlp.2.weight": r(64, 256),
        "double_blocks.1.img_attn.qkv.weight": r(192, 64), "single_blocks.0.linear1.weight": r(320, 64),
        "single_blocks.0.linear2.weight": r(64, 320), "final_layer.linear.weight": r(64, 64),
        "tiny.weight": r(8, 8),
    }
    return {prefix + k: v for k, v in sd.items()}


def _write(path, sd):
    save_file(sd, str(path))
    return path


# -- parsing and matching -----------------------------------------------------------------------------------
def test_native_rules_first_match_wins_and_strip_weight_and_prefix():
    cfg = _cfg({"rules": [
        {"pattern": r"^double_blocks\.0\.img_attn", "skip": True},
        {"pattern": r"img_attn", "format": "fp8"},
        {"pattern": r"img_mlp", "format": "int8-block", "block_size": 64},
    ]})
    assert cfg.match("double_blocks.0.img_attn.qkv.weight").skip
    r = cfg.match("model.diffusion_model.double_blocks.0.img_attn.qkv")
    assert r is not None and r.skip  # anchored pattern matches the prefix-stripped name
    r = cfg.match("double_blocks.1.img_attn.qkv.weight")
    assert (r.format, r.skip) == ("fp8", False)
    r = cfg.match("double_blocks.0.img_mlp.0")
    assert (r.format, dict(r.options)) == ("int8-block", {"block_size": 64})
    assert cfg.match("single_blocks.0.linear1") is None


def test_mapping_form_is_most_specific_first_like_convert_to_quant():
    cfg = _cfg({"attn": {"format": "float8_e4m3fn"}, r"double_blocks\.0\.img_attn": {"skip": True},
                "_default": {"format": "int8_tensorwise", "scaling_mode": "axis"}, "_comment": "ignored"})
    assert cfg.match("double_blocks.0.img_attn.qkv").skip
    assert cfg.match("double_blocks.1.img_attn.qkv").format == "fp8"
    assert cfg.match("single_blocks.0.linear1").format == "int8"  # the _default rule


@pytest.mark.parametrize("entry,fmt", [
    ({"format": "int8"}, "int8"),
    ({"format": "int8-rot"}, "int8-rot"),
    ({"format": "int8_tensorwise"}, "int8-tensor"),
    ({"format": "int8_tensorwise", "scaling_mode": "axis"}, "int8"),
    ({"format": "int8_tensorwise", "convrot": True}, "int8-rot"),
    ({"format": "int8", "scaling_mode": "block"}, "int8-block"),
    ({"format": "int8_blockwise", "group_size": 32}, "int8-block"),
    ({"format": "float8_e4m3fn"}, "fp8"),
    ({"format": "float8_e5m2"}, "fp8-e5m2"),
    ({"format": "bfloat16"}, "bf16"),
    ({"format": "fp16"}, "fp16"),
    ({"format": "skip"}, None),
])
def test_format_spellings(entry, fmt):
    rule = _cfg({"rules": [{"pattern": "x", **entry}]}).rules[0]
    assert rule.format == fmt
    assert rule.skip == (fmt is None)
    if "group_size" in entry:
        assert rule.options == {"block_size": 32}


@pytest.mark.parametrize("obj,match", [
    ({"rules": [{"pattern": "a(", "format": "int8"}]}, r"rule 1: invalid regex 'a\(' "),
    ({"rules": [{"pattern": "a"}, {"pattern": "b", "format": "int4"}]}, r"rule 1 \('a'\): missing 'format'"),
    ({"rules": [{"pattern": "b", "format": "int4"}]}, r"rule 1 \('b'\): unknown format 'int4'"),
    ({"rules": [{"pattern": "b", "format": "mxfp4"}]}, "unknown format 'mxfp4'"),
    ({"rules": [{"pattern": "b", "format": "int8", "block_size": 64}]}, "block_size applies to int8-block"),
    ({"rules": [{"pattern": "b", "format": "int8-rot", "convrot_groupsize": 32}]}, "power of 4"),
    ({"rules": [{"pattern": "b", "format": "int8-block", "block_size": 0}]}, "positive integer"),
    ({"rules": [{"pattern": "b", "format": "int8", "lr": 1}]}, "unknown option 'lr'"),
    ({"rules": [{"pattern": "b", "skip": "yes"}]}, "'skip' must be true or false"),
    ({"rules": [{"format": "int8"}]}, "'pattern' must be"),
    ({"rules": {"a": 1}}, "'rules' must be a list"),
    ({"rules": [], "formats": 1}, "unknown top-level key 'formats'"),
    ({"layer.a": {"format": "", "_shape": [4, 4]}}, r"\('layer.a'\): 'format' must be a non-empty string"),
    ({"_default": {"format": ""}}, "_default"),
    ("int8", "expected a JSON object or list"),
])
def test_validation_errors_name_the_rule(obj, match):
    with pytest.raises(UserError, match=match):
        _cfg(obj)


def test_load_file_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read layer config"):
        LayerConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json is not valid JSON"):
        LayerConfig.load(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"pattern": "mlp", "format": "fp8"}]), encoding="utf-8")
    assert LayerConfig.load(good).match("blocks.0.mlp.0").format == "fp8"


def test_fullmatch():
    cfg = _cfg({"fullmatch": True, "rules": [{"pattern": "img_attn", "format": "fp8"},
                                             {"pattern": r"double_blocks\.\d+\.img_mlp\.\d+", "skip": True}]})
    assert cfg.match("double_blocks.0.img_attn.qkv") is None
    assert cfg.match("double_blocks.0.img_mlp.0.weight").skip


# -- in a real conversion -----------------------------------------------------------------------------------
def test_conversion_follows_the_config(tmp_path):
    src = _write(tmp_path / "f.safetensors", _flux("model.diffusion_model."))
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"rules": [
        {"pattern": r"^double_blocks\.0\.img_attn\.qkv$", "skip": True},  # the preset would quantize it
        {"pattern": r"^img_in$", "format": "fp8"},  # the preset keeps it
        {"pattern": r"img_mlp\.0", "format": "int8-rot", "convrot_groupsize": 16},
        {"pattern": r"img_mlp", "format": "int8-rot"},
        {"pattern": r"linear1", "format": "int8-block", "block_size": 32, "full_precision_matrix_mult": True},
        {"pattern": r"linear2", "format": "int8_blockwise"},
    ], "default": "fp8"}), encoding="utf-8")
    out = tmp_path / "q.safetensors"
    comfyquant.convert(src, out, layer_config=cfg, progress=False)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        p = "model.diffusion_model."
        assert f"{p}double_blocks.0.img_attn.qkv.comfy_quant" not in keys
        assert f.get_tensor(f"{p}double_blocks.0.img_attn.qkv.weight").dtype == torch.bfloat16
        assert decode_comfy_quant(f.get_tensor(f"{p}img_in.comfy_quant")) == {"format": "float8_e4m3fn"}
        assert decode_comfy_quant(f.get_tensor(f"{p}double_blocks.0.img_mlp.2.comfy_quant")) == {
            "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        assert decode_comfy_quant(f.get_tensor(f"{p}double_blocks.0.img_mlp.0.comfy_quant")) == {
            "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}
        assert decode_comfy_quant(f.get_tensor(f"{p}single_blocks.0.linear1.comfy_quant")) == {
            "format": "int8_blockwise", "group_size": 32, "full_precision_matrix_mult": True}
        assert f.get_tensor(f"{p}single_blocks.0.linear1.weight_scale").shape == (10, 2)
        assert decode_comfy_quant(f.get_tensor(f"{p}single_blocks.0.linear2.comfy_quant")) == {
            "format": "int8_blockwise", "group_size": 128}
        # the default changes the format of layers the preset quantizes, never the preset's keeps
        assert decode_comfy_quant(f.get_tensor(f"{p}double_blocks.1.img_attn.qkv.comfy_quant")) == {
            "format": "float8_e4m3fn"}
        assert f"{p}double_blocks.0.img_mod.lin.comfy_quant" not in keys
        assert f"{p}tiny.comfy_quant" not in keys


# -- template round trip --------------------------------------------------------------------------------------
def _plan_view(plan):
    return [(e.name, e.action, e.format, [(s.name, s.dtype, s.shape) for s in e.outputs]) for e in plan.entries]


@pytest.mark.parametrize("prefix,fmt", [("", "int8"), ("model.diffusion_model.", "int8-rot"), ("", "fp16")])
def test_template_round_trip_reproduces_the_plan(tmp_path, prefix, fmt):
    src = _write(tmp_path / "f.safetensors", _flux(prefix))
    tpl = tmp_path / "layers.json"
    n = write_template(src, tpl, fmt=fmt)
    obj = json.loads(tpl.read_text(encoding="utf-8"))
    linear = [k for k, v in _flux(prefix).items() if k.endswith(".weight") and v.dim() == 2]
    assert n == len(obj["rules"]) == len(linear)  # every 2-D weight, including kept and too-small ones
    qkv = next(r for r in obj["rules"] if "img_attn\\.qkv" in r["pattern"])
    assert qkv["_shape"] == [192, 64] and qkv["format"] == fmt
    assert next(r for r in obj["rules"] if "img_mod" in r["pattern"])["skip"] is True
    reader = CheckpointReader(src)
    plain = build_plan(reader.infos, PlanOptions(format=fmt))
    via = build_plan(reader.infos, PlanOptions(format=fmt), layer_config=LayerConfig.load(tpl))
    assert _plan_view(via) == _plan_view(plain)
    assert all(e.rule.startswith("layer-config:") for e in via.entries if e.name in linear)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    comfyquant.convert(src, a, format=fmt, progress=False)
    comfyquant.convert(src, b, format=fmt, layer_config=tpl, progress=False)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_template_with_dropped_tensors_and_output_rules(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(32, 32, generator=g),
          "decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(32, 32, generator=g),
          "shared.weight": torch.randn(100, 32, generator=g)}
    src = _write(tmp_path / "t5.safetensors", sd)
    rules, top = template_rules(src, model="t5xxl")
    assert top["_model"] == "t5xxl" and top["_dropped_by_preset"] == 1
    assert not any("decoder" in r["pattern"] for r in rules)
    with pytest.raises(UserError, match="is the input"):
        write_template(src, src, model="t5xxl", force=True)
    tpl = tmp_path / "t.json"
    tpl.write_text("keep me", encoding="utf-8")
    with pytest.raises(UserError, match="exists"):
        write_template(src, tpl, model="t5xxl")
    assert tpl.read_text(encoding="utf-8") == "keep me"
    write_template(src, tpl, model="t5xxl", force=True)
    reader = CheckpointReader(src)
    plan = build_plan(reader.infos, PlanOptions(model="t5xxl"), layer_config=LayerConfig.load(tpl))
    assert [e.action for e in plan.entries if e.name.startswith("decoder")] == ["drop"]
