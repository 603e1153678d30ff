"""``int4-rot`` / ``nvfp4`` / ``mxfp8`` files load in stock ComfyUI 0.30.0 and match float64 references layer by layer.

State dicts with the real key names and shapes (scaled down) of Flux, SDXL, Wan and T5-XXL are quantized with
``formats.quantize_weight``, saved with safetensors and read back with ComfyUI's ``load_torch_file``; every layer
is loaded by ``comfy.ops.mixed_precision_ops(...).Linear`` (nvfp4/mxfp8 with the disabled set ComfyUI's
``pick_operations`` uses on the CPU) and its output checked against ``comfyui_reference`` for float32 and
bfloat16 compute. Layers whose K the format cannot take are refused with ``FormatShapeError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_reference import check_layer, expectations, layer_tensors, run_layer
from safetensors.torch import load_file, save_file

from comfyquant.eval.synthetic import write_synthetic_checkpoint
from comfyquant.formats import FormatShapeError, get_format, quantize_weight
from comfyquant.io.comfy_meta import encode_comfy_quant

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("torch_single_thread")]

ARCHS = {"flux": "", "sdxl": "model.diffusion_model.", "wan": "", "t5xxl": ""}
NEW_FORMATS = ("int4-rot", "nvfp4", "mxfp8")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
NOT_LINEAR = ("relative_attention_bias", "shared.", "embed_tokens")


class Files:
    """Per (arch, format): a quantized file of one layer per distinct weight shape, built once per module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._done: dict[tuple[str, str], tuple[Path, list[str], dict[str, str]]] = {}

    def get(self, arch: str, fmt: str) -> tuple[Path, list[str], dict[str, str]]:
        """(path, quantized layers, refused layer -> reason)."""
        if (arch, fmt) not in self._done:
            src = self.workdir / f"{arch}.safetensors"
            if not src.exists():
                write_synthetic_checkpoint(src, arch, "tiny", prefix=ARCHS[arch], seed=7)
            sd = load_file(str(src))
            seen: set[tuple[int, ...]] = set()
            out, layers, refused = dict(sd), [], {}
            for key, w in sorted(sd.items()):
                if not key.endswith(".weight") or w.dim() != 2 or any(s in key for s in NOT_LINEAR):
                    continue
                if tuple(w.shape) in seen:
                    del out[key]  # one layer per shape keeps the module fast; the others are dropped
                    out.pop(key[: -len("weight")] + "bias", None)
                    continue
                seen.add(tuple(w.shape))
                layer = key[: -len(".weight")]
                try:
                    qw = quantize_weight(w, fmt)
                except FormatShapeError as e:
                    refused[layer] = str(e)
                    continue
                del out[key]
                out.update({f"{layer}.{k}": v for k, v in qw.tensors.items()})
                out[f"{layer}.comfy_quant"] = encode_comfy_quant(qw.comfy_quant)
                layers.append(layer)
            path = self.workdir / f"{arch}-{fmt}.safetensors"
            save_file(out, str(path))
            self._done[arch, fmt] = (path, layers, refused)
        return self._done[arch, fmt]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("comfyui_lowbit"))


@pytest.mark.parametrize("fmt", NEW_FORMATS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layers_load_in_comfyui_and_match(comfy: Any, files: Files, arch: str, fmt: str) -> None:
    path, layers, refused = files.get(arch, fmt)
    spec = get_format(fmt)
    assert layers, (arch, fmt, refused)
    for layer, reason in refused.items():  # only K the format cannot take (t5's 64-wide heads are fine)
        assert "in_features" in reason, (layer, reason)
    sd = comfy.utils.load_torch_file(str(path))
    assert comfy.utils.detect_layer_quantization(sd, ARCHS[arch]) == {"mixed_ops": True}
    for layer in layers:
        tensors = layer_tensors(sd, layer)
        assert tensors["weight"].dtype == spec.storage_dtype
        assert json.loads(tensors["comfy_quant"].numpy().tobytes())["format"] == spec.comfy_format
        for dtype in COMPUTE_DTYPES:
            ratios = check_layer(comfy, tensors, dtype, f"{arch}/{fmt}/{layer}/{dtype}")
            assert ratios


def _corrupt(fmt: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 1% error in the scale a format applies to every element (mxfp8: one block's exponent off by one)."""
    if fmt == "nvfp4":
        return {**tensors, "weight_scale_2": tensors["weight_scale_2"] * 1.01}
    if fmt == "mxfp8":
        bad = tensors["weight_scale"].clone()
        bad[0, 0] += 1
        return {**tensors, "weight_scale": bad}
    return {**tensors, "weight_scale": tensors["weight_scale"] * 1.01}


@pytest.mark.parametrize("fmt", NEW_FORMATS)
def test_reference_check_catches_a_scale_error(comfy: Any, files: Files, fmt: str) -> None:
    path, layers, _ = files.get("flux", fmt)
    sd = comfy.utils.load_torch_file(str(path))
    good = layer_tensors(sd, layers[0])
    _, x, y = run_layer(comfy, _corrupt(fmt, good), torch.float32)
    checks = expectations(good, x, torch.float32)
    tight = checks[-1]  # int4-rot: the emulated activations; nvfp4 / mxfp8: the dequantized product
    assert tight.label == {"int4-rot": "int4 emulated"}.get(fmt, "dequantized weight")
    with pytest.raises(AssertionError, match=tight.label):
        tight.check(y, f"{fmt} corrupted scale")
    _, x, y = run_layer(comfy, good, torch.float32)
    for e in expectations(good, x, torch.float32):
        e.check(y, f"{fmt} correct scale")


def test_convrot_w4a4_reads_linear_dtype_and_group(comfy: Any, files: Files) -> None:
    """ComfyUI takes our ``convrot_groupsize`` and (optional) ``linear_dtype`` into its layout parameters."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    for options, group, linear_dtype in (({"convrot_groupsize": 64}, 64, "int4"),
                                         ({"linear_dtype": "int8"}, 256, "int8")):
        qw = quantize_weight(w, "int4-rot", **options)
        tensors = {**qw.tensors, "comfy_quant": encode_comfy_quant(qw.comfy_quant)}
        lin, _, _ = run_layer(comfy, tensors, torch.float32)
        params = lin.weight._params
        assert (params.convrot_groupsize, params.quant_group_size, params.linear_dtype) == (group, 64, linear_dtype)
        check_layer(comfy, tensors, torch.float32, f"int4-rot {options}")
