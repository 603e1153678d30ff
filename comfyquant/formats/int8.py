"""INT8 formats: per-row (``int8``), per-tensor (``int8-tensor``), rotated per-row (``int8-rot``, ComfyUI's
``convrot``) and block-wise (``int8-block``, comfyquant's ``int8_blockwise``).

Round-to-nearest goes through ``quant.int8``'s four-pass quantizers (bit-identical to the generic grid path,
several times faster on CPUs); the rotation is ``quant.hadamard``'s regular Hadamard (FORMAT.md, ``convrot``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats.base import AffineFormat, FormatShapeError, Params, _work, conf_value
from comfyquant.formats.grids import INT8
from comfyquant.formats.scaling import Block
from comfyquant.quant import hadamard
from comfyquant.quant import int8 as int8_math

DEFAULT_BLOCK = 128


def resolve_rot_group(k: int, requested: Any, name: str) -> int:
    """The convrot group for in_features ``k``: the requested one, or the largest power of 4 (<= 256) dividing k."""
    if requested is not None:
        group = int(requested)
        if not hadamard.is_power_of_4(group) or group < 4:
            raise FormatShapeError(f"{name}: convrot group size {group} is not a power of 4 (16, 64, 256, 1024)")
        if k % group:
            raise FormatShapeError(f"{name}: in_features {k} is not a multiple of the convrot group {group}")
        return group
    group = hadamard.choose_group_size(k)
    if group is None:
        raise FormatShapeError(f"{name}: in_features {k} is not a multiple of a power-of-4 group >= 16")
    return group


def rotate_hessian(h: torch.Tensor, group: int) -> torch.Tensor:
    """``R^T H R`` for the block-diagonal regular Hadamard ``R`` (symmetric), by two fast transforms."""
    return hadamard.fast_hadamard(hadamard.fast_hadamard(h, group).T.contiguous(), group).T.contiguous()


class Int8Format(AffineFormat):
    """``int8_tensorwise``: int8 ``[N, K]`` and an fp32 scale that is a scalar or ``[N, 1]``."""

    comfy_format = "int8_tensorwise"
    kernel_kind = "int8"
    storage_dtype = torch.int8
    element_grid = INT8
    input_grid = INT8  # W8A8: per-token int8 activations (after the rotation for convrot)
    bits = 8.0

    def __init__(self, name: str, per_row: bool, rotated: bool, description: str,
                 aliases: tuple[str, ...] = ()) -> None:
        self.name, self.per_row, self.rotated = name, per_row, rotated
        self.description, self.aliases = description, aliases
        self.options = ("convrot_groupsize",) if rotated else ()
        self.fallback = "int8" if rotated else None

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        return (1, None) if self.per_row else (None, None)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        params = self._common(options)
        if self.rotated:
            params["convrot_groupsize"] = resolve_rot_group(shape[1], (options or {}).get("convrot_groupsize"),
                                                            self.name)
        return params

    def comfy_quant(self, params: Mapping[str, Any]) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": self.comfy_format}
        if self.rotated:
            conf.update(convrot=True, convrot_groupsize=int(params["convrot_groupsize"]))
        conf.update(super().comfy_quant(params))
        return conf

    def params_from_conf(self, conf: Mapping[str, Any]) -> Params:
        params = super().params_from_conf(conf)
        if conf_value(conf, "convrot", False):
            group = conf_value(conf, "convrot_groupsize", 256)
            if not isinstance(group, int) or not hadamard.is_power_of_4(group) or group < 4:
                raise ValueError(f"convrot_groupsize {group!r} is not a power of 4")
            params["convrot_groupsize"] = group
        return params

    def claims(self, conf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> bool:
        if conf.get("format") != self.comfy_format:
            return False
        if bool(conf_value(conf, "convrot", False)) != self.rotated:
            return False
        if self.rotated:
            return True
        scale = shapes.get("weight_scale")
        scalar = scale is not None and _numel(scale) == 1
        return scalar != self.per_row

    def transform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return hadamard.rotate_weight(w, int(params["convrot_groupsize"])) if self.rotated else w

    def untransform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return hadamard.unrotate_weight(w, int(params["convrot_groupsize"])) if self.rotated else w

    def transform_hessian(self, h: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return rotate_hessian(h, int(params["convrot_groupsize"])) if self.rotated else h

    def quantize(self, w: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        w_t = self.transform(w, params) if self.rotated else w
        q, s = int8_math.quantize_rowwise(w_t) if self.per_row else int8_math.quantize_tensorwise(w_t)
        return {"weight": q, "weight_scale": s}

    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors.get("weight_scale"),), (int(params.get("convrot_groupsize", 0)) if self.rotated else 0,)


class Int8BlockFormat(AffineFormat):
    """``int8_blockwise`` (comfyquant's): int8 ``[N, K]``, one fp32 scale per ``b x b`` tile (``group_size`` b)."""

    name = "int8-block"
    comfy_format = "int8_blockwise"
    aliases = ("int8_blockwise",)
    stock_comfy = False
    kernel_kind = "int8_block"
    storage_dtype = torch.int8
    element_grid = INT8
    input_grid = INT8
    bits = 8.0
    options = ("block_size",)
    description = "INT8 with one fp32 scale per (block x block) tile; not loadable by stock ComfyUI 0.30"

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        b = int(params.get("block_size", DEFAULT_BLOCK))
        return (b, b)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        params = self._common(options)
        b = (options or {}).get("block_size", DEFAULT_BLOCK)
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise FormatShapeError(f"int8-block: block size must be a positive integer, got {b!r}")
        params["block_size"] = b
        return params

    def comfy_quant(self, params: Mapping[str, Any]) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": self.comfy_format, "group_size": int(params["block_size"])}
        conf.update(super().comfy_quant(params))
        return conf

    def params_from_conf(self, conf: Mapping[str, Any]) -> Params:
        params = super().params_from_conf(conf)
        b = conf_value(conf, "group_size")
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"int8_blockwise needs a positive integer group_size in comfy_quant, got {b!r}")
        params["block_size"] = b
        return params

    def quantize(self, w: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        q, s = int8_math.quantize_blockwise(_work(w), int(params["block_size"]))
        return {"weight": q, "weight_scale": s}

    def describe_shape(self, slot: Any, params: Mapping[str, Any]) -> str:
        if slot.suffix == "weight_scale":
            return f"{list(slot.shape)} for group_size {params['block_size']}"
        return super().describe_shape(slot, params)

    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors.get("weight_scale"),), (int(params["block_size"]),)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


INT8_ROW = Int8Format("int8", per_row=True, rotated=False,
                      description="INT8 W8A8, one fp32 scale per output row ([N,1]); activations quantized per token",
                      aliases=("int8_rowwise", "int8-row"))
INT8_TENSOR = Int8Format("int8-tensor", per_row=False, rotated=False,
                         description="INT8 W8A8, one scalar fp32 scale for the whole weight",
                         aliases=("int8_tensorwise",))
INT8_ROT = Int8Format("int8-rot", per_row=True, rotated=True,
                      description="INT8 W8A8 per-row, weight rotated by a group-wise regular Hadamard along K (convrot)",
                      aliases=("convrot", "int8-convrot"))
INT8_BLOCK = Int8BlockFormat()
