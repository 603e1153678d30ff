"""Convenience entry points over the registry: quantize one weight, dequantize stored tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.formats.base import Params, QuantFormat
from comfyquant.formats.registry import REGISTRY, get_format


@dataclass
class QuantizedWeight:
    """One quantized weight: its format and layer params, the stored tensors by suffix, the ``comfy_quant``."""

    fmt: QuantFormat
    params: Params
    tensors: dict[str, torch.Tensor]
    comfy_quant: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def quantize_weight(w: torch.Tensor, fmt: str | QuantFormat, **options: Any) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D float weight ``[out, in]`` to ``fmt``.

    ``options`` are the format's layer options (``convrot_groupsize``, ``block_size``,
    ``full_precision_matrix_mult``, ...); a shape the format cannot take raises ``FormatShapeError``.
    """
    spec = get_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"{spec.name} quantizes 2-D weights only, got shape {tuple(w.shape)}")
    params = spec.resolve((w.shape[0], w.shape[1]), options)
    tensors = spec.quantize(w, params)
    return QuantizedWeight(spec, params, tensors, spec.comfy_quant(params) if spec.is_quantized else None)


def identify(conf: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> QuantFormat:
    """The registered format of stored tensors with this ``comfy_quant`` (ValueError if none reads it)."""
    return REGISTRY.identify(conf, {k: tuple(t.shape) for k, t in tensors.items()})


def dequantize_weight(tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any] | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (original basis, rotation undone) of a layer's stored tensors; ``conf`` None = plain."""
    if conf is None:
        return tensors["weight"].to(dtype)
    fmt = identify(conf, tensors)
    return fmt.dequantize(tensors, fmt.params_from_conf(conf), dtype)
