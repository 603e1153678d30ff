"""``int8_tensorwise``: int8 ``[N,K]`` weight with a scalar or ``[N,1]`` fp32 scale, optionally convrot-rotated.

Linear runs W8A8 through the kernel dispatch (per-token activation quantization; rotated layers rotate the
activations with the same regular Hadamard first). A scalar-scale weight reshapes and transposes freely; a
per-row or rotated one only transposes (as a flag, so ``mm(x, W.t())`` still takes the fast path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.quant import hadamard
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
class Int8Params(LayoutParams):
    """``scale`` is ``[]``/``[1]``/``[1,1]`` (per tensor) or ``[N,1]`` (per row); ``transposed`` means the
    logical tensor is the transpose of the ``[N,K]`` storage; ``full_precision`` computes in float."""

    scale: torch.Tensor
    convrot: bool = False
    convrot_groupsize: int = 256
    transposed: bool = False
    full_precision: bool = False


class Int8Layout(Layout):
    """ComfyUI's ``int8_tensorwise`` (per-tensor, per-row, and ``convrot`` rotated weights)."""

    name = "int8_tensorwise"
    kernel_kind = "int8"
    Params = Int8Params

    @classmethod
    def quantize(cls, tensor: torch.Tensor, *, per_row: bool = True, convrot: bool = False,
                 convrot_groupsize: int | None = None, backend: str | None = None,
                 full_precision: bool = False) -> tuple[torch.Tensor, Int8Params]:
        """Quantize a 2-D float weight; ``convrot`` implies per-row scales (as ComfyUI stores it)."""
        if convrot:
            qw = quantize_weight(tensor, "int8-rot", rot_group=convrot_groupsize)
        else:
            qw = quantize_weight(tensor, "int8" if per_row else "int8-tensor")
        conf = qw.comfy_quant or {}
        params = Int8Params(orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), backend=backend,
                            scale=qw.tensors["weight_scale"], convrot=bool(conf.get("convrot", False)),
                            convrot_groupsize=int(conf.get("convrot_groupsize", 256)),
                            full_precision=full_precision)
        return qw.tensors["weight"], params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Int8Params) -> torch.Tensor:
        conf: dict[str, Any] = {"format": "int8_tensorwise"}  # storage semantics, also for subclasses
        if params.convrot:
            conf.update(convrot=True, convrot_groupsize=params.convrot_groupsize)
        out = dequantize_weight({"weight": qdata, "weight_scale": params.scale}, conf, params.orig_dtype)
        return out.t() if params.transposed else out

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], *,
                        shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Int8Params]:
        w = tensors.get("weight")
        require(w is not None, layer, "weight is missing")
        assert w is not None
        require(w.dtype == torch.int8, layer, f"weight has dtype {w.dtype}, {cls.name} stores int8")
        require(tuple(w.shape) == tuple(shape), layer,
                f"weight shape {tuple(w.shape)} does not match the model's layer {tuple(shape)}")
        scale = check_scale(layer, "weight_scale", tensors.get("weight_scale"))
        n, k = w.shape
        require(is_scalar_shape(scale) or tuple(scale.shape) == (n, 1), layer,
                f"weight_scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
                f"(expected a scalar or ({n}, 1))")
        convrot = bool(layer_param(conf, "convrot", False))
        group = int(layer_param(conf, "convrot_groupsize", 256))
        if convrot:
            require(hadamard.is_power_of_4(group) and group >= 4, layer,
                    f"convrot_groupsize {group} is not a power of 4")
            require(k % group == 0, layer, f"in_features {k} is not a multiple of convrot_groupsize {group}")
        params = Int8Params(orig_dtype=dtype, orig_shape=(n, k), scale=scale.float(), convrot=convrot,
                            convrot_groupsize=group,
                            full_precision=bool(layer_param(conf, "full_precision_matrix_mult", False)))
        return w, params

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Int8Params) -> dict[str, torch.Tensor]:
        if params.transposed:
            raise ValueError("a transposed int8 view has no on-disk form; serialize the original weight")
        return {"weight": qdata, "weight_scale": params.scale}

    @classmethod
    def comfy_quant(cls, params: Int8Params) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": cls.name}
        if params.convrot:
            conf.update(convrot=True, convrot_groupsize=params.convrot_groupsize)
        if params.full_precision:
            conf["full_precision_matrix_mult"] = True
        return conf

    @classmethod
    def requantize_kwargs(cls, params: Int8Params) -> dict[str, Any]:
        return {"per_row": params.scale.numel() > 1 or params.convrot, "convrot": params.convrot,
                "convrot_groupsize": params.convrot_groupsize, "backend": params.backend,
                "full_precision": params.full_precision}

    @classmethod
    def view_params(cls, qdata: torch.Tensor, params: Int8Params, shape: tuple[int, ...]) -> Int8Params | None:
        if params.scale.numel() != 1 or params.convrot or params.transposed:
            return None
        return params.replace(orig_shape=shape)

    @classmethod
    def transpose_params(cls, qdata: torch.Tensor, params: Int8Params) -> tuple[torch.Tensor, Int8Params]:
        shape = (params.orig_shape[1], params.orig_shape[0])
        if params.scale.numel() == 1 and not params.convrot and not params.transposed:
            return qdata.t(), params.replace(orig_shape=shape)
        return qdata, params.replace(orig_shape=shape, transposed=not params.transposed)


def _int8_linear(x: torch.Tensor, w_q: torch.Tensor, params: Int8Params, bias: torch.Tensor | None) -> torch.Tensor:
    return dispatch.int8_linear(x, w_q, params.scale, bias,
                                convrot_group=params.convrot_groupsize if params.convrot else None,
                                out_dtype=x.dtype, backend=params.backend)


@register_layout_op(aten.linear.default, Int8Layout)
def _linear(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, bias = linear_args(args, kwargs)
    if isinstance(x, QuantizedTensor) or not isinstance(w, QuantizedTensor) or w.params.transposed:
        return fallback(func, Int8Layout, args, kwargs)
    if w.params.full_precision:
        return weight_only_linear(x, w, bias)
    return _int8_linear(x, w.qdata, w.params, bias)


def _matmul_weight(b: Any) -> torch.Tensor | None:
    """The ``[N,K]`` int8 storage when ``b`` is the logical ``[K,N]`` right operand of ``x @ b``."""
    if not isinstance(b, QuantizedTensor) or b.params.full_precision:
        return None
    if b.params.transposed:
        return b.qdata
    if b.params.scale.numel() == 1 and not b.params.convrot:
        return b.qdata.t()
    return None  # per-row scales belong to b's rows (K), not its output columns


@register_layout_op(aten.mm.default, Int8Layout)
@register_layout_op(aten.addmm.default, Int8Layout)
def _mm(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    bias, a, b = matmul_operands(func, args)
    w_q = _matmul_weight(b)
    plain_scaling = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
    if w_q is None or isinstance(a, QuantizedTensor) or isinstance(bias, QuantizedTensor) or not plain_scaling:
        return fallback(func, Int8Layout, args, kwargs)
    if bias is not None and bias.dim() != 1:
        return fallback(func, Int8Layout, args, kwargs)
    return _int8_linear(a, w_q.contiguous(), b.params, bias)


register_layout(Int8Layout.name, Int8Layout)
