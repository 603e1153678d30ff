"""``int8_blockwise`` (this project's format): int8 ``[N,K]`` with one fp32 scale per ``b x b`` tile.

Scales are ``[ceil(N/b), ceil(K/b)]`` and ``b`` is the ``group_size`` of ``comfy_quant``. Stock ComfyUI 0.30
rejects the format; here linear runs through the kernel dispatch's block-wise path. Views and transposes are
not expressible without moving the scale grid, so they go to the dequantizing fallback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.quant.int8 import block_scale_shape
from comfyquant.quant.quantize import dequantize_weight, layer_param, quantize_weight
from comfyquant.runtime.kernels import dispatch
from comfyquant.runtime.layouts.common import (
    aten,
    check_scale,
    fallback,
    linear_args,
    require,
    weight_only_linear,
)
from comfyquant.runtime.tensor import (
    Layout,
    LayoutParams,
    QuantizedTensor,
    register_layout,
    register_layout_op,
)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Int8BlockParams(LayoutParams):
    """``scale`` ``[ceil(N/b), ceil(K/b)]`` fp32, ``block_size`` = b."""

    scale: torch.Tensor
    block_size: int = 128
    full_precision: bool = False


class Int8BlockLayout(Layout):
    """Block-wise int8 weights (``int8_blockwise``)."""

    name = "int8_blockwise"
    kernel_kind = "int8_block"
    Params = Int8BlockParams

    @classmethod
    def quantize(cls, tensor: torch.Tensor, *, block_size: int = 128, backend: str | None = None,
                 full_precision: bool = False) -> tuple[torch.Tensor, Int8BlockParams]:
        qw = quantize_weight(tensor, "int8-block", block_size=block_size)
        params = Int8BlockParams(orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), backend=backend,
                                 scale=qw.tensors["weight_scale"], block_size=block_size,
                                 full_precision=full_precision)
        return qw.tensors["weight"], params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Int8BlockParams) -> torch.Tensor:
        conf = {"format": "int8_blockwise", "group_size": params.block_size}
        return dequantize_weight({"weight": qdata, "weight_scale": params.scale}, conf, params.orig_dtype)

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], *,
                        shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Int8BlockParams]:
        w = tensors.get("weight")
        require(w is not None, layer, "weight is missing")
        assert w is not None
        require(w.dtype == torch.int8, layer, f"weight has dtype {w.dtype}, {cls.name} stores int8")
        require(tuple(w.shape) == tuple(shape), layer,
                f"weight shape {tuple(w.shape)} does not match the model's layer {tuple(shape)}")
        block = layer_param(conf, "group_size")
        require(isinstance(block, int) and block > 0, layer,
                f"int8_blockwise needs a positive integer group_size in comfy_quant, got {block!r}")
        scale = check_scale(layer, "weight_scale", tensors.get("weight_scale"))
        expected = block_scale_shape((w.shape[0], w.shape[1]), block)
        require(tuple(scale.shape) == expected, layer,
                f"weight_scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
                f"with block {block} (expected {expected})")
        params = Int8BlockParams(orig_dtype=dtype, orig_shape=tuple(w.shape), scale=scale.float(),
                                 block_size=block,
                                 full_precision=bool(layer_param(conf, "full_precision_matrix_mult", False)))
        return w, params

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Int8BlockParams) -> dict[str, torch.Tensor]:
        return {"weight": qdata, "weight_scale": params.scale}

    @classmethod
    def comfy_quant(cls, params: Int8BlockParams) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": cls.name, "group_size": params.block_size}
        if params.full_precision:
            conf["full_precision_matrix_mult"] = True
        return conf

    @classmethod
    def requantize_kwargs(cls, params: Int8BlockParams) -> dict[str, Any]:
        return {"block_size": params.block_size, "backend": params.backend, "full_precision": params.full_precision}


@register_layout_op(aten.linear.default, Int8BlockLayout)
def _linear(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, bias = linear_args(args, kwargs)
    if isinstance(x, QuantizedTensor) or not isinstance(w, QuantizedTensor):
        return fallback(func, Int8BlockLayout, args, kwargs)
    if w.params.full_precision:
        return weight_only_linear(x, w, bias)
    return dispatch.int8_block_linear(x, w.qdata, w.params.scale, bias, block=w.params.block_size,
                                      out_dtype=x.dtype, backend=w.params.backend)


register_layout(Int8BlockLayout.name, Int8BlockLayout)
