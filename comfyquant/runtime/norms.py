"""Fold a norm into the quantized linears it feeds (``QuantLinear.input_norm``).

T5's ``layer_norm -> SelfAttention (q, k, v)`` / ``-> DenseReluDense (wi_0, wi_1)`` and Llama-style
``input_layernorm -> self_attn`` / ``post_attention_layernorm -> mlp`` run the norm as its own kernels (ComfyUI's
``T5LayerNorm``: five elementwise launches) and write the normed activation, which the quantized linears read
again. Per-row activation quantization cancels an RMSNorm's row factor, so the int8 / fp8 activation quantizer
applies the norm for the cost of a sum of squares in the pass it makes anyway (``act_kernels.quantize_rows``):
codes of ``x * weight``, the factor ``rsqrt(mean(x²) + eps)`` in the row scale the GEMM epilogue multiplies by.
An affine LayerNorm (CLIP's ``layer_norm1`` / ``layer_norm2``, SDXL's transformer blocks) is not a row factor; the
quantizers that hold a row in registers apply it as the modulated LayerNorm of DiT blocks with one shared row
(``acts.shared_layer_norm``), where the kernel for the call's shape can (``KernelBackend.fuses_mod``).

Which modules fold is a table of known classes (:data:`NORM_FOLDS`, :data:`CONSUMER_INPUTS`), each with the
module it is defined in: folding is only right where the consumer reads its input through the listed linears
alone (and its shape), which a class's code says and a name does not. The norm module itself is checked on a
probe (its output must be ``acts.rms_norm`` of its weight and eps; of ``1 + weight`` where the class says ``add``,
Gemma's norms; ``layer_norm`` with its weight, bias and eps for a LayerNorm). The norm's slot gets
:class:`FoldedNorm` (the input passes through; the same Parameters under the same state-dict keys, so loads and
weight patches reach the layers, which read them per call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from comfyquant.runtime.kernels.acts import MODULATED_MAX_K, RowNorm, rms_norm
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import kernel_kind
from comfyquant.runtime.layouts.generic import FormatParams
from comfyquant.runtime.nn import NormSource, QuantLinear

_T5 = ("comfy.text_encoders.t5", "comfyquant.bench.blocks")
_LLAMA = ("comfy.text_encoders.llama", "comfyquant.bench.blocks")
_CLIP = ("comfy.clip_model", "comfyquant.bench.blocks")
# ComfyUI's SDXL transformer block (comfy.ldm.modules.attention) is not listed: it hands the normed input to
# attention patches and, with disable_self_attn, attn1 reads the context in to_k / to_v (the node pack folds it
# with a fallback for such calls, nodes.unet_blocks); the bench model's block of the same name and layout reads
# its norms through the listed linears only
_BENCH = ("comfyquant.bench.blocks",)
# parent class -> (modules it may be defined in, ((norm child, consumer child), ...))
NORM_FOLDS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "T5LayerSelfAttention": (_T5, (("layer_norm", "SelfAttention"),)),
    "T5LayerFF": (_T5, (("layer_norm", "DenseReluDense"),)),
    "TransformerBlock": (_LLAMA, (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))),
    # Gemma 2 / 3 (Lumina 2's and LTX-2's text encoders): its post-attention / post-feed-forward norms act on
    # outputs and stay; its norms scale by 1 + weight (``NormSource.offset``)
    "TransformerBlockGemma2": (_LLAMA, (("input_layernorm", "self_attn"), ("pre_feedforward_layernorm", "mlp"))),
    "CLIPLayer": (_CLIP, (("layer_norm1", "self_attn"), ("layer_norm2", "mlp"))),
    "BasicTransformerBlock": (_BENCH, (("norm1", "attn1"), ("norm2", "attn2"), ("norm3", "ff"))),
}
# consumer class -> (modules, the linears that read its input, dotted paths below it: every use of it besides
# its shape)
CONSUMER_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "T5Attention": (_T5, ("q", "k", "v")),
    "T5DenseGatedActDense": (_T5, ("wi_0", "wi_1")),
    "T5DenseActDense": (_T5, ("wi",)),
    "Attention": (_LLAMA, ("q_proj", "k_proj", "v_proj")),
    "MLP": (_LLAMA, ("gate_proj", "up_proj")),
    "CLIPAttention": (_CLIP, ("q_proj", "k_proj", "v_proj")),
    "CLIPMLP": (_CLIP, ("fc1",)),
    "SelfAttention": (_BENCH, ("to_q", "to_k", "to_v")),
    "CrossAttention": (_BENCH, ("to_q",)),  # to_k / to_v read the text context
    "FeedForward": (_BENCH, ("net.0.proj",)),
}
# norm class -> (modules, the attribute holding its eps, whether it is a LayerNorm rather than an RMSNorm)
NORM_CLASSES: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "T5LayerNorm": (_T5, "variance_epsilon", False),
    "RMSNorm": (_LLAMA, "eps", False),
    "LayerNorm": (("torch.nn.modules.normalization", "comfy.ops"), "eps", True),
}


class NormSpec(NamedTuple):
    """A foldable norm: eps, ``offset`` (1 for Gemma's ``1 + weight`` RMSNorms) and whether it is a LayerNorm."""

    eps: float
    offset: float = 0.0
    layer: bool = False


class FoldedNorm(nn.Module):
    """A folded norm's stand-in: ``forward`` returns its input (the linears it fed apply the norm); it holds the
    norm's own Parameters (weight; a LayerNorm's bias) under the same keys, for state dicts, loads and weight
    patches, and one :class:`NormSource` its layers share (a derived tensor is made once for all of them)."""

    def __init__(self, norm: nn.Module, spec: NormSpec) -> None:
        super().__init__()
        for name in ("weight", "bias") if spec.layer else ("weight",):
            p = norm._parameters.get(name)
            if p is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, p)
        self.eps = float(spec.eps)
        self.offset = float(spec.offset)
        self.layer = spec.layer
        self.folded_from = type(norm).__name__
        self._source = NormSource(self, self.eps, self.offset, layer=self.layer)
        self.unfolded = 0  # > 0: for the calls inside :func:`unfolded`, the norm runs here and the layers skip it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unfolded:
            return x
        if self.layer:  # the module's own call (ComfyUI's LayerNorm casts its weight and bias to x's dtype)
            w, b = self.weight, self.bias
            return F.layer_norm(x, (x.shape[-1],), None if w is None else w.to(x.dtype),
                                None if b is None else b.to(x.dtype), self.eps)
        return rms_norm(x, self._source.row_norm())

    def source(self) -> NormSource:
        """What the layers it fed read per call (one object for all of them)."""
        return self._source

    def forget_derived(self) -> None:
        """Drop what its layers derived from the weights (:meth:`NormSource.forget`)."""
        self._source.forget()

    def extra_repr(self) -> str:
        if self.layer:
            scale = "layer_norm(weight, bias)"
        else:
            scale = f"{self.offset:g} + weight" if self.offset else "weight"
        return f"{self.folded_from}, eps={self.eps}, scale {scale}: applied by the linears it feeds"


