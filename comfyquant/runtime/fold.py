"""Fold activation modules into the quantized linear they feed (``QuantLinear.input_act``).

``nn.Sequential(..., nn.GELU(approximate="tanh"), QuantLinear, ...)`` (Flux's double-block MLPs, Wan's FFN)
and ``nn.Sequential(nn.SiLU(), QuantLinear)`` (time / modulation embedders) run the activation as its own
kernel: one more launch and a full read and write of the activation. Folded, the linear applies it itself,
inside its quantization pass or A-tile load on the GPU kernels, and with the same torch op as before on every
other path. The activation module's slot becomes ``nn.Identity`` (state dict keys do not change; hooks on the
replaced module are gone with it, and a forward pre-hook on the folded layer sees its input before the
activation). It assumes the ``nn.Sequential`` runs its members in order, which its ``forward`` does; a model
that calls the members one by one with other inputs in between needs ``fold_activations=False``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch import nn

from comfyquant.runtime.kernels.acts import act_of_module
from comfyquant.runtime.nn import QuantLinear


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


def _unfolded_quant_linear(path: str, mod: nn.Module) -> bool:
    return isinstance(mod, QuantLinear) and getattr(mod, "input_act", None) is None


def fold_input_activations(model: nn.Module) -> list[str]:
    """Fold every ``nn.Sequential`` pair (activation module, ``QuantLinear`` without an input activation yet)
    in ``model``; returns the folded layers' names (``"blocks.0.mlp.2: gelu_tanh"``)."""
    folded = []
    for act_path, layer_path, act in foldable_pairs(model, _unfolded_quant_linear):
        model.get_submodule(layer_path).input_act = act
        parent, _, key = act_path.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[key] = nn.Identity()
        folded.append(f"{layer_path}: {act}")
    return folded
