"""The ``L.comfy_quant`` tensor and the legacy header/scaled-fp8 forms of ComfyUI's quantization metadata.

ComfyUI reads ``json.loads(t.numpy().tobytes())`` from a 1-D uint8 tensor; layers without one load as plain
weights. Legacy files carry ``__metadata__["_quantization_metadata"]`` (``{"format_version": "1.0",
"layers": {...}}``) or a ``scaled_fp8`` marker with ``L.scale_weight``/``L.scale_input``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

QUANT_SUFFIX = ".comfy_quant"
HEADER_KEY = "_quantization_metadata"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")


def encode_comfy_quant(conf: Mapping[str, Any]) -> torch.Tensor:
    """JSON object -> 1-D uint8 tensor of its UTF-8 bytes (compact, keys in insertion order)."""
    data = json.dumps(dict(conf), separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_comfy_quant(t: torch.Tensor) -> dict[str, Any]:
    """1-D uint8 tensor -> JSON object (the inverse of :func:`encode_comfy_quant`)."""
    obj = json.loads(t.cpu().numpy().tobytes())
    if not isinstance(obj, dict):
        raise ValueError("comfy_quant does not hold a JSON object")
    return obj


def encoded_size(conf: Mapping[str, Any]) -> int:
    """Byte length :func:`encode_comfy_quant` will produce (lets a streaming writer plan the header)."""
    return len(json.dumps(dict(conf), separators=(",", ":")).encode("utf-8"))


def quantized_layers(keys: Iterable[str]) -> list[str]:
    """Layer names that carry a ``comfy_quant`` tensor."""
    return sorted(k[: -len(QUANT_SUFFIX)] for k in keys if k.endswith(QUANT_SUFFIX))


def make_header_metadata(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The legacy header value for ``layers`` (what ``edit --to-header-metadata`` writes)."""
    return json.dumps({"format_version": "1.0", "layers": {k: dict(v) for k, v in layers.items()}})


def is_scaled_fp8(keys: Iterable[str]) -> bool:
    """True for old ``scaled_fp8`` files (a marker tensor ``scaled_fp8`` or ``<prefix>scaled_fp8``)."""
    return any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in keys)