@contextmanager
def unfolded(holders: Iterable[FoldedNorm]) -> Iterator[None]:
    """Within the block, each of ``holders`` computes its norm in torch as the module did and the layers it feeds
    apply none: for a call whose patches read the normed activation itself (ComfyUI's ``attn1_patch``)."""
    held = list(holders)
    for h in held:
        h.unfolded += 1
    try:
        yield
    finally:
        for h in held:
            h.unfolded -= 1


def _known(mod: nn.Module, table: dict) -> tuple | None:
    entry = table.get(type(mod).__name__)
    return entry if entry is not None and type(mod).__module__ in entry[0] else None


def norm_spec(norm: nn.Module) -> NormSpec | None:
    """The :class:`NormSpec` of a known norm class whose output on a probe is what the fold computes: an RMSNorm's
    ``acts.rms_norm`` with its weight (plus ``offset``: 1 for Gemma's ``add`` norms) and eps, a LayerNorm's
    ``layer_norm`` over its last dimension with its weight, bias and eps; else None (another class or
    computation, a weight not a vector, a LayerNorm wider than a quantizer holds in registers)."""
    entry = _known(norm, NORM_CLASSES)
    if entry is None:
        return None
    eps = getattr(norm, entry[1], None)
    if not isinstance(eps, float | int):
        return None
    if entry[2]:
        return _layer_norm_spec(norm, float(eps))
    w = norm._parameters.get("weight")
    if w is None or w.dim() != 1 or w.device.type == "meta":
        return None
    offset = 1.0 if getattr(norm, "add", False) is True else 0.0
    probe = _probe(w.numel(), w.device, w.dtype)
    with torch.no_grad():
        got = norm(probe).float()
        want = rms_norm(probe.float(), RowNorm(w.float() + offset, float(eps)))
    return NormSpec(float(eps), offset) if torch.allclose(got, want, rtol=2e-2, atol=2e-2) else None


