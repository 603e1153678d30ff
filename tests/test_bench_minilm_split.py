"""``benchmarks/minilm_error_split.py``: which layers a file quantizes and with which rotation group, per layer.

int8-rot picks the convrot group per layer (MiniLM: 64 for K=384, larger for K=1536), so a file has several
group sizes; the activation-only split must rotate each layer with its own group, not skip the rotated case.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from convert_helpers import REPO
from safetensors.torch import save_file

from comfyquant.io.comfy_meta import encode_comfy_quant


def _load():
    spec = importlib.util.spec_from_file_location("minilm_error_split", REPO / "benchmarks" / "minilm_error_split.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rotation_group_per_layer_and_rotated_fake_quant(tmp_path: Path) -> None:
    split = _load()
    conf = {"format": "int8_tensorwise", "convrot": True}
    tensors = {"a.weight": torch.zeros(4, 384, dtype=torch.int8),
               "a.comfy_quant": encode_comfy_quant({**conf, "convrot_groupsize": 64}),
               "b.weight": torch.zeros(4, 1536, dtype=torch.int8),
               "b.comfy_quant": encode_comfy_quant({**conf, "convrot_groupsize": 256}),
               "c.weight": torch.zeros(4, 8)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    groups, fmt = split.quantized_layers(path)
    assert groups == {"a": 64, "b": 256} and fmt == "int8_tensorwise"
    # per-token int8 in the rotated basis: an outlier channel costs far less than without the rotation
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 100
    err = {g: float((split.fake_quant_tokens(x, g) - x).pow(2).sum()) for g in (None, 256)}
    assert err[256] < 0.25 * err[None]
