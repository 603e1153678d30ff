"""Fold an RMSNorm into the quantized linears it feeds (``QuantLinear.input_norm``).

T5's ``layer_norm -> SelfAttention (q, k, v)`` / ``-> DenseReluDense (wi_0, wi_1)`` and Llama-style
``input_layernorm -> self_attn`` / ``post_attention_layernorm -> mlp`` run the norm as its own kernels (ComfyUI's
``T5LayerNorm``: five elementwise launches) and write the normed activation, which the quantized linears read
again. Per-row activation quantization cancels the norm's row factor, so the int8 / fp8 activation quantizer
applies the norm for the cost of a sum of squares in the pass it makes anyway (``act_kernels.quantize_rows``):
codes of ``x * weight``, the factor ``rsqrt(mean(x²) + eps)`` in the row scale the GEMM epilogue multiplies by.

Which modules fold is a table of known classes (:data:`NORM_FOLDS`, :data:`CONSUMER_INPUTS`), each with the
module it is defined in: folding is only right where the consumer reads its input through the listed linears
alone (and its shape), which a class's code says and a name does not. The norm module itself is checked on a
probe (its output must be ``acts.rms_norm`` of its weight and eps; of ``1 + weight`` where the class says ``add``,
Gemma's norms). The norm's slot gets :class:`FoldedNorm` (the input passes through; the same weight Parameter under the same
state-dict key, so loads and weight patches reach the layers, which read it per call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import RowNorm, rms_norm
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import kernel_kind
from comfyquant.runtime.layouts.generic import FormatParams
from comfyquant.runtime.nn import NormSource, QuantLinear

_T5 = ("comfy.text_encoders.t5", "comfyquant.bench.blocks")
_LLAMA = ("comfy.text_encoders.llama", "comfyquant.bench.blocks")
# parent class -> (modules it may be defined in, ((norm child, consumer child), ...))
NORM_FOLDS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "T5LayerSelfAttention": (_T5, (("layer_norm", "SelfAttention"),)),
    "T5LayerFF": (_T5, (("layer_norm", "DenseReluDense"),)),
    "TransformerBlock": (_LLAMA, (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))),
    # Gemma 2 / 3 (Lumina 2's and LTX-2's text encoders): its post-attention / post-feed-forward norms act on
    # outputs and stay; its norms scale by 1 + weight (``NormSource.offset``)
    "TransformerBlockGemma2": (_LLAMA, (("input_layernorm", "self_attn"), ("pre_feedforward_layernorm", "mlp"))),
}
# consumer class -> (modules, the linears that read its input: every use of it besides its shape)
CONSUMER_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "T5Attention": (_T5, ("q", "k", "v")),
    "T5DenseGatedActDense": (_T5, ("wi_0", "wi_1")),
    "T5DenseActDense": (_T5, ("wi",)),
    "Attention": (_LLAMA, ("q_proj", "k_proj", "v_proj")),
    "MLP": (_LLAMA, ("gate_proj", "up_proj")),
}
# norm class -> (modules, the attribute holding its eps)
NORM_CLASSES: dict[str, tuple[tuple[str, ...], str]] = {
    "T5LayerNorm": (_T5, "variance_epsilon"),
    "RMSNorm": (_LLAMA, "eps"),
}


class FoldedNorm(nn.Module):
    """A folded RMSNorm's stand-in: ``forward`` returns its input (the linears it fed apply the norm); it holds
    the norm's own weight Parameter under the same key, for state dicts, loads and weight patches."""

    def __init__(self, norm: nn.Module, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        w = norm._parameters.get("weight")
        if w is None:
            self.register_parameter("weight", None)
        else:
            self.weight = w
        self.eps = float(eps)
        self.offset = float(offset)
        self.folded_from = type(norm).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def source(self) -> NormSource:
        """What the layers it fed read per call."""
        return NormSource(self, self.eps, self.offset)

    def extra_repr(self) -> str:
        scale = f"{self.offset:g} + weight" if self.offset else "weight"
        return f"{self.folded_from}, eps={self.eps}, scale {scale}: applied by the linears it feeds"


def _known(mod: nn.Module, table: dict) -> tuple | None:
    entry = table.get(type(mod).__name__)
    return entry if entry is not None and type(mod).__module__ in entry[0] else None


def norm_spec(norm: nn.Module) -> tuple[float, float] | None:
    """``(eps, offset)`` of a known RMSNorm class whose output on a probe is ``acts.rms_norm`` with its weight
    (plus ``offset``: 1 for Gemma's ``add`` norms, which scale by ``1 + weight``) and eps, else None (another
    class or computation, a weight not a vector)."""
    entry = _known(norm, NORM_CLASSES)
    w = norm._parameters.get("weight")
    if entry is None or w is None or w.dim() != 1 or w.device.type == "meta":
        return None
    eps = getattr(norm, entry[1], None)
    if not isinstance(eps, float | int):
        return None
    offset = 1.0 if getattr(norm, "add", False) is True else 0.0
    probe = torch.linspace(-3.0, 5.0, 2 * w.numel(), device=w.device).reshape(2, -1).to(w.dtype)
    with torch.no_grad():
        got = norm(probe).float()
        want = rms_norm(probe.float(), RowNorm(w.float() + offset, float(eps)))
    return (float(eps), offset) if torch.allclose(got, want, rtol=2e-2, atol=2e-2) else None


def weight_folds_norm(qt: torch.Tensor) -> bool:
    """Whether a quantized weight's activation quantizer can apply a norm: a registered format with a backend that
    folds norms for it (unrotated int8, fp8 without a static input scale) among those its pinned backend or
    policy allows (a layer pinned to ``dequant``, or the node pack's ``use_triton`` off, would apply the norm in
    torch per layer: more launches than the model's one norm for several layers)."""
    p = getattr(qt, "params", None)
    if not isinstance(p, FormatParams) or p.format.kernel_kind is None:
        return False
    scales, opts = p.format.kernel_args(p.stored(qt.qdata), p.layer_params)
    folding = [name for name, b in kernel_kind(p.format.kernel_kind).backends.items()
               if b.fuses_norm is not None and b.fuses_norm(tuple(scales), tuple(opts))]
    pinned = p.backend
    if isinstance(pinned, str):
        return pinned in folding
    if isinstance(pinned, DispatchPolicy) and pinned.allow:
        return any(name in pinned.allow for name in folding)
    return bool(folding)


def folds_into(path: str, layer: nn.Module | None) -> bool:
    """Whether ``layer``'s activation quantizer can apply a norm: a ``QuantLinear`` with no input activation or
    norm yet whose weight :func:`weight_folds_norm`."""
    if not isinstance(layer, QuantLinear) or layer.weight is None:
        return False
    if getattr(layer, "input_act", None) is not None or layer.__dict__.get("input_norm") is not None:
        return False
    return weight_folds_norm(layer.qweight)


def foldable_norms(model: nn.Module, fits: Callable[[str, nn.Module | None], bool] = folds_into
                   ) -> list[tuple[str, str, str, tuple[str, ...], tuple[float, float]]]:
    """``(parent path, norm child, consumer child, consumer's linears, (eps, offset))`` for every known norm whose
    consumer's input linears all ``fits(path, module)`` (default :func:`folds_into`); nothing is changed."""
    out = []
    for path, parent in model.named_modules():
        spec = _known(parent, NORM_FOLDS)
        if spec is None:
            continue
        for norm_name, consumer_name in spec[1]:
            norm, consumer = parent._modules.get(norm_name), parent._modules.get(consumer_name)
            inputs = None if consumer is None else _known(consumer, CONSUMER_INPUTS)
            if norm is None or inputs is None:
                continue
            prefix = f"{path}.{consumer_name}." if path else f"{consumer_name}."
            if not all(fits(prefix + n, consumer._modules.get(n)) for n in inputs[1]):
                continue
            spec = norm_spec(norm)
            if spec is not None:
                out.append((path, norm_name, consumer_name, inputs[1], spec))
    return out


def fold_norms(model: nn.Module) -> list[str]:
    """Fold every :func:`foldable_norms` norm of ``model`` into its consumer's input linears; returns what was
    folded (``"encoder.block.0.layer.0.layer_norm -> SelfAttention.q,k,v"``)."""
    done = []
    for path, norm_name, consumer_name, names, (eps, offset) in foldable_norms(model):
        parent = model.get_submodule(path) if path else model
        holder = FoldedNorm(parent._modules[norm_name], eps, offset)
        parent._modules[norm_name] = holder
        consumer = parent._modules[consumer_name]
        for n in names:
            consumer._modules[n].input_norm = holder.source()
        prefix = f"{path}." if path else ""
        done.append(f"{prefix}{norm_name} -> {consumer_name}.{','.join(names)}")
    return done
