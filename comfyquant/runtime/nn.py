"""``QuantLinear``: an ``nn.Linear`` replacement whose weight is a ``QuantizedTensor``.

``forward`` computes ``F.linear(x, weight, bias)`` through the same registry lookup the tensor's
``__torch_function__`` does (the layout's linear handler, else plain ``F.linear``). The module's
state dict is the on-disk form (``weight`` storage, ``weight_scale``, optional ``input_scale``, ``comfy_quant``),
so ``state_dict()`` writes back what ``load_quantized`` read and ``load_state_dict`` reads it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import decode_comfy_quant, encode_comfy_quant
from comfyquant.runtime.kernels.acts import Norm, RowNorm, apply_input_act, rms_norm, shared_layer_norm
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import backends_for
from comfyquant.runtime.tensor import REGISTRY, Layout, QuantizedTensor
from comfyquant.runtime.versions import version

_LINEAR = torch.ops.aten.linear.default

# Key suffixes a quantized layer may own besides ``bias``.
QUANT_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "comfy_quant")


def check_backend(layout: type[Layout], backend: str | DispatchPolicy | None) -> None:
    """Refuse a backend name that cannot run ``layout`` (whether the device can run it is checked per call);
    a ``DispatchPolicy`` (automatic choice under that policy) is always accepted."""
    if backend is None or isinstance(backend, DispatchPolicy):
        return
    choices = backends_for(layout.kernel_kind)
    if backend not in choices:
        raise UserError(f"backend {backend!r} is not one of {', '.join(choices)} for {layout.name} layers")


def layout_of(layer: str, conf: dict[str, Any]) -> type[Layout]:
    """The runtime layout of a stored layer's ``comfy_quant`` (a registered layout, or one built from the
    format registry); UserError naming the layer for formats nothing reads."""
    name = str(conf.get("format"))
    layout = REGISTRY.layouts.get(name)
    if layout is not None:
        return layout
    from comfyquant.runtime.layouts import layout_class

    try:
        return layout_class(name)
    except KeyError:
        raise UserError(f"layer {layer}: unsupported quantization format {conf.get('format')!r}; "
                        f"this runtime reads {', '.join(sorted(REGISTRY.layouts))}") from None


def linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` through the layout's linear handler, called directly: saves torch's override
    protocol on every call, and lets torch.compile trace into the layout's kernel call."""
    handler = REGISTRY.find_layout_op(_LINEAR, w.layout_cls)
    return F.linear(x, w, bias) if handler is None else handler(_LINEAR, (x, w, bias), {})


BOUND_ATTR = "_comfyquant_bound"  # (bias, bound call) on a QuantizedTensor weight: see bound_linear


