"""Where SmoothQuant's per-channel division of a linear layer's input can be folded, by architecture.

A :class:`SmoothGroup` is a set of linear layers that read the same input and the tensors of the op that
produces it, edited so that it emits ``x / s`` (the layers then store ``W diag(s)``). Foldable producers:
a norm's affine weight (and bias), the shift/scale rows of an adaLN modulation linear (Flux: ``(1 + scale)``
becomes ``(1 + scale) / s``), and a value projection's rows feeding the attention output projection (BERT;
attention is linear in V per channel). Everything else is refused per layer with the reason, so a file
never needs a custom loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceEdit:
    """One producer tensor edit: ``div`` divides a vector (or rows ``offset:offset+K`` of a matrix / bias)
    by s; ``one_plus`` does so for a modulation scale (weight rows / s, bias ``(1 + b) / s - 1``)."""

    tensor: str
    kind: str = "div"
    offset: int = 0


@dataclass(frozen=True)
class SmoothGroup:
    targets: tuple[str, ...]
    edits: tuple[SourceEdit, ...]
    producer: str


def _present(names: set[str], *tensors: str) -> bool:
    return all(t in names for t in tensors)


def _bert(layers: Iterable[str], names: set[str]) -> list[SmoothGroup]:
    """BERT's value projection feeds the attention output projection (attention is linear in V per channel).
    Its LayerNorms cannot be used: BERT is post-LN, the norm's output is also the residual stream."""
    out = []
    for layer in layers:
        m = re.fullmatch(r"(?P<p>.*?)encoder\.layer\.(?P<i>\d+)\.attention\.output\.dense", layer)
        if m:
            v = f"{m['p']}encoder.layer.{m['i']}.attention.self.value"
            if _present(names, f"{v}.weight", f"{v}.bias"):
                out.append(SmoothGroup((layer,), (SourceEdit(f"{v}.weight"), SourceEdit(f"{v}.bias")), v))
    return out


def _modulated(mod: str, targets: tuple[str, ...], shift: int, scale: int, hidden: int,
               names: set[str]) -> SmoothGroup | None:
    if not _present(names, f"{mod}.weight", f"{mod}.bias"):
        return None
    edits = (SourceEdit(f"{mod}.weight", "div", shift * hidden), SourceEdit(f"{mod}.bias", "div", shift * hidden),
             SourceEdit(f"{mod}.weight", "one_plus", scale * hidden),
             SourceEdit(f"{mod}.bias", "one_plus", scale * hidden))
    return SmoothGroup(targets, edits, mod)


def _flux(layers: Iterable[str], names: set[str], shapes: Mapping[str, tuple[int, ...]]) -> list[SmoothGroup]:
    out = []
    for layer in layers:
        hidden = shapes.get(f"{layer}.weight", (0, 0))[-1]
        m = re.fullmatch(r"(?P<b>.*?double_blocks\.\d+\.)(?P<s>img|txt)_(?P<kind>attn\.qkv|mlp\.0)", layer)
        if m:
            first = m["kind"] == "attn.qkv"
            g = _modulated(f"{m['b']}{m['s']}_mod.lin", (layer,), 0 if first else 3, 1 if first else 4, hidden, names)
            out += [g] if g else []
        m = re.fullmatch(r"(?P<b>.*?single_blocks\.\d+\.)linear1", layer)
        if m:
            g = _modulated(f"{m['b']}modulation.lin", (layer,), 0, 1, hidden, names)
            out += [g] if g else []
        m = re.fullmatch(r"(?P<b>.*?final_layer\.)linear", layer)
        if m:
            g = _modulated(f"{m['b']}adaLN_modulation.1", (layer,), 0, 1, hidden, names)
            out += [g] if g else []
    return out


def _prenorm(layers: Iterable[str], names: set[str]) -> list[SmoothGroup]:
    """T5 (``layer.0.layer_norm`` -> q/k/v, ``layer.1.layer_norm`` -> wi*) and Llama-style
    (``input_layernorm`` -> q/k/v_proj, ``post_attention_layernorm`` -> gate/up_proj): RMS norms, weight only."""
    out, seen = [], set()
    patterns = [
        (r"(?P<b>.*?)layer\.0\.SelfAttention\.[qkv]", "layer.0.layer_norm", "layer.0.SelfAttention.{}", "qkv"),
        (r"(?P<b>.*?)layer\.1\.DenseReluDense\.wi(_[01])?", "layer.1.layer_norm", "layer.1.DenseReluDense.{}",
         ("wi", "wi_0", "wi_1")),
        (r"(?P<b>.*?)self_attn\.[qkv]_proj", "input_layernorm", "self_attn.{}_proj", "qkv"),
        (r"(?P<b>.*?)mlp\.(gate|up)_proj", "post_attention_layernorm", "mlp.{}_proj", ("gate", "up")),
    ]
    for layer in layers:
        for pat, norm, tmpl, parts in patterns:
            m = re.fullmatch(pat, layer)
            if not m or (m["b"], norm) in seen:
                continue
            seen.add((m["b"], norm))
            targets = tuple(f"{m['b']}{tmpl.format(x)}" for x in parts if f"{m['b']}{tmpl.format(x)}.weight" in names)
            if f"{m['b']}{norm}.weight" in names and targets:
                out.append(SmoothGroup(targets, (SourceEdit(f"{m['b']}{norm}.weight"),), f"{m['b']}{norm}"))
    return out


def smoothing_groups(layers: Iterable[str], shapes: Mapping[str, tuple[int, ...]]
                     ) -> tuple[list[SmoothGroup], dict[str, str]]:
    """Groups for the given quantized ``layers`` of a checkpoint with these tensor ``shapes``, and the
    layers refused with the reason."""
    layers = list(layers)
    names = set(shapes)
    groups = _bert(layers, names) + _flux(layers, names, shapes) + _prenorm(layers, names)
    covered = {t for g in groups for t in g.targets}
    refused = {}
    for layer in layers:
        if layer in covered:
            continue
        if re.search(r"attention\.self\.(query|key|value)$|intermediate\.dense$", layer):
            why = "post-LN: the norm's output is also the residual stream, so it cannot emit x / s"
        elif re.search(r"(intermediate|mlp)\.|output\.dense$|linear2$|\.proj$|mlp\.2$|down_proj$|\.wo$|\.o$", layer):
            why = ("its input comes from a nonlinearity or from attention over values stored elsewhere; no "
                   "foldable op precedes it")
        else:
            why = "no norm or modulation of a known architecture feeds it"
        refused[layer] = f"SmoothQuant not applied: {why}"
    return groups, refused
