"""Fold activation modules into the quantized linear they feed (``QuantLinear.input_act``).

``nn.Sequential(..., nn.GELU(approximate="tanh"), QuantLinear, ...)`` (Flux's double-block MLPs, Wan's FFN)
and ``nn.Sequential(nn.SiLU(), QuantLinear)`` (time / modulation embedders) run the activation as its own
kernel: one more launch and a full read and write of the activation. Folded, the linear applies it itself,
inside its quantization pass or A-tile load on the GPU kernels, and with the same torch op as before on every
other path. The activation module's slot becomes ``nn.Identity`` (state dict keys do not change; hooks on the
replaced module are gone with it).
"""

from __future__ import annotations

import itertools

from torch import nn

from comfyquant.runtime.kernels.acts import act_of_module
from comfyquant.runtime.nn import QuantLinear


def fold_input_activations(model: nn.Module) -> list[str]:
    """Fold every ``nn.Sequential`` pair (activation module, ``QuantLinear`` without an input activation yet)
    in ``model``; returns the folded layers' names (``"blocks.0.mlp.2: gelu_tanh"``)."""
    folded = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq._modules.items())
        for (key_a, a), (key_b, b) in itertools.pairwise(items):
            act = act_of_module(a) if a is not None else None
            if act is None or not isinstance(b, QuantLinear) or getattr(b, "input_act", None) is not None:
                continue
            b.input_act = act
            seq._modules[key_a] = nn.Identity()
            folded.append(f"{name + '.' if name else ''}{key_b}: {act}")
    return folded