def bound_linear(w: QuantizedTensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> linear(x, w, bias)`` for eager calls, resolved once per (weight, bias) pair, or None where the
    layout has no such fast path. The layout's ``bind_linear`` fixes the format's kernel arguments and backend
    choice, which otherwise cost several µs of Python per call (host time is what small layers lose to bf16 in
    eager mode). Kept on the weight tensor (it dies with it; a new weight or bias object binds again);
    in-place updates of either are seen."""
    b = getattr(w, BOUND_ATTR, None)
    if b is not None and b[0] is bias:
        return b[1]
    fn = w.layout_cls.bind_linear(w.qdata, w.params, bias)
    setattr(w, BOUND_ATTR, (bias, fn))
    return fn


def run_linear(fn: Callable[..., torch.Tensor] | None, x: torch.Tensor, w: QuantizedTensor,
               bias: torch.Tensor | None, adapter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
               input_act: str | None = None, norm: Norm | None = None) -> torch.Tensor:
    """The layer's output for ``input_act(x)`` (or ``rms_norm(x)``, ``norm``: a folded norm): the bound call
    ``fn`` (None: the handler path) plus the ``adapter`` side path. Without an adapter the bound call applies
    ``input_act`` / ``norm`` itself (inside the kernel where the backend can); an adapter reads the activated
    x, so it is computed first then. An adapter with ``fused_operands(x)`` (dynamic LoRAs) hands its low-rank
    part to the bound call, whose kernel adds it in the GEMM epilogue where it can, and then adds the rest with
    ``adapter.rest(x, y)``."""
    if fn is not None and adapter is None:
        if norm is not None:
            return fn(x, None, input_act, norm)
        return fn(x) if input_act is None else fn(x, None, input_act)
    if norm is not None:
        x = rms_norm(x, norm)
    x = apply_input_act(x, input_act)
    if fn is None:
        y = linear(x, w, bias)
        return y if adapter is None else adapter(x, y)
    operands = getattr(adapter, "fused_operands", None)
    low_rank = None if operands is None else operands(x)
    if low_rank is None:
        return adapter(x, fn(x))
    return adapter.rest(x, fn(x, low_rank))  # type: ignore[attr-defined]


class NormSource:
    """A folded norm as a layer reads it per call: the module holding its weight (``runtime.norms``'s stand-in,
    under the norm's own state-dict key, so a loaded or patched weight is the one used) and its eps. An RMSNorm,
    or with ``offset`` Gemma's, which scales by ``1 + weight``; or (``layer``) an affine LayerNorm, its weight
    and bias as one shared ``acts.ModulatedNorm`` row. A tensor derived from the weights is kept while they stay
    the same objects, storage and versions; an inference tensor (ComfyUI's weights) has no version counter, so
    there the objects and storage decide: ComfyUI patches a weight by setting a new one, except under its
    ``weight_inplace_update`` option, which writes one in place; the node pack calls :meth:`forget` at each
    load for that (``nodes.patching``)."""

    __slots__ = ("_sum", "eps", "holder", "layer", "offset")

    def __init__(self, holder: nn.Module, eps: float, offset: float = 0.0, *, layer: bool = False) -> None:
        self.holder = holder
        self.eps = float(eps)
        self.offset = float(offset)
        self.layer = layer
        self._sum: tuple[tuple, tuple, Norm] | None = None  # (weight's state, bias's state, derived norm)

    def for_call(self) -> Norm | None:
        """The norm a layer applies on this call: :meth:`row_norm`, or None while the holder computes the norm
        itself (``FoldedNorm.unfolded``: a call whose patches read the normed input)."""
        return None if self.holder.__dict__.get("unfolded") else self.row_norm()

    def row_norm(self) -> Norm:
        """The norm: an ``acts.RowNorm``, or for a LayerNorm the shared ``acts.ModulatedNorm``."""
        params = self.holder._parameters
        w = params.get("weight")
        if not self.layer and (not self.offset or w is None):
            return RowNorm(w, self.eps)  # read as it is: nothing derived
        b = params.get("bias") if self.layer else None
        if torch.compiler.is_compiling():  # traced: derived in the graph (no cache to mutate)
            return self._derive(w, b)
        s = self._sum
        if s is None or not (_same(s[0], w) and _same(s[1], b)):
            s = self._sum = (_state(w), _state(b), self._derive(w, b))
        return s[2]

    def forget(self) -> None:
        """Drop the derived tensor: the next call derives it from the weights as they are (after an in-place
        write its checks cannot see)."""
        self._sum = None

    def _derive(self, w: torch.Tensor | None, b: torch.Tensor | None) -> Norm:
        if self.layer:
            k = next(t for t in (w, b) if t is not None).shape[0]
            return shared_layer_norm(w, b, k, self.eps)
        return RowNorm(w.detach() + self.offset, self.eps)  # in the weight's dtype, as the model


def _state(t: torch.Tensor | None) -> tuple:
    """What a tensor derived from ``t`` depends on: the object (held, so its id is not reused), its storage (a
    move swaps ``.data``) and its version (-1 for an inference tensor: see :class:`NormSource`)."""
    return (None, 0, 0) if t is None else (t, t.data_ptr(), version(t))


def _same(state: tuple, t: torch.Tensor | None) -> bool:
    """Whether ``t`` is still what :func:`_state` recorded (by identity: tensors' ``==`` is elementwise)."""
    if t is None:
        return state[0] is None
    return state[0] is t and state[1] == t.data_ptr() and state[2] == version(t)


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight ``[out_features, in_features]`` and a float bias.

    ``quant_conf`` is the layer's ``comfy_quant`` object as read from a file (kept verbatim so a state dict
    round trip writes the same bytes); None means "derive it from the weight's layout".
    """

    # ``(group, index)`` when the layer is a member of a ``runtime.siblings.SiblingGroup`` (its product may come
    # from one GEMM shared with its sibling projections); a class default, so an unset layer pays one lookup.
    sibling: tuple[Any, int] | None = None
    # Whether ``forward`` casts the bias to the input's dtype before the kernel (a fused group does what its
    # members do).
    bias_in_input_dtype: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: QuantizedTensor | None = None, quant_conf: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None
        if weight is not None:
            if tuple(weight.shape) != (out_features, in_features):
                raise ValueError(f"weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
            self.weight = nn.Parameter(weight, requires_grad=False)
        else:
            self.register_parameter("weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.quant_conf = dict(quant_conf) if quant_conf is not None else None
        # Optional side path ``adapter(x, y) -> y`` run after the quantized product (dynamic LoRAs,
        # ``comfyquant.lora.apply``); a plain object, never part of the state dict. None costs one attribute read.
        self.adapter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # The activation this layer applies to its input first (``acts.INPUT_ACTS`` name; None: none): set by
        # ``fold_input_activations``, which replaces the model's separate activation module, so the kernels can
        # apply it while they read x. Structural, like ``adapter``: not in the state dict.
        self.input_act: str | None = None
        # An RMSNorm this layer applies to its input first (``runtime.norms``: the model's norm module, folded;
        # ``NormSource.row_norm()`` reads its weight at call time). Structural, not in the state dict.
        self.input_norm: NormSource | None = None
        # The norm the current call applies first, handed over by ``normed`` for that call only (a DiT block's
        # modulated LayerNorm, ``runtime.modulation``); None between calls.
        self.call_norm: Norm | None = None
        # Logical dtype / device a weight loaded into this (still empty) layer gets.
        self.load_dtype = weight.dtype if weight is not None else (dtype or torch.float32)
        self.load_device = torch.device(device) if device is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str | type[Layout], **quant_kwargs: Any) -> QuantLinear:
        """Quantize an ``nn.Linear``'s weight with ``layout`` (keyword options go to the layout's quantize)."""
        w = linear.weight.detach()
        qt = QuantizedTensor.from_float(w, layout, **quant_kwargs)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, weight=qt,
                  device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return mod

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def qweight(self) -> QuantizedTensor:
        w = self._parameters["weight"]
        if w is None:
            raise RuntimeError("QuantLinear has no weight yet (load a state dict into it first)")
        return w  # type: ignore[return-value]

    @property
    def backend(self) -> str | DispatchPolicy | None:
        """The kernel backend this layer asks for (None: chosen per call by capability and shape)."""
        return None if self.weight is None else self.qweight.params.backend

    def set_backend(self, backend: str | DispatchPolicy | None) -> None:
        """Pin this layer's kernel backend (a name from ``kernels.registry.backends_for(kind)``), steer its
        automatic choice with a ``DispatchPolicy``, or unpin it (None)."""
        qt = self.qweight
        check_backend(qt.layout_cls, backend)
        self.weight = nn.Parameter(qt.with_parts(params=qt.params.replace(backend=backend)), requires_grad=False)

    def comfy_quant(self) -> dict[str, Any]:
        """The ``comfy_quant`` object this layer writes."""
        return dict(self.quant_conf) if self.quant_conf is not None else self.qweight.comfy_quant()

    def extra_repr(self) -> str:
        fmt = "unloaded" if self.weight is None else self.qweight.layout_name
        extra = ""
        if self.weight is not None:
            p = self.qweight.params
            name = getattr(p, "fmt", None)
            if name is not None and name != fmt:
                extra += f" ({name})"
            for key, value in getattr(p, "fmt_params", ()):
                extra += f", {key}={value}"
            scale = getattr(p, "weight_scale", None)
            if scale is not None and not getattr(p, "block_size", None):
                extra += ", scale=" + ("tensor" if scale.numel() == 1 else "row")
        if getattr(self, "input_act", None) is not None:
            extra += f", input_act={self.input_act}"
        if getattr(self, "input_norm", None) is not None:
            extra += ", input_norm=rms_norm"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={fmt}{extra}, backend={self.backend or 'auto'}")

    # ---- compute ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one pass over the layer's state, bound_linear's cache check and run_linear's common case inline: the
        # Python above the kernel is what host-bound layers lose to bf16 (``benchmarks/host_python.py``)
        sib = self.sibling
        if sib is not None and sib[0].armed:
            y = sib[0].product(sib[1], x)
            if y is not None:  # its side path (dynamic LoRAs) included
                return y
        d = self.__dict__  # (older pickles lack input_norm / call_norm)
        norm = d.get("call_norm")
        if norm is None:
            src = d.get("input_norm")
            norm = None if src is None else src.for_call()
        params = d["_parameters"]
        w, bias, adapter, act = params["weight"], params["bias"], d.get("adapter"), d.get("input_act")
        if w is None:
            w = self.qweight  # (raises: no weight loaded yet)
        if torch.compiler.is_compiling():
            return run_linear(None, x, w, bias, adapter, act, norm)  # type: ignore[arg-type]
        b = getattr(w, BOUND_ATTR, None)
        fn = b[1] if b is not None and b[0] is bias else bound_linear(w, bias)  # type: ignore[arg-type]
        if adapter is None and fn is not None:
            if norm is not None:
                return fn(x, None, act, norm)
            return fn(x) if act is None else fn(x, None, act)
        return run_linear(fn, x, w, bias, adapter, act, norm)  # type: ignore[arg-type]

    def norm_for_call(self) -> Norm | None:
        """The norm this call applies first: the one :meth:`normed` handed over, else the layer's folded RMSNorm
        (``input_norm``), else None."""
        d = self.__dict__  # (older pickles lack input_norm)
        if d.get("call_norm") is not None:
            return d["call_norm"]
        src = d.get("input_norm")
        return None if src is None else src.for_call()

    def takes_norm(self) -> bool:
        """Whether :meth:`normed` can hand a norm to this layer's quantizer: no input activation or folded norm of
        its own, not a member of a fused sibling group (the group's GEMM reads the input as given)."""
        return (self.sibling is None and getattr(self, "input_act", None) is None
                and self.__dict__.get("input_norm") is None)

    def normed(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        """The layer's output for ``norm`` applied to ``x`` (``acts.RowNorm`` / ``acts.ModulatedNorm``): in the
        activation quantizer where the chosen kernel folds it, else in torch first (``acts.rms_norm``). The call
        goes through the module (its hooks run, seeing x before the norm, as on a layer with a folded norm)."""
        if not self.takes_norm():
            return self(rms_norm(x, norm))
        d = self.__dict__  # (not nn.Module.__setattr__: its type checks cost more than the rest of this method)
        d["call_norm"] = norm
        try:
            return self(x)
        finally:
            d["call_norm"] = None

    # ---- serialization ---------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.weight is not None:
            for suffix, t in self.qweight.state_dict_tensors().items():
                destination[prefix + suffix] = t
            destination[prefix + "comfy_quant"] = encode_comfy_quant(self.comfy_quant())
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _requantize_from(self, layer: str, w: torch.Tensor) -> None:
        qt = self.qweight
        if not w.is_floating_point() or tuple(w.shape) != tuple(qt.shape):
            raise UserError(f"layer {layer}: a weight without comfy_quant must be a float tensor of shape "
                            f"{tuple(qt.shape)} to be quantized into this layer, got {w.dtype} {tuple(w.shape)}")
        with torch.no_grad():
            qt.copy_(w.to(qt.device))  # in place: same storage and scale shapes, new values

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        layer = prefix[:-1]
        conf_t = state_dict.get(prefix + "comfy_quant")
        if conf_t is None:
            w = state_dict.get(prefix + "weight")
            if w is not None and self.weight is not None:
                self._requantize_from(layer, w)  # a float weight is quantized with this layer's format
            else:
                missing_keys.extend(prefix + s for s in ("weight", "comfy_quant") if prefix + s not in state_dict)
        else:
            conf = decode_comfy_quant(conf_t)
            layout = layout_of(layer, conf)
            tensors = {s: state_dict[prefix + s] for s in QUANT_SUFFIXES if prefix + s in state_dict}
            dtype = self.weight.dtype if self.weight is not None else self.load_dtype
            qdata, params = layout.from_state_dict(layer, tensors, conf, shape=(self.out_features, self.in_features),
                                                   dtype=dtype)
            backend = self.backend
            device = self.weight.device if self.weight is not None else (self.load_device or qdata.device)
            qt = QuantizedTensor(qdata, layout, params.replace(backend=backend)).to(device)
            self.weight = nn.Parameter(qt, requires_grad=False)
            self.quant_conf = conf
        if self.bias is not None:
            key = prefix + "bias"
            if key in state_dict:
                src = state_dict[key]
                if tuple(src.shape) != (self.out_features,):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(src.shape)}, "
                                      f"the layer has ({self.out_features},)")
                elif self.bias.is_meta or local_metadata.get("assign_to_params_buffers", False):
                    # an empty (meta) model, or load_state_dict(assign=True): take the tensor, in the layer's dtype
                    self.bias = nn.Parameter(src.to(self.bias.dtype), requires_grad=False)
                else:
                    with torch.no_grad():
                        self.bias.copy_(src)
            else:
                missing_keys.append(key)
        own = {prefix + s for s in (*QUANT_SUFFIXES, "bias")}
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in own and "." not in key[len(prefix):]:
                    unexpected_keys.append(key)
