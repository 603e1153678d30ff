"""Fold activation modules into the quantized linear they feed (``QuantLinear.input_act``).

``nn.Sequential(..., nn.GELU(approximate="tanh"), QuantLinear, ...)`` (Flux's double-block MLPs, Wan's FFN)
and ``nn.Sequential(nn.SiLU(), QuantLinear)`` (time / modulation embedders) run the activation as its own
kernel: one more launch and a full read and write of the activation. Folded, the linear applies it itself,
inside its quantization pass or A-tile load on the GPU kernels, and with the same torch op as before on every
other path. The activation module's slot becomes ``nn.Identity`` (state dict keys do not change; hooks on the
replaced module are gone with it, and a forward pre-hook on the folded layer sees its input before the
activation). It assumes the ``nn.Sequential`` runs its members in order, which its ``forward`` does; a model
that calls the members one by one with other inputs in between needs ``fold_activations=False``.

A projection module with its activation (SD1.x / SDXL's ``GEGLU``: ``x, gate = proj(x).chunk(2); x *
gelu(gate)``; LTXV's ``GELU_approx``: ``gelu(proj(x), "tanh")``) followed by the layer (past zero-probability
dropouts) folds too: the module is replaced by :class:`ProjectionOnly` (its ``proj`` alone, same keys) and the
layer applies the activation (``geglu`` on the doubled width).

A gated MLP module (T5's ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``, Llama-style ``down_proj(silu(gate_proj(x)) *
up_proj(x))``) folds its activation and product into the down projection and runs its two input projections as
one GEMM (``runtime.gated``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from comfyquant.runtime.gated import fold_gated_mlps
from comfyquant.runtime.kernels.acts import act_of_module, projected_act_of_module
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.norms import fold_norms


def foldable_pairs(model: nn.Module, is_target: Callable[[str, nn.Module], bool]) -> list[tuple[str, str, str]]:
    """``(activation module path, layer path, activation name)`` for every ``nn.Sequential`` pair in ``model``
    of an activation module followed by a layer ``is_target(path, module)`` accepts; nothing is changed."""
    out = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        for (key_a, a), (key_b, b) in itertools.pairwise(seq._modules.items()):
            act = act_of_module(a) if a is not None else None
            if act is not None and b is not None and is_target(prefix + key_b, b):
                out.append((prefix + key_a, prefix + key_b, act))
    return out


def foldable_projections(model: nn.Module, is_target: Callable[[str, nn.Module], bool]) -> list[tuple[str, str, str]]:
    """``(projection module path, layer path, activation name)`` for every ``nn.Sequential`` member that is a
    projection with its activation (``acts.projected_act_of_module``: SD1.x / SDXL's ``GEGLU``, LTXV's ``GELU_approx``)
    followed, past ``nn.Dropout(p=0)`` members only, by a layer ``is_target(path, module)`` accepts; nothing is
    changed."""
    out = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        members = [(k, m) for k, m in seq._modules.items() if m is not None]
        for i, (key, mod) in enumerate(members):
            act = projected_act_of_module(mod)
            if act is None:
                continue
            rest = members[i + 1:]
            while rest and type(rest[0][1]) is nn.Dropout and rest[0][1].p == 0:
                rest = rest[1:]
            if rest and is_target(prefix + rest[0][0], rest[0][1]):
                out.append((prefix + key, prefix + rest[0][0], act))
    return out


class ProjectionOnly(nn.Module):
    """A folded projection module's stand-in: its ``proj`` child alone (same state-dict keys); its activation
    is applied by the next layer."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _unfolded_quant_linear(path: str, mod: nn.Module) -> bool:
    return isinstance(mod, QuantLinear) and getattr(mod, "input_act", None) is None


def fold_input_activations(model: nn.Module, gated: bool = True, norms: bool = True,
                           layer_norms: bool = True) -> list[str]:
    """Fold every ``nn.Sequential`` pair (activation module, ``QuantLinear`` without an input activation yet)
    in ``model``, with ``gated`` every gated MLP (``runtime.gated.fold_gated_mlps``: its input projections
    then run as one GEMM) and with ``norms`` every norm ``runtime.norms`` knows before quantized linears (its
    affine LayerNorms only with ``layer_norms``);
    returns what was folded (``"blocks.0.mlp.2: gelu_tanh"``, ``"layer.0.layer_norm -> SelfAttention.q,k,v"``)."""
    folded = fold_norms(model, layer_norms) if norms else []
    for act_path, layer_path, act in foldable_pairs(model, _unfolded_quant_linear):
        model.get_submodule(layer_path).input_act = act
        parent, _, key = act_path.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[key] = nn.Identity()
        folded.append(f"{layer_path}: {act}")
    for proj_path, layer_path, act in foldable_projections(model, _unfolded_quant_linear):
        model.get_submodule(layer_path).input_act = act
        parent, _, key = proj_path.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        holder._modules[key] = ProjectionOnly(holder._modules[key].proj)
        folded.append(f"{layer_path}: {act}")
    if gated:
        folded += fold_gated_mlps(model)
    return folded
