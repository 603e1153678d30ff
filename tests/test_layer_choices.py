"""``LayerOptions``: command-line rules, exclusions and what excluded layers become, the dtype of everything
stored unquantized, format options for every layer and the alignment heuristic; planned from headers, and one
real conversion that casts 1-D and convolution tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfyquant
from comfyquant.cli.main import main as cq_main
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.layer_config import LayerConfig, parse_format_spec, parse_rule
from comfyquant.convert.plan import PlanOptions, build_plan
from comfyquant.errors import UserError
from comfyquant.io.reader import TensorInfo


def _infos(spec):
    return {n: TensorInfo(n, dt, shape, 0, None, 0) for n, (shape, dt) in spec.items()}  # type: ignore[arg-type]


F32 = torch.float32
INFOS = _infos({
    "img_in.weight": ((64, 64), F32), "img_in.bias": ((64,), F32),
    "double_blocks.0.img_attn.qkv.weight": ((192, 64), F32), "double_blocks.0.img_mlp.0.weight": ((256, 64), F32),
    "double_blocks.0.img_mod.lin.weight": ((96, 64), F32), "single_blocks.0.linear1.weight": ((320, 64), F32),
    "final_layer.linear.weight": ((64, 64), F32), "norm.weight": ((64,), torch.bfloat16),
})


def _plan(layers=None, layer_config=None, **kw):
    opts = PlanOptions(format=kw.pop("format", "int8"), model="flux2", layers=layers or LayerOptions(), **kw)
    return {e.name: e for e in build_plan(INFOS, opts, layer_config=layer_config).entries}


def test_priority_layer_config_then_rules_then_exclude_then_default():
    cfg = LayerConfig.from_obj({"rules": [{"pattern": "img_attn", "format": "fp8"}], "default": "int8-tensor"})
    layers = LayerOptions(rules=(parse_rule("img_attn|img_mlp=int8-block,block_size=32"),),
                          exclude=("img_mlp|img_mod|linear1",))
    plan = _plan(layers, cfg)
    assert plan["double_blocks.0.img_attn.qkv.weight"].format == "fp8"  # the file's rule first
    mlp = plan["double_blocks.0.img_mlp.0.weight"]
    assert (mlp.format, mlp.params["block_size"], mlp.rule) == ("int8-block", 32, "rule:img_attn|img_mlp")
    assert plan["double_blocks.0.img_mod.lin.weight"].action == "keep"  # --exclude beats the file's default
    assert plan["double_blocks.0.img_mod.lin.weight"].rule == "exclude:img_mlp|img_mod|linear1"
    assert plan["img_in.weight"].action == "keep"  # the preset's keep stands without --excluded-format


def test_rules_and_exclusions_match_with_or_without_the_prefix_and_weight_suffix():
    infos = _infos({"model.diffusion_model.img_mlp.weight": ((64, 64), F32),
                    "model.diffusion_model.single_blocks.0.linear1.weight": ((64, 64), F32)})
    opts = PlanOptions(format="int8", model="none", layers=LayerOptions(
        rules=(parse_rule("^img_mlp$=fp8"),), exclude=(r"linear1\.weight$",)))
    plan = {e.name: e for e in build_plan(infos, opts).entries}
    assert plan["model.diffusion_model.img_mlp.weight"].format == "fp8"
    assert plan["model.diffusion_model.single_blocks.0.linear1.weight"].action == "keep"


def test_excluded_format_covers_exclusions_and_the_presets_high_precision_layers():
    layers = LayerOptions(exclude=("linear1",), excluded=parse_format_spec("int8-block,block_size=16", "x"))
    plan = _plan(layers)
    for name in ("single_blocks.0.linear1.weight", "img_in.weight", "final_layer.linear.weight"):
        assert (plan[name].format, plan[name].params["block_size"]) == ("int8-block", 16), name
    assert plan["img_in.bias"].action == "keep" and plan["double_blocks.0.img_mlp.0.weight"].format == "int8"


def test_keep_dtype_format_options_and_align():
    layers = LayerOptions(keep_dtype="fp16", preserve_dtype=("^final_layer",), full_precision_matrix_mult=True,
                          input_scale=True, convrot_groupsize=16, align=64)
    plan = _plan(layers, format="fp8")
    assert plan["img_in.bias"].action == "cast" and plan["img_in.bias"].outputs[0].dtype == torch.float16
    assert plan["norm.weight"].outputs[0].dtype == torch.float16
    assert plan["final_layer.linear.weight"].action == "keep"  # preserved
    mod = plan["double_blocks.0.img_mod.lin.weight"]  # 96 rows: not a multiple of 64
    assert mod.action == "cast" and "(--align)" in mod.reason
    qkv = plan["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.comfy_quant == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert [s.name.rsplit(".", 1)[1] for s in qkv.outputs] == ["weight", "weight_scale", "input_scale", "comfy_quant"]
    rot = _plan(layers, format="int8-rot")["double_blocks.0.img_attn.qkv.weight"]
    assert rot.comfy_quant["convrot_groupsize"] == 16
    assert _plan(LayerOptions(rules=(parse_rule("img_mod=fp8,align=0"),), align=64),
                 format="fp8")["double_blocks.0.img_mod.lin.weight"].action == "quantize"  # a rule's align=0


@pytest.mark.parametrize("make,message", [
    (lambda: parse_rule("no-format-here"), "expected PATTERN=FORMAT"),
    (lambda: parse_rule("x=int8,block_size=64"), "block_size applies to int8-block"),
    (lambda: parse_rule("x=fp8,input_scale=yes"), "must be an integer, true or false"),
    (lambda: parse_rule("x(=fp8"), "invalid regex"),
    (lambda: _plan(LayerOptions(keep_dtype="int8")), "--keep-dtype takes a plain float dtype"),
    (lambda: _plan(LayerOptions(keep_dtype="bf16"), format="fp16"), "--keep-dtype bf16 contradicts it"),
    (lambda: _plan(LayerOptions(exclude=("a(",))), "--exclude: invalid regex"),
    (lambda: _plan(LayerOptions(convrot_groupsize=32)), "power of 4"),
    (lambda: _plan(LayerOptions(excluded=parse_format_spec("skip", "--excluded-format"))), "give a format"),
])
def test_bad_choices_are_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_keep_dtype_casts_every_kept_float_tensor(tmp_path):
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn.weight": torch.randn(64, 64, generator=g), "blocks.0.attn.bias": torch.randn(64, generator=g),
          "conv_in.weight": torch.randn(32, 4, 3, 3, generator=g), "pos": torch.randn(1, 16, 64, generator=g),
          "steps": torch.arange(4)}
    save_file(sd, str(src))
    rep = comfyquant.convert(src, out, format="int8", model="none", progress=False,
                             layers=LayerOptions(keep_dtype="bf16"))
    got = load_file(str(out))
    for name in ("blocks.0.attn.bias", "conv_in.weight", "pos"):
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], sd[name].to(torch.bfloat16)), name
    assert torch.equal(got["steps"], sd["steps"]) and got["blocks.0.attn.weight"].dtype == torch.int8
    assert {x.name: x.action for x in rep.layers}["conv_in.weight"] == "cast"
    same = tmp_path / "cli.safetensors"
    assert cq_main(["convert", str(src), "-o", str(same), "-q", "--model", "none", "--keep-dtype", "bf16"]) == 0
    assert same.read_bytes() == out.read_bytes()
