"""Every format comfyquant writes loads in stock ComfyUI 0.30.0 through ComfyUI's own code, and matches numerically.

Checkpoints have the real key names and shapes (scaled down) of Flux, SDXL (a full checkpoint's
``model.diffusion_model.`` prefix), Wan and T5-XXL, with heavy-tailed synthetic weights. Each is converted with
every format; every converted layer is loaded by ``comfy.ops.mixed_precision_ops(...).Linear`` and its output
compared with float64 references (bounds stated in ``comfyui_reference``). Legacy paths (header metadata,
``scaled_fp8``) must load identically; ``int8-block`` must be refused by stock ComfyUI (and match the same bounds
in comfyquant's own runtime). Whole tiny Flux and Wan files also go through ComfyUI's model detection and run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_reference import (
    check_layer,
    expectations,
    layer_tensors,
    load_comfy_linear,
    run_layer,
    stock_int8_params,
)
from safetensors.torch import save_file

import comfyquant
from comfyquant.cli.main import main as cli_main
from comfyquant.convert.edit import edit_checkpoint
from comfyquant.formats import REGISTRY
from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.testing.synthetic import write_synthetic_checkpoint

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("torch_single_thread")]

# arch name in comfyquant.testing.architectures -> (preset, key prefix as in the real files)
ARCHS = {"flux": ("flux", ""), "sdxl": ("sdxl", "model.diffusion_model."), "wan": ("wan", ""),
         "t5xxl": ("t5xxl", "")}
STOCK_FORMATS = [f.name for f in REGISTRY.formats() if f.stock_comfy]
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


class Conversions:
    """Synthetic float checkpoints and their conversions, built once per test module in one folder."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._done: dict[tuple[str, str], tuple[Path, comfyquant.Report]] = {}

    def source(self, arch: str) -> Path:
        """The float (bf16) synthetic checkpoint of ``arch``."""
        path = self.workdir / f"{arch}.safetensors"
        if not path.exists():
            write_synthetic_checkpoint(path, arch, "tiny", prefix=ARCHS[arch][1], seed=7)
        return path

    def get(self, arch: str, fmt: str) -> tuple[Path, comfyquant.Report]:
        """``arch`` converted to ``fmt`` by the public API."""
        if (arch, fmt) not in self._done:
            out = self.workdir / f"{arch}-{fmt}.safetensors"
            report = comfyquant.convert(self.source(arch), out, format=fmt, model=ARCHS[arch][0], progress=False)
            self._done[arch, fmt] = (out, report)
        return self._done[arch, fmt]


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> Conversions:
    return Conversions(tmp_path_factory.mktemp("comfyui_compat"))


