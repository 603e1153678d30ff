"""``float8_e4m3fn`` / ``float8_e5m2``: fp8 ``[N,K]`` weight, fp32 scale (scalar, or ``[N,1]`` per row from
other tools), optional static fp32 ``input_scale`` for the activations.

Linear runs through the kernel dispatch (``_scaled_mm`` on fp8 GPUs; a float reference elsewhere). Storage maps
1:1 to elements, so a scalar-scaled weight views, reshapes and transposes by viewing its storage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.quant.quantize import dequantize_weight, layer_param, quantize_weight
from comfyquant.runtime.kernels import dispatch
from comfyquant.runtime.layouts.common import (
    aten,
    check_scale,
    fallback,
    is_scalar_shape,
    linear_args,
    matmul_operands,
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
class Fp8Params(LayoutParams):
    """``scale`` scalar or ``[N,1]``; ``input_scale`` None (dynamic per-token activations) or a scalar."""

    scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    full_precision: bool = False


class Fp8Layout(Layout):
    """ComfyUI's ``float8_e4m3fn``."""

    name = "float8_e4m3fn"
    kernel_kind = "fp8"
    Params = Fp8Params
    storage_dtype: torch.dtype = torch.float8_e4m3fn
    cli_format = "fp8"

    @classmethod
    def quantize(cls, tensor: torch.Tensor, *, input_scale: torch.Tensor | float | None = None,
                 backend: str | None = None, full_precision: bool = False) -> tuple[torch.Tensor, Fp8Params]:
        """Scalar-scaled fp8 (``comfyquant.quant.quantize_weight``); ``input_scale`` is stored as given."""
        qw = quantize_weight(tensor, cls.cli_format)
        if input_scale is not None:
            input_scale = torch.as_tensor(input_scale, dtype=torch.float32, device=tensor.device).reshape(())
        params = Fp8Params(orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), backend=backend,
                           scale=qw.tensors["weight_scale"], input_scale=input_scale,
                           full_precision=full_precision)
        return qw.tensors["weight"], params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Fp8Params) -> torch.Tensor:
        tensors = {"weight": qdata, "weight_scale": params.scale}
        return dequantize_weight(tensors, {"format": "float8_e4m3fn"}, params.orig_dtype)  # same math for e5m2

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], *,
                        shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Fp8Params]:
        w = tensors.get("weight")
        require(w is not None, layer, "weight is missing")
        assert w is not None
        if w.dtype == torch.uint8:  # older writers store fp8 bytes as uint8; ComfyUI views them as fp8
            w = w.view(cls.storage_dtype)
        require(w.dtype == cls.storage_dtype, layer, f"weight has dtype {w.dtype}, {cls.name} stores {cls.storage_dtype}")
        require(tuple(w.shape) == tuple(shape), layer,
                f"weight shape {tuple(w.shape)} does not match the model's layer {tuple(shape)}")
        scale = check_scale(layer, "weight_scale", tensors.get("weight_scale"))
        n = w.shape[0]
        require(is_scalar_shape(scale) or tuple(scale.shape) == (n, 1), layer,
                f"weight_scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
                f"(expected a scalar or ({n}, 1))")
        input_scale = tensors.get("input_scale")
        if input_scale is not None:
            check_scale(layer, "input_scale", input_scale)
            require(is_scalar_shape(input_scale), layer,
                    f"input_scale shape {tuple(input_scale.shape)} is not a scalar")
            input_scale = input_scale.float()
        params = Fp8Params(orig_dtype=dtype, orig_shape=tuple(w.shape), scale=scale.float(),
                           input_scale=input_scale,
                           full_precision=bool(layer_param(conf, "full_precision_matrix_mult", False)))
        return w, params

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Fp8Params) -> dict[str, torch.Tensor]:
        out = {"weight": qdata, "weight_scale": params.scale}
        if params.input_scale is not None:
            out["input_scale"] = params.input_scale
        return out

    @classmethod
    def comfy_quant(cls, params: Fp8Params) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": cls.name}
        if params.full_precision:
            conf["full_precision_matrix_mult"] = True
        return conf

    @classmethod
    def requantize_kwargs(cls, params: Fp8Params) -> dict[str, Any]:
        return {"input_scale": params.input_scale, "backend": params.backend,
                "full_precision": params.full_precision}

    @classmethod
    def view_params(cls, qdata: torch.Tensor, params: Fp8Params, shape: tuple[int, ...]) -> Fp8Params | None:
        return params.replace(orig_shape=shape) if params.scale.numel() == 1 else None

    @classmethod
    def transpose_params(cls, qdata: torch.Tensor, params: Fp8Params) -> tuple[torch.Tensor, Fp8Params] | None:
        if params.scale.numel() != 1:
            return None
        return qdata.t(), params.replace(orig_shape=(params.orig_shape[1], params.orig_shape[0]))


class Fp8E5M2Layout(Fp8Layout):
    """ComfyUI's ``float8_e5m2``."""

    name = "float8_e5m2"
    storage_dtype = torch.float8_e5m2
    cli_format = "fp8-e5m2"


def _fp8_linear(x: torch.Tensor, w_q: torch.Tensor, params: Fp8Params, bias: torch.Tensor | None) -> torch.Tensor:
    return dispatch.fp8_linear(x, w_q, params.scale, bias, input_scale=params.input_scale, out_dtype=x.dtype,
                               backend=params.backend)


@register_layout_op(aten.linear.default, Fp8Layout)
def _linear(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, bias = linear_args(args, kwargs)
    if isinstance(x, QuantizedTensor) or not isinstance(w, QuantizedTensor):
        return fallback(func, Fp8Layout, args, kwargs)
    if w.params.full_precision:
        return weight_only_linear(x, w, bias)
    return _fp8_linear(x, w.qdata.contiguous(), w.params, bias)


@register_layout_op(aten.mm.default, Fp8Layout)
@register_layout_op(aten.addmm.default, Fp8Layout)
def _mm(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    bias, a, b = matmul_operands(func, args)
    plain_scaling = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
    if (not isinstance(b, QuantizedTensor) or isinstance(a, QuantizedTensor) or isinstance(bias, QuantizedTensor)
            or b.params.scale.numel() != 1 or b.params.full_precision or not plain_scaling
            or (bias is not None and bias.dim() != 1)):
        return fallback(func, Fp8Layout, args, kwargs)
    return _fp8_linear(a, b.qdata.t().contiguous(), b.params, bias)


register_layout(Fp8Layout.name, Fp8Layout)
register_layout(Fp8E5M2Layout.name, Fp8E5M2Layout)
