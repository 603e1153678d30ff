"""Format dispatch: one float weight in, the tensors and ``comfy_quant`` config ComfyUI expects out; and back.

``quantize_weight`` and ``dequantize_weight`` are exact inverses up to rounding and are the single place
where the on-disk meaning of every format is encoded (the converter, inspect, the runtime loader and the
tests all go through them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.quant import fp8, hadamard, int8
from comfyquant.quant.formats import FormatSpec, get_format


@dataclass
class QuantizedWeight:
    """Result of quantizing one weight.

    ``tensors`` maps key suffixes (``"weight"``, ``"weight_scale"``) to tensors to store under ``L.<suffix>``;
    ``comfy_quant`` is the JSON object for ``L.comfy_quant`` (None for plain casts).
    """

    fmt: FormatSpec
    tensors: dict[str, torch.Tensor]
    comfy_quant: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def quantize_weight(w: torch.Tensor, fmt: FormatSpec | str, *, block_size: int = 128,
                    rot_group: int | None = None) -> QuantizedWeight:
    """Quantize a 2-D float weight ``[out, in]`` to ``fmt``.

    ``rot_group`` is the convrot group for ``int8-rot`` (default: :func:`hadamard.choose_group_size`);
    ``block_size`` the tile edge for ``int8-block``. Raises ``ValueError`` for shapes the format cannot take.
    """
    spec = get_format(fmt) if isinstance(fmt, str) else fmt
    if spec.is_quantized and w.dim() != 2:
        raise ValueError(f"{spec.name} quantizes 2-D weights only, got shape {tuple(w.shape)}")
    if spec.name == "int8":
        q, s = int8.quantize_rowwise(w)
        return QuantizedWeight(spec, {"weight": q, "weight_scale": s}, {"format": "int8_tensorwise"})
    if spec.name == "int8-tensor":
        q, s = int8.quantize_tensorwise(w)
        return QuantizedWeight(spec, {"weight": q, "weight_scale": s}, {"format": "int8_tensorwise"})
    if spec.name == "int8-rot":
        group = rot_group or hadamard.choose_group_size(w.shape[1])
        if group is None or w.shape[1] % group:
            raise ValueError(f"int8-rot needs in_features divisible by a power-of-4 group >= 16, got {w.shape[1]}")
        q, s = int8.quantize_rowwise(hadamard.rotate_weight(w, group))
        conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
        return QuantizedWeight(spec, {"weight": q, "weight_scale": s}, conf)
    if spec.name == "int8-block":
        q, s = int8.quantize_blockwise(w, block_size)
        return QuantizedWeight(spec, {"weight": q, "weight_scale": s},
                               {"format": "int8_blockwise", "group_size": block_size})
    if spec.name in ("fp8", "fp8-e5m2"):
        q, s = fp8.quantize_fp8(w, spec.storage_dtype)
        return QuantizedWeight(spec, {"weight": q, "weight_scale": s}, {"format": spec.comfy_format})
    if spec.name in ("fp16", "bf16"):
        return QuantizedWeight(spec, {"weight": w.to(spec.storage_dtype)}, None)
    raise ValueError(f"no quantizer for format {spec.name}")  # pragma: no cover - registry and dispatch agree


def layer_param(conf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Read a comfy_quant key the way ComfyUI does: top level first, then under ``params``."""
    if key in conf:
        return conf[key]
    params = conf.get("params")
    if isinstance(params, Mapping) and key in params:
        return params[key]
    return default


def dequantize_weight(tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any] | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the float weight from stored tensors (``weight``, ``weight_scale``) and its comfy_quant config.

    Undoes the convrot rotation, so the result is in the original basis. ``conf`` None means a plain weight.
    """
    w = tensors["weight"]
    if conf is None:
        return w.to(dtype)
    fmt = conf.get("format")
    scale = tensors.get("weight_scale")
    if fmt in ("int8_tensorwise", "int8_blockwise", "float8_e4m3fn", "float8_e5m2") and scale is None:
        raise ValueError(f"format {fmt} needs a weight_scale")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if fmt == "int8_tensorwise":
        out = int8.dequantize(w, scale, work)
        if layer_param(conf, "convrot", False):
            out = hadamard.unrotate_weight(out, int(layer_param(conf, "convrot_groupsize", 256)))
        return out.to(dtype)
    if fmt == "int8_blockwise":
        block = int(layer_param(conf, "group_size", 128))
        return int8.dequantize_blockwise(w, scale, block, work).to(dtype)
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return fp8.dequantize_fp8(w, scale, work).to(dtype)
    raise ValueError(f"cannot dequantize format '{fmt}'")
