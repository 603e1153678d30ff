"""load_quantized on files written by the converter (and legacy forms): outputs vs the float model, key mapping,
refusals that name the layer, and the state-dict round trip back to the on-disk keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import comfyquant
from comfyquant.errors import UserError
from comfyquant.formats import quantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant, encode_comfy_quant, make_header_metadata
from comfyquant.runtime import QuantizedTensor, QuantLinear, load_quantized, load_quantized_report

pytestmark = pytest.mark.cpu_int8

H = 64


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)
        self.proj = nn.Linear(H, H)
        self.norm = nn.Module()
        self.norm.key_norm = nn.Module()
        self.norm.key_norm.scale = nn.Parameter(torch.ones(H // 2))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_attn = _Attn()
        self.img_mlp = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(approximate="tanh"), nn.Linear(4 * H, H))


class TinyFlux(nn.Module):
    """Flux key names (``img_in``, ``double_blocks.N.img_attn.qkv``, ``final_layer.linear``) at width 64."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.img_in = nn.Linear(H, H)
        self.double_blocks = nn.ModuleList([_Block() for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.img_in(x)
        for b in self.double_blocks:
            q, k, v = b.img_attn.qkv(h).chunk(3, dim=-1)
            h = h + b.img_attn.proj(torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v)
            h = h + b.img_mlp(h)
        return self.final_layer.linear(h)


class TinyDiffusers(nn.Module):
    """diffusers transformer names (``transformer_blocks.N.attn.to_q``, ``ff.net.0.proj``, ``proj_out``)."""

    def __init__(self) -> None:
        super().__init__()
        blk = nn.Module()
        blk.attn = nn.Module()
        blk.attn.to_q, blk.attn.to_k, blk.attn.to_v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        blk.attn.to_out = nn.ModuleList([nn.Linear(H, H), nn.Dropout(0.0)])
        blk.ff = nn.Module()
        blk.ff.net = nn.ModuleList([nn.Module(), nn.Dropout(0.0), nn.Linear(4 * H, H)])
        blk.ff.net[0].proj = nn.Linear(H, 4 * H)
        self.transformer_blocks = nn.ModuleList([blk])
        self.proj_out = nn.Linear(H, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.transformer_blocks[0]
        a = torch.softmax(b.attn.to_q(x) @ b.attn.to_k(x).transpose(-1, -2) / 8, -1) @ b.attn.to_v(x)
        x = x + b.attn.to_out[0](a)
        x = x + b.ff.net[2](torch.nn.functional.gelu(b.ff.net[0].proj(x)))
        return self.proj_out(x)


def _float_model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def _save_float(model: nn.Module, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 7, H, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# Relative output error of the whole tiny model vs float: int8 W8A8 measured ~0.5%, fp8 e4m3 ~2-3%; int4-rot
# (W4A8 reference) 4.6%, nvfp4 4.3% and mxfp8 1.2% (both dequantized on the CPU).
TOLERANCE = {"int8": 0.02, "int8-tensor": 0.02, "int8-rot": 0.02, "int8-block": 0.02, "fp8": 0.06,
             "int4-rot": 0.15, "nvfp4": 0.12, "mxfp8": 0.04}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rt_load")
    src = _save_float(_float_model(TinyFlux), d / "float.safetensors", "model.diffusion_model.")
    out = {}
    for fmt in TOLERANCE:
        out[fmt] = d / f"{fmt}.safetensors"
        comfyquant.convert(src, out[fmt], format=fmt, model="flux", block_size=32, progress=False)
    return out


@pytest.mark.parametrize("fmt", list(TOLERANCE))
def test_converter_files_load_and_match_the_float_model(flux_files: dict[str, Path], fmt: str) -> None:
    ref_model = _float_model(TinyFlux)
    with torch.no_grad():
        ref = ref_model(_x())
    model = TinyFlux()  # fresh random weights: everything must come from the file
    model, report = load_quantized_report(model, flux_files[fmt])
    assert report.prefix == "model.diffusion_model."
    qlayers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert qlayers and sorted(qlayers) == sorted(report.quantized)
    with safe_open(str(flux_files[fmt]), "pt") as f:
        on_disk = sorted(k[len("model.diffusion_model."):-len(".comfy_quant")] for k in f.keys()
                         if k.endswith(".comfy_quant"))
    assert sorted(qlayers) == on_disk
    with torch.no_grad():
        y = model(_x())
    assert _rel(y, ref) < TOLERANCE[fmt]
    assert _rel(y, ref) > 0


@pytest.mark.parametrize("fmt", ["int8-rot", "fp8", "int4-rot", "nvfp4", "mxfp8"])
def test_state_dict_round_trip_writes_the_file_back(flux_files: dict[str, Path], fmt: str, tmp_path: Path) -> None:
    model = load_quantized(TinyFlux(), flux_files[fmt])
    sd = model.state_dict()
    with safe_open(str(flux_files[fmt]), "pt") as f:
        file_sd = {k[len("model.diffusion_model."):]: f.get_tensor(k) for k in f.keys()}
    assert set(sd) == set(file_sd)
    for k, t in file_sd.items():
        assert sd[k].dtype == t.dtype and sd[k].shape == t.shape, k
        assert torch.equal(sd[k].view(torch.uint8), t.view(torch.uint8)) if t.element_size() == 1 else \
            torch.equal(sd[k], t), k
    # and the written state dict loads again (through QuantLinear._load_from_state_dict) to the same outputs
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "again.safetensors"))
    again = load_quantized(TinyFlux(), tmp_path / "again.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(_x()), model(_x()), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_scaled_files_load_dequantized_off_blackwell_with_one_log_line(
        flux_files: dict[str, Path], fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="comfyquant.runtime"):
        model = load_quantized(TinyFlux(), flux_files[fmt], compute_dtype=torch.bfloat16)
    notes = [r.getMessage() for r in caplog.records if "reference kernel" in r.getMessage()]
    assert len(notes) == 1 and f"8 {fmt} layer(s) on cpu, compute bfloat16" in notes[0], notes
    layer = model.double_blocks[0].img_attn.qkv
    assert isinstance(layer, QuantLinear) and layer.qweight.layout_name == fmt
    x = _x().bfloat16()
    with torch.no_grad():
        y = layer(x)
    # the weight dequantized exactly (float32, then bfloat16) and a bfloat16 matmul
    w = layer.qweight.dequantize().double()
    ref = x.double() @ w.T + layer.bias.double()
    assert y.dtype == torch.bfloat16
    assert bool(((y.double() - ref).abs() <= 2.0**-6 * (x.double().abs() @ w.abs().T + layer.bias.double().abs())).all())
    with caplog.at_level(logging.WARNING, logger="comfyquant.runtime"):
        caplog.clear()
        load_quantized(TinyFlux(), flux_files["int4-rot"])
    assert not [r for r in caplog.records if "reference kernel" in r.getMessage()]  # int4-rot has CPU kernels


def test_diffusers_names_without_prefix(tmp_path: Path) -> None:
    ref_model = _float_model(TinyDiffusers)
    src = _save_float(ref_model, tmp_path / "f.safetensors")
    comfyquant.convert(src, tmp_path / "q.safetensors", format="int8", model="generic", progress=False)
    model, report = load_quantized_report(TinyDiffusers(), tmp_path / "q.safetensors", compute_dtype=torch.bfloat16)
    assert report.prefix == ""
    assert isinstance(model.transformer_blocks[0].attn.to_q, QuantLinear)
    assert isinstance(model.transformer_blocks[0].ff.net[0].proj, QuantLinear)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        y = model(_x().to(torch.bfloat16))
        ref = ref_model(_x())
    assert y.dtype == torch.bfloat16
    assert _rel(y, ref) < 0.03


def _hand_file(path: Path, model: nn.Module, layers: dict[str, str], prefix: str = "",
               header: bool = False, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A file built from quantize_weight + encode_comfy_quant (or the legacy header form)."""
    tensors, confs = {}, {}
    for k, v in model.state_dict().items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and layer in layers:
            qw = quantize_weight(v, layers[layer])
            for suffix, t in qw.tensors.items():
                tensors[f"{prefix}{layer}.{suffix}"] = t
            confs[prefix + layer] = qw.comfy_quant
        else:
            tensors[prefix + k] = v.detach().contiguous()
    metadata = None
    if header:
        metadata = {"_quantization_metadata": make_header_metadata(confs)}
    else:
        tensors.update({f"{k}.comfy_quant": encode_comfy_quant(c) for k, c in confs.items()})
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_legacy_header_metadata(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    layers = {"double_blocks.0.img_attn.qkv": "int8", "double_blocks.1.img_mlp.0": "fp8"}
    path = _hand_file(tmp_path / "h.safetensors", ref_model, layers, prefix="diffusion_model.", header=True)
    model, report = load_quantized_report(TinyFlux(), path)
    assert report.legacy == "header" and report.quantized == {
        "double_blocks.0.img_attn.qkv": "int8_tensorwise", "double_blocks.1.img_mlp.0": "float8_e4m3fn"}
    with torch.no_grad():
        assert _rel(model(_x()), ref_model(_x())) < 0.03
    assert decode_comfy_quant(model.state_dict()["double_blocks.0.img_attn.qkv.comfy_quant"]) == {
        "format": "int8_tensorwise"}


def test_legacy_scaled_fp8(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    tensors = {}
    for k, v in ref_model.state_dict().items():
        if k.endswith(".weight") and v.dim() == 2 and "double_blocks" in k:
            qw = quantize_weight(v, "fp8")
            tensors[k] = qw.tensors["weight"]
            tensors[k[: -len("weight")] + "scale_weight"] = qw.tensors["weight_scale"]
            tensors[k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        else:
            tensors[k] = v.detach().contiguous()
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    model, report = load_quantized_report(TinyFlux(), tmp_path / "s.safetensors")
    assert report.legacy == "scaled_fp8" and len(report.quantized) == 8
    assert all(f == "float8_e4m3fn" for f in report.quantized.values())
    assert "double_blocks.0.img_attn.qkv.input_scale" not in model.state_dict()  # scale_input 1.0 == none
    with torch.no_grad():
        assert _rel(model(_x()), ref_model(_x())) < 0.06


def test_bad_scale_shape_is_refused_naming_the_layer(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    layer = "double_blocks.0.img_attn.qkv"
    path = _hand_file(tmp_path / "b.safetensors", ref_model, {layer: "int8"}, prefix="model.diffusion_model.")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"model.diffusion_model.{layer}.weight_scale"] = torch.ones(3, 1)
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"layer double_blocks\.0\.img_attn\.qkv: weight_scale shape \[3, 1\] "
                                        r"does not match weight \[192, 64\]"):
        load_quantized(TinyFlux(), path)


def test_block_scale_shape_and_format_errors(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    layer = "double_blocks.1.img_attn.proj"
    path = _hand_file(tmp_path / "b.safetensors", ref_model, {layer: "int8-block"})
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"{layer}.comfy_quant"] = encode_comfy_quant({"format": "int8_blockwise", "group_size": 32})
    save_file(tensors, str(path))  # scale grid is [1,1] for block 128 but the conf says 32
    with pytest.raises(UserError, match=rf"layer {layer}: weight_scale shape \[1, 1\] does not match weight "
                                        r"\[64, 64\] \(want \[2, 2\] for group_size 32\)"):
        load_quantized(TinyFlux(), path)
    tensors[f"{layer}.comfy_quant"] = encode_comfy_quant({"format": "nvfp9"})
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=rf"layer {layer}: unsupported quantization format 'nvfp9'"):
        load_quantized(TinyFlux(), path)


def test_missing_and_unexpected_layers_are_user_errors(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    path = _hand_file(tmp_path / "m.safetensors", ref_model, {"img_in": "int8"})
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("double_blocks.1.")}
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"tensors are missing from the file .*double_blocks\.1\.img_attn\.norm"):
        load_quantized(TinyFlux(), path)
    partial, rep = load_quantized_report(TinyFlux(), path, strict=False)  # explicit opt-out: loads what is there
    assert isinstance(partial.img_in, QuantLinear)
    assert rep.missing and all(k.startswith("double_blocks.1.") for k in rep.missing) and not rep.unexpected
    deeper = TinyFlux(depth=1)
    tensors["double_blocks.5.img_attn.proj.weight"] = torch.zeros(H, H)
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"no place in the model .*double_blocks\.5\.img_attn\.proj\.weight"):
        load_quantized(deeper, path)


def test_quantized_layer_on_a_non_linear_module_and_unrelated_file(tmp_path: Path) -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.img_in = nn.Conv1d(H, H, 1)

    w = torch.randn(H, H)
    qw = quantize_weight(w, "int8")
    save_file({"img_in.weight": qw.tensors["weight"], "img_in.weight_scale": qw.tensors["weight_scale"],
               "img_in.comfy_quant": encode_comfy_quant(qw.comfy_quant), "img_in.bias": torch.zeros(H)},
              str(tmp_path / "c.safetensors"))
    with pytest.raises(UserError, match="layer img_in is stored as int8_tensorwise but the model's module there "
                                        "is Conv1d"):
        load_quantized(Conv(), tmp_path / "c.safetensors")
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(UserError, match="no tensor matches the model's parameter names"):
        load_quantized(TinyFlux(), tmp_path / "u.safetensors")
    ref_model = _float_model(TinyFlux)
    path = _hand_file(tmp_path / "i.safetensors", ref_model, {"img_in": "int8"})
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("img_in.")}
    tensors["img_in.weight"] = torch.zeros(H, H, dtype=torch.int8)  # int8 bytes without comfy_quant / scale
    tensors["img_in.bias"] = torch.zeros(H)
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"tensor img_in\.weight is stored as torch\.int8 with no quantization"):
        load_quantized(TinyFlux(), path)


def test_backend_override_and_other_components(tmp_path: Path) -> None:
    ref_model = _float_model(TinyFlux)
    path = _hand_file(tmp_path / "o.safetensors", ref_model, {"img_in": "int8"}, prefix="model.diffusion_model.",
                      extra={"first_stage_model.decoder.conv.weight": torch.zeros(4, 4, 3, 3)})
    model, report = load_quantized_report(TinyFlux(), path, backend="dequant")
    assert report.other_components == ["first_stage_model.decoder.conv.weight"]
    assert model.img_in.backend == "dequant" and "backend=dequant" in repr(model.img_in)
    x = _x()
    w = model.img_in.qweight.dequantize()
    torch.testing.assert_close(model.img_in(x), torch.nn.functional.linear(x, w, model.img_in.bias))
    with pytest.raises(UserError, match="backend 'nope' is not one of torch, dequant"):
        load_quantized(TinyFlux(), path, backend="nope")
    conf = json.loads(bytes(model.state_dict()["img_in.comfy_quant"].tolist()))
    assert conf == {"format": "int8_tensorwise"}
    assert isinstance(model.img_in.weight, QuantizedTensor)


def test_model_built_on_the_meta_device(flux_files: dict[str, Path]) -> None:
    with torch.device("meta"):
        model = TinyFlux()
    model, report = load_quantized_report(model, flux_files["int8"], compute_dtype=torch.bfloat16)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.img_in.weight.dtype == torch.bfloat16 and model.img_in.weight.device.type == "cpu"
    assert report.quantized and all(isinstance(model.get_submodule(n), QuantLinear) for n in report.quantized)
    q = model.get_submodule(next(iter(report.quantized)))
    assert q.bias.dtype == torch.bfloat16 and q.qweight.dtype == torch.bfloat16
    ref = load_quantized(TinyFlux(), flux_files["int8"], compute_dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(_x().bfloat16()), ref(_x().bfloat16()), rtol=0, atol=0)


def test_fp8_per_row_scale_and_static_input_scale_from_other_tools(tmp_path: Path) -> None:
    """Per-row fp8 scales ([N,1]) and a static input_scale, as other writers store them."""
    ref_model = _float_model(TinyFlux)
    layer = "double_blocks.0.img_mlp.0"
    w = ref_model.get_submodule(layer).weight.detach()
    rows = [quantize_weight(r[None], "fp8") for r in w]  # each row on its own scale
    q = torch.cat([r.tensors["weight"] for r in rows])
    scale = torch.stack([r.tensors["weight_scale"] for r in rows]).reshape(-1, 1)
    tensors = {k: v.detach().contiguous() for k, v in ref_model.state_dict().items() if not k.startswith(layer)}
    tensors.update({f"{layer}.weight": q, f"{layer}.weight_scale": scale, f"{layer}.bias": torch.zeros(4 * H),
                    f"{layer}.input_scale": torch.tensor(0.02),
                    f"{layer}.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"})})
    save_file(tensors, str(tmp_path / "r.safetensors"))
    model = load_quantized(TinyFlux(), tmp_path / "r.safetensors")
    lin = model.get_submodule(layer)
    s_in = float(torch.tensor(0.02))  # the fp32 value stored
    assert tuple(lin.qweight.params.scale.shape) == (4 * H, 1) and float(lin.qweight.params.input_scale) == s_in
    x = torch.randn(5, H)
    xq = (x / s_in).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s_in
    ref = xq @ (q.double() * scale.double()).t()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert set(lin.state_dict()) == {"weight", "weight_scale", "input_scale", "comfy_quant", "bias"}