def comfy_load(comfy: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file with ComfyUI's own ``load_torch_file``."""
    sd, meta = comfy.utils.load_torch_file(str(path), return_metadata=True)
    return sd, meta or {}


def converted_layers(report: comfyquant.Report) -> dict[str, str]:
    """Layer name -> action for every weight the converter quantized or cast."""
    out = {}
    for entry in report.layers:
        if entry.action in ("quantize", "cast") and entry.name.endswith(".weight") and len(entry.shape) == 2:
            out[entry.name[: -len(".weight")]] = entry.action
    return out


@pytest.mark.parametrize("fmt", stock_int8_params(STOCK_FORMATS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_layer_loads_in_comfyui_and_matches(comfy: Any, conv: Conversions, arch: str, fmt: str) -> None:
    path, report = conv.get(arch, fmt)
    sd, _ = comfy_load(comfy, path)
    layers = converted_layers(report)
    spec = REGISTRY.get(fmt)
    expected_action = "quantize" if spec.is_quantized else "cast"
    assert layers and set(layers.values()) == {expected_action}, (arch, fmt, layers)
    with_meta = {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}
    assert with_meta == (set(layers) if spec.is_quantized else set()), "comfy_quant exactly on converted layers"

    detected = comfy.utils.detect_layer_quantization(sd, ARCHS[arch][1])
    assert detected == ({"mixed_ops": True} if spec.is_quantized else None)

    for layer in sorted(layers):
        tensors = layer_tensors(sd, layer)
        assert tensors["weight"].dtype == spec.storage_dtype
        if spec.is_quantized:
            assert json.loads(tensors["comfy_quant"].numpy().tobytes())["format"] == spec.comfy_format
        for dtype in COMPUTE_DTYPES:
            check_layer(comfy, tensors, dtype, f"{arch}/{fmt}/{layer}/{dtype}")


def test_int8_block_is_refused_by_stock_comfyui(comfy: Any, conv: Conversions) -> None:
    # Stock ComfyUI 0.30.0 has no int8_blockwise entry in QUANT_ALGOS: _load_quantized_module indexes the table
    # before its "Unsupported quantization format" branch, so the refusal surfaces as KeyError('int8_blockwise').
    path, report = conv.get("flux", "int8-block")
    sd, _ = comfy_load(comfy, path)
    assert comfy.utils.detect_layer_quantization(sd, "") == {"mixed_ops": True}
    assert "int8_blockwise" not in comfy.quant_ops.QUANT_ALGOS
    layers = converted_layers(report)
    assert layers
    for layer in layers:
        tensors = layer_tensors(sd, layer)
        assert json.loads(tensors["comfy_quant"].numpy().tobytes())["format"] == "int8_blockwise"
        with pytest.raises(KeyError, match="int8_blockwise"):
            load_comfy_linear(comfy, tensors, torch.bfloat16)


def _linear_tree(sd: dict[str, torch.Tensor], layers: list[str]) -> torch.nn.Module:
    """A module whose only parameters are plain ``nn.Linear`` layers at the given dotted names."""
    root = torch.nn.Module()
    for layer in layers:
        *path, leaf = layer.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out_f, in_f = sd[f"{layer}.weight"].shape
        parent.add_module(leaf, torch.nn.Linear(in_f, out_f, bias=f"{layer}.bias" in sd))
    return root


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.cpu_int8
def test_int8_block_matches_float64_reference_in_our_runtime(comfy: Any, conv: Conversions, arch: str) -> None:
    """The check stock ComfyUI cannot run for ``int8-block``, through comfyquant's own runtime instead."""
    from comfyquant.runtime.nn import QuantLinear

    path, report = conv.get(arch, "int8-block")
    sd, _ = comfy_load(comfy, path)
    layers = sorted(converted_layers(report))
    assert layers
    g = torch.Generator().manual_seed(3)
    for dtype in COMPUTE_DTYPES:
        model = comfyquant.load_quantized(_linear_tree(sd, layers), path, compute_dtype=dtype, strict=False)
        modules = dict(model.named_modules())
        for layer in layers:
            mod = modules[layer]
            assert isinstance(mod, QuantLinear) and mod.qweight.layout_name == "int8_blockwise", layer
            tensors = layer_tensors(sd, layer)
            x = (torch.randn(8, tensors["weight"].shape[1], generator=g) * 1.5).to(dtype)
            with torch.inference_mode():
                y = mod(x)
            assert y.dtype == dtype
            for e in expectations(tensors, x, dtype):
                e.check(y, f"{arch}/int8-block/{layer}/{dtype}")


def _outputs(comfy: Any, sd: dict[str, torch.Tensor], layers: list[str], dtype: torch.dtype) -> dict[str, Any]:
    return {layer: run_layer(comfy, layer_tensors(sd, layer), dtype)[2] for layer in layers}


@pytest.mark.parametrize("fmt", stock_int8_params(["int8", "int8-rot", "fp8"]))
@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_header_metadata_legacy_path_loads_identically(comfy: Any, conv: Conversions, arch: str, fmt: str) -> None:
    path, report = conv.get(arch, fmt)
    legacy = conv.workdir / f"{arch}-{fmt}-header.safetensors"
    if not legacy.exists():  # the user-facing command: comfyquant edit FILE -o OUT --to-header-metadata
        assert cli_main(["edit", str(path), "-o", str(legacy), "--to-header-metadata"]) == 0
    sd_layer, _ = comfy_load(comfy, path)
    sd_head, meta = comfy_load(comfy, legacy)
    assert "_quantization_metadata" in meta and not any(k.endswith(".comfy_quant") for k in sd_head)
    sd_conv, _ = comfy.utils.convert_old_quants(dict(sd_head), ARCHS[arch][1], metadata=meta)
    assert sorted(sd_conv) == sorted(sd_layer)
    for k, v in sd_layer.items():
        if k.endswith(".comfy_quant"):
            assert json.loads(sd_conv[k].numpy().tobytes()) == json.loads(v.numpy().tobytes()), k
        else:
            assert sd_conv[k].dtype == v.dtype and torch.equal(sd_conv[k], v), k
    # Same tensors and configs, so the outputs must be bit-identical (bfloat16: ComfyUI's usual compute dtype).
    layers = sorted(converted_layers(report))
    ref, got = _outputs(comfy, sd_layer, layers, torch.bfloat16), _outputs(comfy, sd_conv, layers, torch.bfloat16)
    for layer in layers:
        assert torch.equal(ref[layer], got[layer]), layer


@pytest.mark.parametrize("marker_elements", [0, 2])
def test_scaled_fp8_upgrade_loads_identically(comfy: Any, conv: Conversions, marker_elements: int) -> None:
    """An old ``scaled_fp8`` file: ComfyUI's own upgrade and ``comfyquant edit``'s give the same layers."""
    float_sd, _ = comfy_load(comfy, conv.source("flux"))
    legacy: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(marker_elements, dtype=torch.float8_e4m3fn)}
    scaled = []
    for name, t in float_sd.items():
        if name.endswith(".weight") and t.dim() == 2 and "_mod" not in name and "_in." not in name:
            layer = name[: -len(".weight")]
            q, s = quantize_fp8(t)
            legacy[name], legacy[f"{layer}.scale_weight"] = q, s
            # one layer with a real static input scale, the others with the 1.0 ComfyUI drops
            legacy[f"{layer}.scale_input"] = torch.tensor(0.5 if not scaled else 1.0)
            scaled.append(layer)
        else:
            legacy[name] = t
    assert scaled
    legacy_path = conv.workdir / f"flux-scaled-fp8-{marker_elements}.safetensors"
    save_file(legacy, str(legacy_path))
    upgraded = conv.workdir / f"flux-scaled-fp8-{marker_elements}-upgraded.safetensors"
    edit_checkpoint(legacy_path, upgraded, force=True)

    sd_old, meta = comfy_load(comfy, legacy_path)
    sd_comfy, _ = comfy.utils.convert_old_quants(sd_old, "", metadata=meta)
    sd_ours, _ = comfy_load(comfy, upgraded)
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in sd_ours)
    assert sorted(sd_ours) == sorted(sd_comfy)
    for k, v in sd_comfy.items():
        if k.endswith(".comfy_quant"):
            assert json.loads(sd_ours[k].numpy().tobytes()) == json.loads(v.numpy().tobytes()), k
        else:
            assert sd_ours[k].dtype == v.dtype and torch.equal(sd_ours[k].reshape(v.shape), v), k
    for dtype in COMPUTE_DTYPES:
        ref, got = _outputs(comfy, sd_comfy, scaled, dtype), _outputs(comfy, sd_ours, scaled, dtype)
        for layer in scaled:
            assert torch.equal(ref[layer], got[layer]), layer


# Relative MSE of the whole tiny model's prediction (float32 compute) against the float model, both run by ComfyUI.
# Empirical sanity ceilings, ~4x above what these outlier-heavy weights give (Flux: int8 1.2e-2, int8-rot 3e-4,
# fp8 2e-3, int4-rot 0.23 (W4A4 on x20 outlier channels), nvfp4 2.4e-2, mxfp8 2.4e-3; Wan: 1.3e-3, 7.5e-5,
# 2.7e-3, 1.8e-2, 4.4e-3, 1.8e-3); the per-layer tests above carry the rigorous bounds. ComfyUI's pick_operations
# runs nvfp4 / mxfp8 dequantized on the CPU.
E2E = {
    "flux": ("Flux", {"int8": 0.05, "int8-rot": 2e-3, "fp8": 1e-2, "int4-rot": 0.9, "nvfp4": 0.1, "mxfp8": 1e-2}),
    "wan": ("WAN21", {"int8": 1e-2, "int8-rot": 1e-3, "fp8": 1e-2, "int4-rot": 0.08, "nvfp4": 2e-2, "mxfp8": 1e-2}),
}


def _e2e_inputs(arch: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A latent and the conditioning ComfyUI's model class takes (sizes fixed by ComfyUI: Wan text_dim 4096)."""
    g = torch.Generator().manual_seed(0)
    if arch == "flux":
        return torch.randn(1, 16, 8, 8, generator=g), {
            "timestep": torch.tensor([0.7]), "context": torch.randn(1, 5, 256, generator=g),
            "y": torch.randn(1, 256, generator=g), "guidance": torch.tensor([3.5])}
    return torch.randn(1, 16, 2, 8, 8, generator=g), {
        "timestep": torch.tensor([0.6]), "context": torch.randn(1, 6, 4096, generator=g)}


@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.parametrize("arch", list(E2E))
def test_whole_model_loads_through_comfyui_model_detection(comfy: Any, conv: Conversions, arch: str) -> None:
    model_class, ceilings = E2E[arch]
    x, cond = _e2e_inputs(arch)

    def run(path: Path) -> tuple[Any, torch.Tensor]:
        sd, meta = comfy_load(comfy, path)
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={}, metadata=meta)
        assert patcher is not None and type(patcher.model).__name__ == model_class
        model = patcher.model.diffusion_model
        with torch.inference_mode():
            out = model(x.to(patcher.model.get_dtype()), **cond).float()
        assert out.shape == x.shape and torch.isfinite(out).all()
        return model, out

    _, ref = run(conv.source(arch))
    for fmt, ceiling in ceilings.items():
        path, report = conv.get(arch, fmt)
        model, out = run(path)
        modules = dict(model.named_modules())
        layers = converted_layers(report)
        prefix = ARCHS[arch][1]
        for layer in layers:
            mod = modules[layer[len(prefix):]]
            assert isinstance(mod.weight, comfy.quant_ops.QuantizedTensor), (fmt, layer)
            assert mod.quant_format == REGISTRY.get(fmt).comfy_format
        n_quantized = sum(isinstance(getattr(m, "weight", None), comfy.quant_ops.QuantizedTensor)
                          for m in modules.values())
        assert n_quantized == len(layers)
        rel_mse = float((out - ref).square().sum() / ref.square().sum())
        assert 0.0 < rel_mse < ceiling, (fmt, rel_mse)


def _scale_off(fmt: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer with the scale every element goes through off by 1% (mxfp8: one block's E8M0 exponent +1)."""
    if fmt == "nvfp4":
        return {**tensors, "weight_scale_2": tensors["weight_scale_2"] * 1.01}
    if fmt == "mxfp8":
        bad = tensors["weight_scale"].clone()
        bad[0, 0] += 1
        return {**tensors, "weight_scale": bad}
    return {**tensors, "weight_scale": tensors["weight_scale"] * 1.01}


# the tight check of each format: activations emulated exactly, or (nvfp4 / mxfp8, dequantized by ComfyUI on the
# CPU) the dequantized product itself
TIGHT = {"int8": "int8 emulated", "int8-rot": "int8 emulated", "fp8": "fp8 emulated", "int4-rot": "int4 emulated",
         "nvfp4": "dequantized weight", "mxfp8": "dequantized weight"}


@pytest.mark.parametrize("fmt", stock_int8_params(TIGHT))
def test_reference_check_catches_a_one_percent_scale_error(comfy: Any, conv: Conversions, fmt: str) -> None:
    """The bounds are tight enough to matter: a weight scale off by 1% fails the float32 tight check."""
    path, report = conv.get("flux", fmt)
    sd, _ = comfy_load(comfy, path)
    layer = sorted(converted_layers(report))[0]
    good = layer_tensors(sd, layer)
    _, x, y = run_layer(comfy, _scale_off(fmt, good), torch.float32)
    checks = {e.label: e for e in expectations(good, x, torch.float32)}
    with pytest.raises(AssertionError, match=TIGHT[fmt]):
        checks[TIGHT[fmt]].check(y, f"{fmt} scale x1.01")
    _, x, y = run_layer(comfy, good, torch.float32)
    for e in expectations(good, x, torch.float32):
        e.check(y, f"{fmt} correct scale")


@pytest.mark.stock_comfy_int8_cpu
def test_layer_config_mixed_formats_and_full_precision_mm(comfy: Any, conv: Conversions) -> None:
    """One file mixing formats by --layer-config rules, some with full_precision_matrix_mult, loads per layer."""
    rules = {"rules": [
        {"pattern": r"^double_blocks\.\d+\.img_attn\.qkv$", "format": "fp8", "full_precision_matrix_mult": True},
        {"pattern": r"^double_blocks\.\d+\.img_mlp\.", "format": "int8-rot"},
        {"pattern": r"^double_blocks\.\d+\.txt_", "format": "int8", "full_precision_matrix_mult": True},
        {"pattern": r"^single_blocks\.0\.", "format": "skip"},
    ]}
    cfg = conv.workdir / "layers.json"
    cfg.write_text(json.dumps(rules))
    out = conv.workdir / "flux-mixed.safetensors"
    report = comfyquant.convert(conv.source("flux"), out, format="int8-tensor", model="flux", layer_config=cfg,
                                progress=False, force=True)
    sd, _ = comfy_load(comfy, out)
    confs = {k[: -len(".comfy_quant")]: json.loads(v.numpy().tobytes()) for k, v in sd.items()
             if k.endswith(".comfy_quant")}
    assert set(confs) == set(converted_layers(report))
    kinds = {(c["format"], bool(c.get("convrot")), bool(c.get("full_precision_matrix_mult"))) for c in confs.values()}
    assert kinds == {("float8_e4m3fn", False, True), ("int8_tensorwise", True, False),
                     ("int8_tensorwise", False, True), ("int8_tensorwise", False, False)}
    assert not any(name.startswith("single_blocks.0.") for name in confs)
    for layer in sorted(confs):
        for dtype in COMPUTE_DTYPES:
            ratios = check_layer(comfy, layer_tensors(sd, layer), dtype, f"mixed/{layer}/{dtype}")
            fpmm = bool(confs[layer].get("full_precision_matrix_mult"))
            if fpmm and confs[layer]["format"] == "float8_e4m3fn":
                assert set(ratios) == {"full precision mm"}
            elif fpmm and dtype == torch.float32:
                # stock ComfyUI 0.30 still runs W8A8 for an int8 layer flagged full_precision_matrix_mult
                assert "int8 emulated" in ratios
