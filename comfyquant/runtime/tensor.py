"""``QuantizedTensor``: a ``torch.Tensor`` wrapper subclass holding quantized storage plus frozen layout params.

It reports the logical shape and dtype of the float tensor it stands for. ``__torch_function__`` routes
``F.linear`` to the layout's fast path before torch decomposes it; ``__torch_dispatch__`` looks an aten op up in
the generic table, then in the layout's table, then dequantizes and runs the op (logged once per op and
layout). ``__tensor_flatten__``/``__tensor_unflatten__`` let ``torch.compile`` trace through it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

logger = logging.getLogger("comfyquant.runtime")

Handler = Callable[[Any, tuple, dict], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class LayoutParams:
    """Parameters every layout carries: the logical dtype and shape, and the kernel backend override.

    Layout subclasses add fields; tensor-valued fields (scales) are found by value, so a field that may be
    ``None`` (an optional ``input_scale``) is simply not a tensor then.
    """

    orig_dtype: torch.dtype
    orig_shape: tuple[int, ...]
    backend: str | None = None

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """The tensor-valued fields by name."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
        return out

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayoutParams:
        """A copy with ``fn`` applied to every tensor field (device moves, clones)."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensor_fields().items()})

    def replace(self, **changes: Any) -> LayoutParams:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class Layout:
    """How one quantized format stores, dequantizes, serializes and reshapes a weight.

    ``name`` is the ComfyUI ``format`` string the layout reads and writes. Subclasses implement the
    classmethods below; they hold no per-instance or mutable state.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[LayoutParams]] = LayoutParams
    kernel_kind: ClassVar[str] = ""  # the kernel kind (kernels.registry) whose backends run this layout

    @classmethod
    def quantize(cls, tensor: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, LayoutParams]:
        """Float tensor -> (storage, params)."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: LayoutParams) -> torch.Tensor:
        """(storage, params) -> float tensor of the logical shape, in ``params.orig_dtype``."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], *,
                        shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, LayoutParams]:
        """Validate stored tensors (``weight``, ``weight_scale``, ...) for ``layer``; UserError on mismatch."""
        raise NotImplementedError

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: LayoutParams) -> dict[str, torch.Tensor]:
        """Key suffix (``weight``, ``weight_scale``, ...) -> tensor, exactly as the file stores them."""
        raise NotImplementedError

    @classmethod
    def comfy_quant(cls, params: LayoutParams) -> dict[str, Any]:
        """The ``comfy_quant`` JSON object for a layer in this layout."""
        return {"format": cls.name}

    @classmethod
    def requantize_kwargs(cls, params: LayoutParams) -> dict[str, Any]:
        """``quantize`` keyword arguments that reproduce this layout's options (for copy_ from float)."""
        return {}

    @classmethod
    def view_params(cls, qdata: torch.Tensor, params: LayoutParams,
                    shape: tuple[int, ...]) -> LayoutParams | None:
        """Params for a view of the logical tensor as ``shape``, or None if the layout cannot express it."""
        return None

    @classmethod
    def transpose_params(cls, qdata: torch.Tensor, params: LayoutParams) -> tuple[torch.Tensor, LayoutParams] | None:
        """(storage, params) of the logical 2-D transpose, or None if the layout cannot express it."""
        return None

    @classmethod
    def bind_linear(cls, qdata: torch.Tensor, params: LayoutParams,
                    bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``x -> F.linear(x, weight, bias)`` with everything but ``x`` resolved once (a layer's eager fast
        path), or None where the layout has none (the layer then goes through its linear handler per call). The
        function's ``plain(x, input_act=None)`` gives the output of a call with no side path or norm from a plan
        made by an earlier call of its signature, else None (``dispatch.bind_linear``'s; always None where there
        are no plans)."""
        return None


class Registry:
    """Append-only registration tables: layouts by name, generic ops, per-layout ops.

    Like torch's own op tables these are registrations, not settings; nothing here changes how an already
    registered op behaves. ``_logged`` only deduplicates fallback log lines.
    """

    def __init__(self) -> None:
        self.layouts: dict[str, type[Layout]] = {}
        self.generic_ops: dict[Any, Handler] = {}
        self.layout_ops: dict[Any, dict[type[Layout], Handler]] = {}
        self._logged: set[tuple[str, str]] = set()

    def add_layout(self, name: str, cls: type[Layout]) -> None:
        if name in self.layouts and self.layouts[name] is not cls:
            raise ValueError(f"layout '{name}' is already registered as {self.layouts[name].__name__}")
        self.layouts[name] = cls

    def layout(self, name: str) -> type[Layout]:
        try:
            return self.layouts[name]
        except KeyError:
            raise KeyError(f"unknown layout '{name}'; registered: {', '.join(sorted(self.layouts))}") from None

    def add_generic_op(self, op: Any, handler: Handler) -> None:
        if op in self.generic_ops:
            raise ValueError(f"generic handler for {op} already registered")
        self.generic_ops[op] = handler

    def add_layout_op(self, op: Any, layout_cls: type[Layout], handler: Handler) -> None:
        table = self.layout_ops.setdefault(op, {})
        if layout_cls in table:
            raise ValueError(f"{op} is already registered for layout {layout_cls.__name__}")
        table[layout_cls] = handler

    def find_layout_op(self, op: Any, layout_cls: type[Layout]) -> Handler | None:
        """The handler registered for ``op`` on ``layout_cls`` or its nearest base class."""
        table = self.layout_ops.get(op)
        if table:
            for klass in layout_cls.__mro__:
                if klass in table:
                    return table[klass]
        return None

    def note_fallback(self, op: Any, layout_cls: type[Layout]) -> None:
        """Log the first dequantizing fallback of each (op, layout) pair."""
        key = (str(op), layout_cls.name or layout_cls.__name__)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("comfyquant: no %s handler for layout %s; dequantizing to run it", *key)


REGISTRY = Registry()


def register_layout(name: str, cls: type[Layout]) -> type[Layout]:
    """Make a layout available by its format name (``QuantizedTensor.from_float(t, name)``, the loader)."""
    REGISTRY.add_layout(name, cls)
    return cls


def register_layout_op(op: Any, layout_cls: type[Layout]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(func, args, kwargs)`` runs ``op`` when a ``layout_cls`` tensor is involved."""
    def deco(fn: Handler) -> Handler:
        REGISTRY.add_layout_op(op, layout_cls, fn)
        return fn
    return deco


def register_generic_op(*ops: Any) -> Callable[[Handler], Handler]:
    """Decorator for layout-agnostic handlers ``handler(func, args, kwargs)`` (detach, clone, to, ...)."""
    def deco(fn: Handler) -> Handler:
        for op in ops:
            REGISTRY.add_generic_op(op, fn)
        return fn
    return deco


def _resolve_layout(layout: str | type[Layout]) -> type[Layout]:
    return REGISTRY.layout(layout) if isinstance(layout, str) else layout


class QuantizedTensor(torch.Tensor):
    """Quantized storage ``qdata`` + frozen ``params`` of a ``Layout``, seen by torch as a float tensor."""

    _qdata: torch.Tensor
    _params: LayoutParams
    _layout_cls: type[Layout]

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, layout: str | type[Layout], params: LayoutParams) -> QuantizedTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, params.orig_shape, dtype=params.orig_dtype, device=qdata.device, requires_grad=False,
        )

    def __init__(self, qdata: torch.Tensor, layout: str | type[Layout], params: LayoutParams) -> None:
        self._qdata = qdata
        self._layout_cls = _resolve_layout(layout)
        self._params = params

    # ---- accessors -------------------------------------------------------------------------------------
    @property
    def qdata(self) -> torch.Tensor:
        return self._qdata

    @property
    def params(self) -> LayoutParams:
        return self._params

    @property
    def layout_cls(self) -> type[Layout]:
        return self._layout_cls

    @property
    def layout_name(self) -> str:
        return self._layout_cls.name

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._qdata.dtype

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes actually held (storage plus scales), not the logical size."""
        return self._qdata.nbytes + sum(t.nbytes for t in self._params.tensor_fields().values())

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, layout={self.layout_name}, "
                f"storage={self._qdata.dtype}, device={self._qdata.device})")

    # ---- construction / conversion ---------------------------------------------------------------------
    @classmethod
    def from_float(cls, tensor: torch.Tensor, layout: str | type[Layout], **kwargs: Any) -> QuantizedTensor:
        """Quantize a float tensor with ``layout`` (a registered layout name or class).

        A name registered for a layout under another name (a registry format such as ``int8-rot``, stored as
        ``int8_tensorwise``) is passed on as ``fmt=name``, selecting that format within the layout.
        """
        layout_cls = _resolve_layout(layout)
        if isinstance(layout, str) and layout != layout_cls.name:
            kwargs.setdefault("fmt", layout)
        qdata, params = layout_cls.quantize(tensor, **kwargs)
        return cls(qdata, layout_cls, params)

    def dequantize(self) -> torch.Tensor:
        """The float tensor this stands for, in its logical shape and dtype."""
        return self._layout_cls.dequantize(self._qdata, self._params)

    def with_parts(self, qdata: torch.Tensor | None = None, params: LayoutParams | None = None) -> QuantizedTensor:
        """A new tensor sharing this layout with replaced storage and/or params."""
        return QuantizedTensor(self._qdata if qdata is None else qdata, self._layout_cls,
                               self._params if params is None else params)

    def state_dict_tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> tensor as stored on disk (``weight``, ``weight_scale``, optional ``input_scale``)."""
        return self._layout_cls.state_dict_tensors(self._qdata, self._params)

    def comfy_quant(self) -> dict[str, Any]:
        """The layer's ``comfy_quant`` JSON object."""
        return self._layout_cls.comfy_quant(self._params)

    def data_ptr(self) -> int:  # type: ignore[override]
        return self._qdata.data_ptr()

    def __deepcopy__(self, memo: dict) -> QuantizedTensor:
        """Deep copy of storage and scales (``copy.deepcopy(model)``); a Parameter stays a Parameter."""
        if id(self) in memo:
            return memo[id(self)]
        out: torch.Tensor = QuantizedTensor(copy.deepcopy(self._qdata, memo), self._layout_cls,
                                            self._params.map_tensors(lambda t: copy.deepcopy(t, memo)))
        if getattr(self, "_is_param", False):
            out = torch.nn.Parameter(out, requires_grad=self.requires_grad)
        memo[id(self)] = out
        return out  # type: ignore[return-value]

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Pickle (``torch.save``) as storage + layout + params; a wrapper subclass has no storage of its own."""
        return (_rebuild_quantized, (self._qdata, self._layout_cls, self._params,
                                     bool(getattr(self, "_is_param", False)), self.requires_grad))

    # ---- torch.compile protocol ------------------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        tensors = self._params.tensor_fields()
        for name, value in tensors.items():
            object.__setattr__(self, f"_p_{name}", value)
        static = tuple((f.name, getattr(self._params, f.name)) for f in dataclasses.fields(self._params)
                       if f.name not in tensors)
        return ["_qdata", *(f"_p_{n}" for n in tensors)], (self._layout_cls, type(self._params), static)

    def _stable_hash_for_caching(self) -> str:
        """Process-independent key of the metadata (not the values) for torch.compile's AOT cache."""
        def meta(t: torch.Tensor) -> str:
            return f"{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.device.type}"

        _, (layout_cls, params_cls, static) = self.__tensor_flatten__()
        parts = [layout_cls.__module__, layout_cls.__qualname__, params_cls.__qualname__, repr(static),
                 meta(self._qdata), *(f"{k}={meta(v)}" for k, v in self._params.tensor_fields().items())]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx: tuple, outer_size: Any,
                             outer_stride: Any) -> QuantizedTensor:
        layout_cls, params_cls, static = ctx
        fields = dict(static)
        fields.update({k[3:]: v for k, v in inner.items() if k.startswith("_p_")})
        return QuantizedTensor(inner["_qdata"], layout_cls, params_cls(**fields))

    # ---- dispatch --------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, QuantizedTensor):
                handler = REGISTRY.find_layout_op(torch.ops.aten.linear.default, weight._layout_cls)
                if handler is not None:
                    return handler(torch.ops.aten.linear.default, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = REGISTRY.generic_ops.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        layout_cls = _first_layout(args)
        if layout_cls is not None:
            handler = REGISTRY.find_layout_op(func, layout_cls)
            if handler is not None:
                return handler(func, args, kwargs)
            REGISTRY.note_fallback(func, layout_cls)
        return run_dequantized(func, args, kwargs)


def _rebuild_quantized(qdata: torch.Tensor, layout_cls: type[Layout], params: LayoutParams, is_param: bool,
                       requires_grad: bool) -> torch.Tensor:
    out: torch.Tensor = QuantizedTensor(qdata, layout_cls, params)
    return torch.nn.Parameter(out, requires_grad=requires_grad) if is_param else out


def _first_layout(args: Any) -> type[Layout] | None:
    for a in args:
        if isinstance(a, QuantizedTensor):
            return a._layout_cls
        if isinstance(a, (list, tuple)):
            found = _first_layout(a)
            if found is not None:
                return found
    return None


def dequantize_args(obj: Any) -> Any:
    """Replace every QuantizedTensor inside (nested) args/kwargs by its dequantized tensor."""
    if isinstance(obj, QuantizedTensor):
        return obj.dequantize()
    if isinstance(obj, dict):
        return {k: dequantize_args(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(dequantize_args(a) for a in obj)
    return obj


def run_dequantized(func: Any, args: tuple, kwargs: dict) -> Any:
    """The fallback: run ``func`` on dequantized copies of every quantized argument."""
    return func(*dequantize_args(args), **dequantize_args(kwargs))

