"""One runtime layout for every registered format: storage, dequantize, load/save, views, linear.

A layout class exists per ComfyUI ``format`` string (``int8_tensorwise``, ``float8_e4m3fn``, ...); the params
name the registry format (``int8`` / ``int8-tensor`` / ``int8-rot`` share ``int8_tensorwise``) and carry its
layer params and scale tensors. Everything format-specific comes from ``comfyquant.formats``; linear runs the
format's kernel kind through ``runtime.kernels`` (the CPU reference or a GPU kernel). A format registered later
gets its layout from :func:`layout_class` with no code here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.formats import QuantFormat, get_format
from comfyquant.runtime.kernels import dispatch
from comfyquant.runtime.kernels.acts import Norm, RowNorm, apply_input_act, rms_norm
from comfyquant.runtime.layouts.common import (
    aten,
    check_scale,
    fallback,
    linear_args,
    matmul_operands,
    require,
    weight_only_linear,
)
from comfyquant.runtime.tensor import (
    REGISTRY,
    Layout,
    LayoutParams,
    QuantizedTensor,
    register_layout,
    register_layout_op,
)

SCALE_SLOTS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
# ``pre_quant_scale`` (``p``, ``[K]``, as ComfyUI's AWQ/SmoothQuant-style smoothing): the layer computes
# ``(x * p) @ W_stored^T``, so the logical weight (what ``dequantize`` returns) is ``W_stored * p[None, :]``.
_FULL = "full_precision_matrix_mult"


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class FormatParams(LayoutParams):
    """The registry format (``fmt``, a CLI name), its layer params, the stored scale tensors, and whether the
    logical tensor is the transpose of the ``[N, K]`` storage."""

    fmt: str
    fmt_params: tuple[tuple[str, Any], ...] = ()
    weight_scale: torch.Tensor | None = None
    weight_scale_2: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None
    transposed: bool = False

    @property
    def format(self) -> QuantFormat:
        return get_format(self.fmt)

    @property
    def layer_params(self) -> dict[str, Any]:
        return dict(self.fmt_params)

    @property
    def full_precision(self) -> bool:
        return bool(self.layer_params.get(_FULL, False))

    @property
    def scale(self) -> torch.Tensor | None:
        """The ``weight_scale`` tensor (name kept for the int8/fp8 layouts' callers)."""
        return self.weight_scale

    @property
    def convrot(self) -> bool:
        return "convrot_groupsize" in self.layer_params

    @property
    def convrot_groupsize(self) -> int | None:
        return self.layer_params.get("convrot_groupsize")

    @property
    def block_size(self) -> int | None:
        return self.layer_params.get("block_size")

    def stored(self, qdata: torch.Tensor) -> dict[str, torch.Tensor]:
        """Suffix -> tensor as the file stores them."""
        out = {"weight": qdata}
        out.update({s: getattr(self, s) for s in SCALE_SLOTS if getattr(self, s) is not None})
        return out


def _freeze(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def _legacy_int8(fmt: QuantFormat, per_row: bool | None, convrot: bool | None) -> QuantFormat:
    """``per_row`` / ``convrot`` keywords of the earlier int8 layout API pick the int8_tensorwise sibling."""
    if fmt.comfy_format != "int8_tensorwise" or (per_row is None and convrot is None):
        return fmt
    if convrot:
        return get_format("int8-rot")
    return get_format("int8" if per_row in (None, True) else "int8-tensor")


class FormatLayout(Layout):
    """The layout of every format stored under one ComfyUI ``format`` string (subclassed per string)."""

    Params = FormatParams
    default_format: str = ""

    @classmethod
    def quantize(cls, tensor: torch.Tensor, *, fmt: str | None = None, backend: str | None = None,
                 full_precision: bool = False, input_scale: torch.Tensor | float | None = None,
                 per_row: bool | None = None, convrot: bool | None = None,
                 pre_quant_scale: torch.Tensor | None = None, **options: Any) -> tuple[torch.Tensor, FormatParams]:
        """Round-to-nearest quantization of a 2-D float weight; ``options`` are the format's layer options.
        With ``pre_quant_scale`` ``p`` the stored weight is ``W / p`` (SmoothQuant's ``W diag(s)``, ``s = 1/p``)."""
        spec = _legacy_int8(get_format(fmt or cls.default_format), per_row, convrot)
        if spec.comfy_format not in {c.name for c in cls.__mro__ if issubclass(c, FormatLayout)}:
            raise ValueError(f"format {spec.name} is stored as {spec.comfy_format}, not {cls.name}")
        opts = {k: v for k, v in options.items() if v is not None}
        if full_precision:
            opts[_FULL] = True
        if input_scale is not None:
            opts["input_scale"] = True
        params = spec.resolve((tensor.shape[0], tensor.shape[1]), opts)
        w = tensor.detach()
        if pre_quant_scale is not None:
            pre_quant_scale = pre_quant_scale.detach().to(device=tensor.device, dtype=torch.float32).reshape(-1)
            w = (w.float() / pre_quant_scale[None, :]).to(w.dtype)
        stored = spec.quantize(w, params)
        if pre_quant_scale is not None:
            stored["pre_quant_scale"] = pre_quant_scale
        if input_scale is not None:
            stored["input_scale"] = torch.as_tensor(input_scale, dtype=torch.float32,
                                                    device=tensor.device).reshape(())
        return stored["weight"], cls._params(spec, params, stored, tensor.dtype, tuple(tensor.shape), backend)

    @classmethod
    def _params(cls, spec: QuantFormat, params: Mapping[str, Any], stored: Mapping[str, torch.Tensor],
                dtype: torch.dtype, shape: tuple[int, ...], backend: str | None) -> FormatParams:
        scales = {s: stored[s] for s in SCALE_SLOTS if s in stored}
        return FormatParams(orig_dtype=dtype, orig_shape=shape, backend=backend, fmt=spec.name,
                            fmt_params=_freeze({k: v for k, v in params.items() if k != "input_scale"}),
                            **scales)

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: FormatParams) -> torch.Tensor:
        out = params.format.dequantize(params.stored(qdata), params.layer_params, params.orig_dtype)
        if params.pre_quant_scale is not None:
            out = (out.float() * params.pre_quant_scale.to(out.device)[None, :]).to(out.dtype)
        return out.t() if params.transposed else out

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], *,
                        shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, FormatParams]:
        w = tensors.get("weight")
        require(w is not None, layer, "weight is missing")
        assert w is not None
        try:
            spec = FORMATS.identify(conf, {k: tuple(t.shape) for k, t in tensors.items()})
        except ValueError as e:
            raise UserError(f"layer {layer}: {e}") from None
        infos = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        problems = spec.validate(layer, conf, infos, (int(shape[0]), int(shape[1])))
        require(not problems, layer, "; ".join(problems))
        params = spec.params_from_conf(conf)
        if w.dtype == torch.uint8 and spec.storage_dtype != torch.uint8:
            w = w.view(spec.storage_dtype)  # older writers store fp8 bytes as uint8; ComfyUI views them as fp8
        stored = {"weight": w}
        for s in SCALE_SLOTS:
            t = tensors.get(s)
            if t is None:
                continue
            if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                t = check_scale(layer, s, t).float()
            stored[s] = t
        return w, cls._params(spec, params, stored, dtype, (int(shape[0]), int(shape[1])), None)

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: FormatParams) -> dict[str, torch.Tensor]:
        if params.transposed:
            raise ValueError("a transposed quantized view has no on-disk form; serialize the original weight")
        return params.stored(qdata)

    @classmethod
    def comfy_quant(cls, params: FormatParams) -> dict[str, Any]:
        return params.format.comfy_quant(params.layer_params)

    @classmethod
    def requantize_kwargs(cls, params: FormatParams) -> dict[str, Any]:
        opts = {k: v for k, v in params.layer_params.items() if k != _FULL}
        return {"fmt": params.fmt, "backend": params.backend, "full_precision": params.full_precision,
                "input_scale": params.input_scale, "pre_quant_scale": params.pre_quant_scale, **opts}

    @classmethod
    def _elementwise(cls, qdata: torch.Tensor, params: FormatParams) -> bool:
        """Storage maps 1:1 to logical elements with one scale: views and transposes act on the storage."""
        spec = params.format
        return (not params.transposed and not spec.rotated and tuple(qdata.shape) == tuple(params.orig_shape)
                and params.pre_quant_scale is None and params.weight_scale is not None and params.weight_scale.numel() == 1
                and params.weight_scale_2 is None)

    @classmethod
    def view_params(cls, qdata: torch.Tensor, params: FormatParams,
                    shape: tuple[int, ...]) -> FormatParams | None:
        return params.replace(orig_shape=shape) if cls._elementwise(qdata, params) else None

    @classmethod
    def transpose_params(cls, qdata: torch.Tensor, params: FormatParams) -> tuple[torch.Tensor, FormatParams]:
        shape = (params.orig_shape[1], params.orig_shape[0])
        if cls._elementwise(qdata, params):
            return qdata.t(), params.replace(orig_shape=shape)
        return qdata, params.replace(orig_shape=shape, transposed=not params.transposed)

    @classmethod
    def bind_linear(cls, qdata: torch.Tensor, params: FormatParams,
                    bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        spec = params.format
        if params.transposed or params.full_precision or spec.kernel_kind is None:
            return None  # the handler's other paths (fallback, weight-only) have no per-call setup to save
        scales, opts = spec.kernel_args(params.stored(qdata), params.layer_params)
        call = dispatch.bind_linear(spec.kernel_kind, qdata, scales, bias, opts=opts, backend=params.backend)
        p = params.pre_quant_scale
        if p is None:
            return call

        scales_by: dict[tuple, RowNorm] = {}  # p in each (dtype, device) a call came in

        def smoothed(x: torch.Tensor, low_rank: dispatch.LowRank | None = None,
                     input_act: str | None = None, norm: Norm | None = None) -> torch.Tensor:
            # the kernel quantizes act(x) * p (outliers divided out); a LoRA side path reads act(x) itself
            x = apply_input_act(x if norm is None else rms_norm(x, norm), input_act)
            if low_rank is not None:
                return dispatch.add_low_rank(x, call(_smooth(x, p)), low_rank)
            # p as a column scale the activation quantizer applies where the backend folds it (else x * p first,
            # in the dispatcher): p rounded to x's dtype, as _smooth multiplies
            col = scales_by.get((x.dtype, x.device))
            if col is None:
                col = scales_by[(x.dtype, x.device)] = RowNorm(p.to(device=x.device, dtype=x.dtype).contiguous(),
                                                                0.0, rms=False)
            return call(x, None, None, col)

        smoothed.plain = _no_plain  # type: ignore[attr-defined]  # (every call hands the kernel its column scale)
        return smoothed


def _no_plain(x: torch.Tensor, input_act: str | None = None) -> None:
    """A bound call's ``plain`` where it has no plain signatures (see ``Layout.bind_linear``)."""
    return None


def _smooth(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x * p``: what a smoothed layer's kernel quantizes (its outlier channels divided out)."""
    return x * p.to(device=x.device, dtype=x.dtype)


def _kernel(x: torch.Tensor, w_q: torch.Tensor, params: FormatParams, bias: torch.Tensor | None) -> torch.Tensor:
    spec = params.format
    if params.pre_quant_scale is not None:
        x = _smooth(x, params.pre_quant_scale)
    scales, opts = spec.kernel_args(params.stored(w_q), params.layer_params)
    return dispatch.quant_linear(x, spec.kernel_kind, w_q, scales, bias, opts=opts, out_dtype=x.dtype,
                                 backend=params.backend)


@register_layout_op(aten.linear.default, FormatLayout)
def _linear(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, bias = linear_args(args, kwargs)
    if isinstance(x, QuantizedTensor) or not isinstance(w, QuantizedTensor) or w.params.transposed:
        return fallback(func, w.layout_cls if isinstance(w, QuantizedTensor) else FormatLayout, args, kwargs)
    if w.params.full_precision or w.params.format.kernel_kind is None:
        return weight_only_linear(x, w, bias)
    return _kernel(x, w.qdata, w.params, bias)


def _matmul_weight(b: Any) -> torch.Tensor | None:
    """The ``[N, K]`` storage when ``b`` is the logical ``[K, N]`` right operand of ``a @ b``."""
    if not isinstance(b, QuantizedTensor) or b.params.full_precision or b.params.format.kernel_kind is None:
        return None
    if b.params.transposed:
        return b.qdata
    spec = b.params.format
    if b.params.pre_quant_scale is not None:
        return None  # the smoothing scales x's columns before the kernel; dequantized matmul applies them itself
    if not spec.rotated and b.params.weight_scale is not None and b.params.weight_scale.numel() == 1 \
            and tuple(b.qdata.shape) == tuple(b.shape):
        return b.qdata.t()  # a storage-transposed scalar-scaled weight
    return None  # per-row scales belong to b's rows (K), not its output columns


@register_layout_op(aten.mm.default, FormatLayout)
@register_layout_op(aten.addmm.default, FormatLayout)
def _mm(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    bias, a, b = matmul_operands(func, args)
    w_q = _matmul_weight(b)
    plain_scaling = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
    layout = b.layout_cls if isinstance(b, QuantizedTensor) else FormatLayout
    if w_q is None or isinstance(a, QuantizedTensor) or isinstance(bias, QuantizedTensor) or not plain_scaling:
        return fallback(func, layout, args, kwargs)
    if bias is not None and bias.dim() != 1:
        return fallback(func, layout, args, kwargs)
    return _kernel(a, w_q.contiguous(), b.params, bias)


_CLASSES: dict[str, type[FormatLayout]] = {}


def layout_class(comfy_format: str) -> type[FormatLayout]:
    """The runtime layout of a ComfyUI ``format`` string, created and registered on first use.

    It is registered under the ``format`` string and under every registry format (CLI name) stored that way,
    so ``QuantizedTensor.from_float(w, "int8-rot")`` picks that format's layout.
    """
    cls = _CLASSES.get(comfy_format)
    if cls is None:
        formats = FORMATS.for_comfy_format(comfy_format)
        if not formats:
            raise KeyError(f"no registered format is stored as {comfy_format!r}")
        cls_name = _class_name(comfy_format)
        cls = type(cls_name, (FormatLayout,),
                   {"name": comfy_format, "kernel_kind": formats[0].kernel_kind or "",
                    "default_format": formats[0].name, "__module__": __name__, "__qualname__": cls_name})
        _CLASSES[comfy_format] = cls
        register_layout(comfy_format, cls)
    for spec in FORMATS.for_comfy_format(comfy_format):
        if spec.name not in REGISTRY.layouts:
            register_layout(spec.name, cls)  # from_float(w, "int8-rot") passes fmt="int8-rot" (see tensor.py)
    return cls


def _class_name(comfy_format: str) -> str:
    return "Layout_" + "".join(ch if ch.isalnum() else "_" for ch in comfy_format)


def __getattr__(name: str) -> type[FormatLayout]:
    """Module attributes ``Layout_<format>``: pickle finds generated layout classes by name (PEP 562)."""
    for comfy_format in FORMATS.comfy_formats():
        if _class_name(comfy_format) == name:
            return layout_class(comfy_format)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layout_for_format(fmt: str | QuantFormat) -> type[FormatLayout]:
    """The runtime layout class that stores registry format ``fmt`` (the ComfyUI ``format`` string's)."""
    spec = get_format(fmt)
    if spec.comfy_format is None:
        raise UserError(f"format '{spec.name}' is a plain cast, not a quantized format")
    return layout_class(spec.comfy_format)


def register_all() -> None:
    """Create the layouts of every format registered so far."""
    for comfy_format in sorted(FORMATS.comfy_formats()):
        layout_class(comfy_format)
