"""Layout-agnostic aten handlers for ``QuantizedTensor``: detach, clone, device/dtype moves, copy_, views.

A device move keeps the tensor quantized (storage and scales move together); a dtype change only changes the
logical dtype (what ``dequantize`` and the matmul produce). Views ask the layout whether it can express the new
shape; when it cannot, the op goes to the logged dequantizing fallback.
"""

from __future__ import annotations

from typing import Any

import torch

from comfyquant.runtime.tensor import (
    REGISTRY,
    QuantizedTensor,
    register_generic_op,
    register_layout,
    register_layout_op,
    run_dequantized,
)

__all__ = ["REGISTRY", "register_generic_op", "register_layout", "register_layout_op"]

aten = torch.ops.aten


def _move(qt: QuantizedTensor, device: torch.device | None, dtype: torch.dtype | None, copy: bool,
          non_blocking: bool = False) -> QuantizedTensor:
    needs_device = device is not None and torch.device(device) != qt.qdata.device
    needs_dtype = dtype is not None and dtype != qt.dtype
    if not (needs_device or needs_dtype or copy):
        return qt
    if needs_device:
        qdata = qt.qdata.to(device=device, non_blocking=non_blocking)
        params = qt.params.map_tensors(lambda t: t.to(device=device, non_blocking=non_blocking))
    elif copy:
        qdata, params = qt.qdata.clone(), qt.params.map_tensors(torch.clone)
    else:
        qdata, params = qt.qdata, qt.params
    if needs_dtype:
        if not dtype.is_floating_point:
            raise TypeError(f"a QuantizedTensor's logical dtype must be floating point, not {dtype}")
        params = params.replace(orig_dtype=dtype)
    return qt.with_parts(qdata, params)


@register_generic_op(aten.detach.default, aten.alias.default)
def _detach(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    return qt.with_parts(qt.qdata.detach())


@register_generic_op(aten.clone.default)
def _clone(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    return qt.with_parts(qt.qdata.clone(), qt.params.map_tensors(torch.clone))


@register_generic_op(aten._to_copy.default)
def _to_copy(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    out = _move(qt, kwargs.get("device"), kwargs.get("dtype"), copy=True,
                non_blocking=bool(kwargs.get("non_blocking", False)))
    if kwargs.get("pin_memory"):
        out = _pin(out)
    return out


@register_generic_op(aten.to.dtype, aten.to.device, aten.to.dtype_layout)
def _to(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args[1:]:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (torch.device, str)):
            device = torch.device(a)
    return _move(qt, device, dtype, copy=bool(kwargs.get("copy", False)),
                 non_blocking=bool(kwargs.get("non_blocking", False)))


def _pin(qt: QuantizedTensor) -> QuantizedTensor:
    return qt.with_parts(qt.qdata.pin_memory(), qt.params.map_tensors(lambda t: t.pin_memory()))


@register_generic_op(aten._pin_memory.default)
def _pin_memory(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    return _pin(args[0])


@register_generic_op(aten.is_pinned.default)
def _is_pinned(func: Any, args: tuple, kwargs: dict) -> bool:
    return bool(args[0].qdata.is_pinned())


@register_generic_op(aten.contiguous.default)
def _contiguous(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    return qt if qt.qdata.is_contiguous() else qt.with_parts(qt.qdata.contiguous())


@register_generic_op(aten.is_contiguous.default, aten.is_contiguous.memory_format)
def _is_contiguous(func: Any, args: tuple, kwargs: dict) -> bool:
    return bool(args[0].qdata.is_contiguous())


@register_generic_op(aten._has_compatible_shallow_copy_type.default)
def _shallow_copy_ok(func: Any, args: tuple, kwargs: dict) -> bool:
    return isinstance(args[0], QuantizedTensor) and isinstance(args[1], QuantizedTensor)


@register_generic_op(aten.copy_.default)
def _copy_(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    """In-place copy keeping ``dst``'s storage, layout and logical dtype.

    A float source is quantized with ``dst``'s layout options first; the result must have the same storage
    and scale shapes (it always does for the same layout and shape).
    """
    dst, src = args[0], args[1]
    if not isinstance(dst, QuantizedTensor):
        return func(dst, src.dequantize(), **kwargs)
    non_blocking = bool(kwargs.get("non_blocking", False))
    if not isinstance(src, QuantizedTensor):
        src = QuantizedTensor.from_float(src.to(dst.dtype), dst.layout_cls,
                                         **dst.layout_cls.requantize_kwargs(dst.params))
    if src.layout_cls is not dst.layout_cls:
        raise TypeError(f"cannot copy a {src.layout_name} tensor into a {dst.layout_name} tensor")
    dst_t, src_t = dst.params.tensor_fields(), src.params.tensor_fields()
    if dst.qdata.shape != src.qdata.shape or dst_t.keys() != src_t.keys() or any(
            dst_t[k].shape != src_t[k].shape for k in dst_t):
        raise RuntimeError(f"copy_: storage or scale shapes differ ({tuple(src.qdata.shape)} -> "
                           f"{tuple(dst.qdata.shape)}) for layout {dst.layout_name}")
    dst.qdata.copy_(src.qdata, non_blocking=non_blocking)
    for k, t in dst_t.items():
        t.copy_(src_t[k], non_blocking=non_blocking)
    return dst


@register_generic_op(aten.empty_like.default)
def _empty_like(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    qt = args[0]
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    qdata = torch.empty_like(qt.qdata, device=device)
    params = qt.params.map_tensors(lambda t: torch.empty_like(t, device=device))
    if dtype is not None:
        params = params.replace(orig_dtype=dtype)
    return qt.with_parts(qdata, params)


def _target_shape(qt: QuantizedTensor, shape: Any) -> tuple[int, ...]:
    shape = list(shape)
    if -1 in shape:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        shape[shape.index(-1)] = qt.numel() // max(known, 1)
    return tuple(int(s) for s in shape)


@register_generic_op(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(func: Any, args: tuple, kwargs: dict) -> Any:
    qt, shape = args[0], _target_shape(args[0], args[1])
    if shape == tuple(qt.shape):
        return qt.with_parts(qt.qdata.view(qt.qdata.shape))
    params = qt.layout_cls.view_params(qt.qdata, qt.params, shape)
    if params is None:
        REGISTRY.note_fallback(func, qt.layout_cls)
        return run_dequantized(func, args, kwargs)
    return qt.with_parts(qt.qdata.reshape(shape), params)


@register_generic_op(aten.t.default)
def _t(func: Any, args: tuple, kwargs: dict) -> Any:
    qt = args[0]
    moved = qt.layout_cls.transpose_params(qt.qdata, qt.params) if qt.dim() == 2 else None
    if moved is None:
        REGISTRY.note_fallback(func, qt.layout_cls)
        return run_dequantized(func, args, kwargs)
    return qt.with_parts(*moved)