def _probe(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(-3.0, 5.0, 2 * k, device=device).reshape(2, -1).to(dtype)


def _layer_norm_spec(norm: nn.Module, eps: float) -> NormSpec | None:
    shape = tuple(getattr(norm, "normalized_shape", ()))
    w, b = norm._parameters.get("weight"), norm._parameters.get("bias")
    if len(shape) != 1 or not 0 < shape[0] <= MODULATED_MAX_K:
        return None
    k = shape[0]
    for t in (w, b):
        if t is not None and (t.shape != (k,) or t.device.type == "meta" or not t.is_floating_point()):
            return None
    ref = next((t for t in (w, b) if t is not None), None)
    probe = _probe(k, torch.device("cpu") if ref is None else ref.device, torch.float32 if ref is None else ref.dtype)
    with torch.no_grad():
        got = norm(probe).float()
        want = F.layer_norm(probe.float(), (k,), None if w is None else w.float(), None if b is None else b.float(),
                            eps)
    return NormSpec(eps, 0.0, True) if torch.allclose(got, want, rtol=2e-2, atol=2e-2) else None


def weight_folds_norm(qt: torch.Tensor, layer: bool = False) -> bool:
    """Whether a quantized weight's activation quantizer can apply a norm (``layer``: an affine LayerNorm, for
    calls of many rows): a registered format with a backend that folds norms for it (unrotated int8, fp8 without
    a static input scale; a LayerNorm also int8-rot, its rows in registers) among those its pinned backend or
    policy allows (a layer pinned to ``dequant``, or the node pack's ``use_triton`` off, would apply the norm in
    torch per layer: more launches than the model's one norm for several layers)."""
    p = getattr(qt, "params", None)
    if not isinstance(p, FormatParams) or p.format.kernel_kind is None:
        return False
    scales, opts = p.format.kernel_args(p.stored(qt.qdata), p.layer_params)
    scales, opts = tuple(scales), tuple(opts)
    n, k = (int(d) for d in qt.shape)
    backends = kernel_kind(p.format.kernel_kind).backends.items()
    if layer:
        folding = [name for name, b in backends if b.fuses_mod is not None and b.fuses_mod(scales, opts, 4096, n, k)]
    else:
        folding = [name for name, b in backends if b.fuses_norm is not None and b.fuses_norm(scales, opts)]
    pinned = p.backend
    if isinstance(pinned, str):
        return pinned in folding
    if isinstance(pinned, DispatchPolicy) and pinned.allow:
        return any(name in pinned.allow for name in folding)
    return bool(folding)


def folds_into(path: str, layer: nn.Module | None, spec: NormSpec) -> bool:
    """Whether ``layer``'s activation quantizer can apply the norm ``spec``: a ``QuantLinear`` with no input
    activation or norm yet whose weight :func:`weight_folds_norm`."""
    if not isinstance(layer, QuantLinear) or layer.weight is None:
        return False
    if getattr(layer, "input_act", None) is not None or layer.__dict__.get("input_norm") is not None:
        return False
    return weight_folds_norm(layer.qweight, spec.layer)


def child_module(mod: nn.Module | None, dotted: str) -> nn.Module | None:
    """``mod``'s submodule at the dotted path ``dotted`` (``"net.0.proj"``), read from ``_modules``; None where one
    part is missing."""
    for part in dotted.split("."):
        mod = mod._modules.get(part) if mod is not None else None
    return mod


def child_modules(mod: nn.Module, names: Iterable[str]) -> list[nn.Module] | None:
    """``mod``'s submodules at the dotted paths ``names`` (:func:`child_module`), or None where one is missing."""
    out = [child_module(mod, n) for n in names]
    return None if any(m is None for m in out) else out  # type: ignore[return-value]


def foldable_norms(model: nn.Module, fits: Callable[[str, nn.Module | None, NormSpec], bool] = folds_into
                   ) -> list[tuple[str, str, str, tuple[str, ...], NormSpec]]:
    """``(parent path, norm child, consumer child, consumer's linears, spec)`` for every known norm whose
    consumer's input linears all ``fits(path, module, spec)`` (default :func:`folds_into`); nothing is changed."""
    out = []
    for path, parent in model.named_modules():
        entry = _known(parent, NORM_FOLDS)
        if entry is None:
            continue
        for norm_name, consumer_name in entry[1]:
            norm, consumer = parent._modules.get(norm_name), parent._modules.get(consumer_name)
            inputs = None if consumer is None else _known(consumer, CONSUMER_INPUTS)
            if norm is None or inputs is None:
                continue
            spec = norm_spec(norm)
            if spec is None:
                continue
            prefix = f"{path}.{consumer_name}." if path else f"{consumer_name}."
            if all(fits(prefix + n, child_module(consumer, n), spec) for n in inputs[1]):
                out.append((path, norm_name, consumer_name, inputs[1], spec))
    return out


def fold_norms(model: nn.Module, layer_norms: bool = True) -> list[str]:
    """Fold every :func:`foldable_norms` norm of ``model`` (affine LayerNorms only with ``layer_norms``) into its
    consumer's input linears; returns what was folded (``"encoder.block.0.layer.0.layer_norm -> SelfAttention.q,k,v"``)."""
    def fits(path: str, mod: nn.Module | None, spec: NormSpec) -> bool:
        return (layer_norms or not spec.layer) and folds_into(path, mod, spec)

    done = []
    for path, norm_name, consumer_name, names, spec in foldable_norms(model, fits):
        parent = model.get_submodule(path) if path else model
        holder = FoldedNorm(parent._modules[norm_name], spec)
        parent._modules[norm_name] = holder
        consumer = parent._modules[consumer_name]
        for n in names:
            child_module(consumer, n).input_norm = holder.source()
        prefix = f"{path}." if path else ""
        done.append(f"{prefix}{norm_name} -> {consumer_name}.{','.join(names)}")
    return done
