"""End-to-end conversion on real files: every format round-trips within its error bound vs float64."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from convert_helpers import flux_like, leftovers, sha256, write
from safetensors import safe_open
from safetensors.torch import load_file

import comfyquant
from comfyquant.convert.plan import PlanOptions, build_plan
from comfyquant.errors import NonFiniteWeightError, UserError
from comfyquant.formats import dequantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant, encode_comfy_quant
from comfyquant.io.reader import CheckpointReader
from comfyquant.progress import Progress
from comfyquant.quant import error_stats, hadamard
from comfyquant.quant.int8 import expand_block_scale

P = "model.diffusion_model."
QUANTIZED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear2")



@pytest.fixture
def src(tmp_path):
    sd = flux_like(torch.bfloat16, prefix=P)
    return write(tmp_path / "in.safetensors", sd, {"modelspec.title": "tiny"}), sd


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _check_bound(fmt: str, w: torch.Tensor, tensors: dict, conf: dict, block: int) -> None:
    """The per-element (or per-row) error bound of each format, against the float64 weight."""
    w64 = w.to(torch.float64)
    deq = dequantize_weight(tensors, conf, torch.float64)
    err = (deq - w64).abs()
    s = tensors.get("weight_scale")
    s64 = s.to(torch.float64) if s is not None else None
    if fmt in ("int8", "int8-tensor"):
        assert tensors["weight"].dtype == torch.int8
        assert s.shape == ((w.shape[0], 1) if fmt == "int8" else ())
        assert bool((err <= s64 * (0.5 + 1e-5)).all())
    elif fmt == "int8-rot":
        # the error is bounded by scale/2 per element in the rotated basis; H is orthogonal, so row norms match
        group = conf["convrot_groupsize"]
        rot_err = tensors["weight"].to(torch.float64) * s64 - hadamard.rotate_weight(w64, group)
        assert bool((rot_err.abs() <= s64 * (0.5 + 1e-5)).all())
        assert torch.allclose(err.norm(dim=1), rot_err.norm(dim=1), rtol=1e-6, atol=1e-12)
    elif fmt == "int8-block":
        assert s.shape == (-(-w.shape[0] // block), -(-w.shape[1] // block))
        full = expand_block_scale(s64, tuple(w.shape), block)
        assert bool((err <= full * (0.5 + 1e-5)).all())
    elif fmt in ("fp8", "fp8-e5m2"):
        mant, sub = (2.0**-4, 2.0**-10) if fmt == "fp8" else (2.0**-3, 2.0**-17)
        bound = torch.maximum(w64.abs() * mant, s64 * sub) * (1 + 1e-6)
        assert s.shape == () and bool((err <= bound).all())
    else:
        assert torch.equal(tensors["weight"], w.to(tensors["weight"].dtype))


@pytest.mark.parametrize("fmt", ["int8", "int8-tensor", "int8-rot", "int8-block", "fp8", "fp8-e5m2", "fp16", "bf16"])
def test_round_trip_every_format(tmp_path, src, fmt):
    path, sd = src
    out = tmp_path / "out.safetensors"
    report = comfyquant.convert(path, out, format=fmt, block_size=32, progress=False)
    got, meta = _load(out)
    assert meta["modelspec.title"] == "tiny" and meta["comfyquant.format"] == fmt
    assert report.model == "flux" and leftovers(tmp_path) == []
    for layer in QUANTIZED:
        w = sd[f"{P}{layer}.weight"]
        key = f"{P}{layer}"
        if fmt in ("fp16", "bf16"):
            assert f"{key}.comfy_quant" not in got and f"{key}.weight_scale" not in got
            _check_bound(fmt, w, {"weight": got[f"{key}.weight"]}, None, 32)
            continue
        conf = decode_comfy_quant(got[f"{key}.comfy_quant"])
        tensors = {"weight": got[f"{key}.weight"], "weight_scale": got[f"{key}.weight_scale"]}
        assert got[f"{key}.weight_scale"].dtype == torch.float32
        _check_bound(fmt, w, tensors, conf, 32)
    # everything the plan keeps is bit-identical (under a cast format: cast like the rest of the file; other
    # dtypes untouched), and no tensor went missing
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(fmt)
    for name in (f"{P}img_in.weight", f"{P}img_in.bias", f"{P}conv.weight", f"{P}steps", f"{P}tiny.weight",
                 f"{P}double_blocks.0.img_attn.qkv.bias", f"{P}final_layer.linear.weight"):
        want = sd[name].to(cast) if cast is not None and sd[name].is_floating_point() else sd[name]
        assert torch.equal(got[name], want) and got[name].dtype == want.dtype
    assert {k for k in got if not k.endswith((".weight_scale", ".comfy_quant"))} == set(sd)
    measured = {x.name: x for x in report.measured()}
    assert set(measured) >= {f"{P}{layer}.weight" for layer in QUANTIZED}
    if fmt not in ("fp16", "bf16"):
        assert report.bytes_after < report.bytes_before


@pytest.mark.parametrize(("fmt", "misfit"), [("int4-rot", "int8"), ("nvfp4", "fp8"), ("mxfp8", "fp8")])
def test_low_bit_formats_store_what_quantize_weight_gives_and_fall_back(tmp_path, src, fmt, misfit):
    from comfyquant.formats import get_format, quantize_weight

    path, sd = src
    out = tmp_path / "out.safetensors"
    report = comfyquant.convert(path, out, format=fmt, progress=False)
    got, meta = _load(out)
    assert meta["comfyquant.format"] == fmt
    spec = get_format(fmt)
    for layer in QUANTIZED:
        key = f"{P}{layer}"
        want = quantize_weight(sd[f"{key}.weight"], fmt)
        assert decode_comfy_quant(got[f"{key}.comfy_quant"]) == want.comfy_quant
        assert {k[len(key) + 1:] for k in got if k.startswith(key + ".") and k != f"{key}.comfy_quant"} \
            == set(want.tensors) | ({"bias"} if f"{key}.bias" in sd else set())
        for suffix, t in want.tensors.items():  # bit-identical to the API (the pipeline may chunk rows)
            assert got[f"{key}.{suffix}"].dtype == t.dtype
            a, b = got[f"{key}.{suffix}"].reshape(-1), t.reshape(-1)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (layer, suffix)
        entry = next(x for x in report.layers if x.name == f"{key}.weight")
        assert entry.format == fmt and entry.bytes_out < entry.bytes_in
    # txt_mlp.0 has K = 40: int4-rot falls back through int8-rot (no power-of-4 group) to int8; the block formats
    # (K % 16 / 32) to fp8 -- each reported with the reason
    entry = next(x for x in report.layers if x.name.endswith("txt_mlp.0.weight"))
    assert entry.format == misfit and "in_features 40 is not a multiple" in entry.reason, entry.reason
    assert decode_comfy_quant(got[f"{P}double_blocks.0.txt_mlp.0.comfy_quant"])["format"] == \
        get_format(misfit).comfy_format
    assert spec.fallback is not None


def test_int8_rot_metadata_and_fallback(tmp_path, src):
    path, _ = src
    out = tmp_path / "rot.safetensors"
    report = comfyquant.convert(path, out, format="int8-rot", progress=False)
    got, _ = _load(out)
    conf = decode_comfy_quant(got[f"{P}single_blocks.0.linear2.comfy_quant"])
    assert conf == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
    # 40 input features: no power-of-4 group divides it, so that layer is stored as plain per-row int8
    fallback = decode_comfy_quant(got[f"{P}double_blocks.0.txt_mlp.0.comfy_quant"])
    assert fallback == {"format": "int8_tensorwise"}
    entry = next(x for x in report.layers if x.name.endswith("txt_mlp.0.weight"))
    assert entry.format == "int8" and "not a multiple" in entry.reason


def test_plan_decisions_from_headers(src):
    path, _ = src
    r = CheckpointReader(path)
    plan = build_plan(r.infos, PlanOptions("int8-block", block_size=32), metadata=r.metadata)
    e = {x.name.removeprefix(P): x for x in plan.entries}
    assert plan.preset == "flux"
    assert e["double_blocks.0.img_attn.qkv.weight"].action == "quantize"
    assert [s.name.removeprefix(P) for s in e["double_blocks.0.img_attn.qkv.weight"].outputs] == [
        "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.weight_scale",
        "double_blocks.0.img_attn.qkv.comfy_quant"]
    assert e["double_blocks.0.img_attn.qkv.weight"].outputs[1].shape == (6, 2)
    conf = e["double_blocks.0.img_attn.qkv.weight"].comfy_quant
    assert conf == {"format": "int8_blockwise", "group_size": 32}
    assert e["double_blocks.0.img_attn.qkv.weight"].outputs[2].shape == (len(encode_comfy_quant(conf)),)
    for name in ("img_in.weight", "double_blocks.0.img_mod.lin.weight", "final_layer.linear.weight",
                 "tiny.weight", "conv.weight", "steps", "img_in.bias"):
        assert e[name].action == "keep" and e[name].reason and e[name].rule, name
    assert all(x.rule and x.reason for x in plan.entries)
    assert plan.bytes_out < plan.bytes_in
    with pytest.raises(UserError, match="unknown format"):
        build_plan(r.infos, PlanOptions("int4"))


def test_layer_config_overrides_preset(tmp_path, src):
    path, _ = src
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"rules": [
        {"pattern": r"img_attn\.qkv", "skip": True},
        {"pattern": r"linear1", "format": "fp8"},
        {"pattern": r"^img_in", "format": "int8-tensor"},
    ]}))
    out = tmp_path / "o.safetensors"
    report = comfyquant.convert(path, out, format="int8", layer_config=cfg, progress=False)
    by = {x.name.removeprefix(P): x for x in report.layers}
    assert by["double_blocks.0.img_attn.qkv.weight"].action == "keep"
    assert by["double_blocks.0.img_attn.qkv.weight"].rule.startswith("layer-config:")
    assert by["single_blocks.0.linear1.weight"].format == "fp8"
    assert by["img_in.weight"].format == "int8-tensor"  # an explicit rule wins over the preset's keep
    got, _ = _load(out)
    assert got[f"{P}single_blocks.0.linear1.weight"].dtype == torch.float8_e4m3fn
    assert f"{P}double_blocks.0.img_attn.qkv.comfy_quant" not in got


def test_layer_config_mixes_low_bit_formats_by_alias(tmp_path, src):
    path, _ = src
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"rules": [
        {"pattern": r"img_attn\.qkv", "format": "convrot_w4a4", "convrot_groupsize": 16},
        {"pattern": r"linear1", "format": "nvfp4"},
        {"pattern": r"linear2", "format": "mxfp8", "full_precision_matrix_mult": True},
    ]}))
    out = tmp_path / "o.safetensors"
    report = comfyquant.convert(path, out, format="int8", layer_config=cfg, progress=False)
    by = {x.name.removeprefix(P): x.format for x in report.layers}
    assert (by["double_blocks.0.img_attn.qkv.weight"], by["single_blocks.0.linear1.weight"],
            by["single_blocks.0.linear2.weight"], by["double_blocks.0.img_mlp.0.weight"]) == \
        ("int4-rot", "nvfp4", "mxfp8", "int8")
    got, _ = _load(out)
    assert decode_comfy_quant(got[f"{P}double_blocks.0.img_attn.qkv.comfy_quant"]) == \
        {"format": "convrot_w4a4", "convrot_groupsize": 16}
    assert decode_comfy_quant(got[f"{P}single_blocks.0.linear2.comfy_quant"]) == \
        {"format": "mxfp8", "full_precision_matrix_mult": True}
    assert got[f"{P}single_blocks.0.linear1.weight"].shape == (320, 32)  # two E2M1 per byte


def test_sharded_input_gives_one_file_equal_to_single_file(tmp_path, src):
    path, sd = src
    names = list(sd)
    a, b = dict((k, sd[k]) for k in names[:7]), dict((k, sd[k]) for k in names[7:])
    write(tmp_path / "s-1.safetensors", a, {"modelspec.title": "tiny"})
    write(tmp_path / "s-2.safetensors", b)
    idx = tmp_path / "s.safetensors.index.json"
    wm = {**dict.fromkeys(a, "s-1.safetensors"), **dict.fromkeys(b, "s-2.safetensors")}
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    comfyquant.convert(idx, tmp_path / "sharded.safetensors", progress=False)
    comfyquant.convert(path, tmp_path / "single.safetensors", progress=False)
    x, mx = _load(tmp_path / "sharded.safetensors")
    y, my = _load(tmp_path / "single.safetensors")
    assert set(x) == set(y) and mx == my
    assert all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) if x[k].dim() else
               torch.equal(x[k], y[k]) for k in x)


def test_nan_weight_names_layer_and_force_keeps_it(tmp_path, src, monkeypatch):
    _, sd = src
    bad = f"{P}double_blocks.0.img_mlp.2.weight"
    sd = dict(sd)
    sd[bad] = sd[bad].clone()
    sd[bad][3, 5] = float("nan")
    sd[f"{P}single_blocks.0.linear1.weight"] = sd[f"{P}single_blocks.0.linear1.weight"].clone()
    sd[f"{P}single_blocks.0.linear1.weight"][0, 0] = float("inf")
    path = write(tmp_path / "nan.safetensors", sd)
    digest = sha256(path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(NonFiniteWeightError, match=r"img_mlp\.2"):
        comfyquant.convert(path, out, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []
    reads: list[str] = []
    real_get = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: (reads.append(name), real_get(self, name))[1])
    report = comfyquant.convert(path, out, force=True, progress=False)
    monkeypatch.undo()
    # each layer commits on its own: the NaN layers fall back in place, nothing is read (or written) twice
    assert len(reads) == len(set(reads)) == len(sd)
    got, _ = _load(out)
    for name in (bad, f"{P}single_blocks.0.linear1.weight"):
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name].isnan(), sd[name].isnan())
        assert f"{name[:-7]}.comfy_quant" not in got
        entry = next(x for x in report.layers if x.name == name)
        assert entry.action == "keep" and entry.rule == "fallback" and "NaN/Inf" in entry.reason
        assert entry.bytes_out == sd[name].numel() * 2
    assert got[f"{P}double_blocks.0.img_mlp.0.weight"].dtype == torch.int8
    assert any("--force" in n for n in report.notes) and sha256(path) == digest


def test_fp16_overflow_is_reported(tmp_path):
    sd = {"a.weight": torch.full((32, 32), 1e6), "b.weight": torch.randn(32, 32)}
    path = write(tmp_path / "big.safetensors", sd)
    with pytest.raises(UserError, match=r"a\.weight.*float16 range"):
        comfyquant.convert(path, tmp_path / "o.safetensors", format="fp16", model="none", progress=False)
    report = comfyquant.convert(path, tmp_path / "o.safetensors", format="fp16", model="none", force=True,
                                progress=False)
    got = load_file(str(tmp_path / "o.safetensors"))
    assert got["a.weight"].dtype == torch.float32 and got["b.weight"].dtype == torch.float16
    assert report.layers[0].action == "keep"


def test_already_quantized_input_is_refused(tmp_path, src):
    path, _ = src
    q = tmp_path / "q.safetensors"
    comfyquant.convert(path, q, progress=False)
    with pytest.raises(UserError, match=r"already quantized.*comfyquant edit"):
        comfyquant.convert(q, tmp_path / "qq.safetensors", progress=False)
    legacy = write(tmp_path / "legacy.safetensors",
                   {"l.weight": torch.zeros(16, 16, dtype=torch.float8_e4m3fn), "l.scale_weight": torch.ones(()),
                    "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)})
    with pytest.raises(UserError, match="already quantized"):
        comfyquant.convert(legacy, tmp_path / "x.safetensors", progress=False)


def test_report_json_plot_and_progress(tmp_path, src, capfd):
    path, _ = src
    out, rep, png = tmp_path / "o.safetensors", tmp_path / "r.json", tmp_path / "p.png"
    report = comfyquant.convert(path, out, report=rep, plot=png, progress=False)
    assert capfd.readouterr().err == ""  # progress off: nothing on stderr
    data = json.loads(rep.read_text())
    assert data["format"] == "int8" and data["model"] == "flux"
    s = data["summary"]
    assert s["bytes_before"] == report.bytes_before == path.stat().st_size - (
        8 + int.from_bytes(path.read_bytes()[:8], "little"))
    assert s["bytes_after"] < s["bytes_before"] and s["counts"]["quantize"] == len(report.measured())
    assert len(s["worst_layers"]) == 5 and s["min_sqnr_db"] == min(x["sqnr_db"] for x in s["worst_layers"])
    assert 30 < s["min_sqnr_db"] <= s["mean_sqnr_db"] < 60
    layer = next(x for x in data["layers"] if x["name"] == f"{P}double_blocks.0.img_attn.qkv.weight")
    assert set(layer) >= {"name", "shape", "action", "format", "rule", "reason", "sqnr_db", "rel_mse",
                          "max_abs_err"}
    assert layer["shape"] == [192, 64] and layer["format"] == "int8"
    # the SQNR in the report is the one of the file written, recomputed here in float64
    got, _ = _load(out)
    w = load_file(str(path))[layer["name"]]
    key = layer["name"][:-7]
    deq = dequantize_weight({"weight": got[layer["name"]], "weight_scale": got[f"{key}.weight_scale"]},
                            decode_comfy_quant(got[f"{key}.comfy_quant"]), torch.float64)
    assert math.isclose(layer["sqnr_db"], error_stats(w, deq).sqnr_db, rel_tol=1e-6)
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    text = report.to_text()
    assert "SQNR: mean" in text and "worst" in text and layer["name"] in text
    comfyquant.convert(path, out, force=True, progress=True)
    assert capfd.readouterr().err == ""  # stderr is no terminal and the work ends within 2 s: no output
    comfyquant.convert(path, out, force=True, progress=Progress(mode="bar", delay=0))
    err = capfd.readouterr().err
    assert "convert: 100%" in err and f"{len(report.layers)}/{len(report.layers)} tensors" in err


@pytest.mark.parametrize("fmt", ["int8", "int8-block"])
def test_large_layer_stats_on_row_sample(tmp_path, fmt):
    g = torch.Generator().manual_seed(1)
    sd = {"big.weight": torch.randn(1100, 1024, generator=g), "small.weight": torch.randn(64, 64, generator=g)}
    path = write(tmp_path / "big.safetensors", sd)
    out = tmp_path / "o.safetensors"
    report = comfyquant.convert(path, out, format=fmt, model="none", low_memory=True, progress=False)
    big = report.layers[0]
    assert big.name == "big.weight" and big.stats_rows is not None and 0 < big.stats_rows < 1100
    assert report.layers[1].stats_rows is None and any("sample" in n for n in report.notes)
    got, _ = _load(out)
    deq = dequantize_weight({"weight": got["big.weight"], "weight_scale": got["big.weight_scale"]},
                            decode_comfy_quant(got["big.comfy_quant"]), torch.float64)
    full = error_stats(sd["big.weight"], deq)
    assert abs(full.sqnr_db - big.sqnr_db) < 0.3 and big.max_abs_err <= full.max_abs_err


def test_device_cuda_without_gpu_is_user_error(tmp_path, src):
    path, _ = src
    if torch.cuda.is_available():
        report = comfyquant.convert(path, tmp_path / "o.safetensors", device="cuda", progress=False)
        assert report.measured()
    else:
        with pytest.raises(UserError, match="CUDA"):
            comfyquant.convert(path, tmp_path / "o.safetensors", device="cuda", progress=False)
        assert not (tmp_path / "o.safetensors").exists()


def test_bundled_checkpoint_quantizes_only_the_presets_component(tmp_path):
    sd = flux_like(torch.bfloat16, prefix=P)
    vae = "first_stage_model.decoder.mid.attn_1.q.weight"
    te = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    sd[vae] = torch.randn(64, 64).to(torch.bfloat16)
    sd[te] = torch.randn(64, 64).to(torch.bfloat16)
    path = write(tmp_path / "full.safetensors", sd)
    report = comfyquant.convert(path, tmp_path / "o.safetensors", progress=False)
    by = {x.name: x for x in report.layers}
    assert report.model == "flux" and by[f"{P}single_blocks.0.linear1.weight"].action == "quantize"
    assert by[vae].action == "keep" and by[vae].rule == "prefix:vae" and "VAE" in by[vae].reason
    assert by[te].action == "keep" and by[te].rule == "prefix:text-encoder"
    got = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(got[vae], sd[vae]) and torch.equal(got[te], sd[te])
    # --model none quantizes every linear weight of the model, but never the VAE of a bundled checkpoint.
    report = comfyquant.convert(path, tmp_path / "n.safetensors", model="none", progress=False)
    by = {x.name: x for x in report.layers}
    assert by[vae].action == "keep" and by[vae].rule == "prefix:vae"
    assert by[f"{P}single_blocks.0.linear1.weight"].action == "quantize"


def test_plot_without_matplotlib_fails_before_converting(tmp_path, src, monkeypatch):
    path, _ = src
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "o.safetensors"
    with pytest.raises(UserError, match=r"pip install comfyquant\[plot\]"):
        comfyquant.convert(path, out, plot=tmp_path / "p.png", progress=False)
    assert not out.exists() and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(("fmt", "shape"), [("int8", (301, 96)), ("int8-rot", (257, 128)), ("int4-rot", (301, 128)),
                                            ("int8-block", (300, 100)), ("int8-block", (90, 4000)), ("int8-block", (20, 4000)),
                                            ("fp8", (200, 64))])
def test_row_chunked_quantization_is_bit_identical(fmt, shape):
    from comfyquant.convert.pipeline import quantize_rows
    from comfyquant.formats import get_format, quantize_weight

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    group = 64 if fmt == "int8-rot" else None
    ref = quantize_weight(x, fmt, block_size=32, convrot_groupsize=group)
    got = quantize_rows(x, get_format(fmt), ref.params, chunk_elements=5000)
    assert set(got) == set(ref.tensors)
    for k, t in ref.tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8) if t.dim() else
                                                       got[k], t.view(torch.uint8) if t.dim() else t)
