"""Input activations a quantized linear can apply to its input itself (``QuantLinear.input_act``).

A model's ``GELU(tanh) -> Linear`` or ``SiLU -> Linear`` pair costs a separate elementwise kernel that reads
and writes the whole activation; the W8A8 / W8A16 / FP8 kernels can apply it while they read x instead (the
GEMM's quantizer or A-tile load). Every backend that does not fuse it gets ``apply_input_act(x)`` first, in
x's dtype, exactly as the model computed it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> the code the Triton kernels take as a constexpr (0: none)
INPUT_ACTS: dict[str, int] = {"gelu_tanh": 1, "gelu": 2, "silu": 3}


def act_code(name: str | None) -> int:
    """The kernels' constexpr code of ``name`` (0 for None); ValueError for an unknown name."""
    if name is None:
        return 0
    code = INPUT_ACTS.get(name)
    if code is None:
        raise ValueError(f"unknown input activation {name!r}; expected one of {sorted(INPUT_ACTS)}")
    return code


def apply_input_act(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """``name``'s activation of ``x`` in x's dtype (as ``nn.GELU`` / ``nn.SiLU`` compute it); x for None."""
    if name is None:
        return x
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown input activation {name!r}; expected one of {sorted(INPUT_ACTS)}")


def act_of_module(mod: torch.nn.Module) -> str | None:
    """The input activation name of an activation module (``nn.GELU`` either approximation, ``nn.SiLU``), or
    None for any other module (including subclasses, whose forward may differ)."""
    if type(mod) is torch.nn.GELU:
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    if type(mod) is torch.nn.SiLU:
        return "silu"
    return None
