"""Input activations a quantized linear can apply to its input itself (``QuantLinear.input_act``).

A model's ``GELU(tanh) -> Linear`` or ``SiLU -> Linear`` pair costs a separate elementwise kernel that reads
and writes the whole activation; the W8A8 / W8A16 / FP8 kernels can apply it while they read x instead (the
GEMM's quantizer or A-tile load). Every backend that does not fuse it gets ``apply_input_act(x)`` first, in
x's dtype, exactly as the model computed it.

Gated activations (:data:`GATED`) halve the width: ``swiglu`` is ``silu(x[..., :K]) * x[..., K:]`` on a
``[..., 2K]`` input (Flux.2's MLP: ``Linear(d, 2h), SiLUActivation(), Linear(h, d)``); only the activation
quantizers fuse those (they read the gate and the up half of each row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> the code the Triton kernels take as a constexpr (0: none)
INPUT_ACTS: dict[str, int] = {"gelu_tanh": 1, "gelu": 2, "silu": 3, "swiglu": 4}
GATED = frozenset({"swiglu"})  # input [..., 2K] -> [..., K]
SWIGLU = INPUT_ACTS["swiglu"]


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
    if name == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown input activation {name!r}; expected one of {sorted(INPUT_ACTS)}")


# classes of parameterless SwiGLU modules (ComfyUI's comfy.ldm.flux.layers.SiLUActivation: Flux.2's MLP)
SWIGLU_CLASS_NAMES = frozenset({"SiLUActivation"})


def act_of_module(mod: torch.nn.Module) -> str | None:
    """The input activation name of an activation module (``nn.GELU`` either approximation, ``nn.SiLU``, a
    SwiGLU module of :data:`SWIGLU_CLASS_NAMES` whose output on a probe is ``silu(first half) * second half``),
    or None for any other module (including subclasses of the torch ones, whose forward may differ)."""
    if type(mod) is torch.nn.GELU:
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    if type(mod) is torch.nn.SiLU:
        return "silu"
    if type(mod).__name__ in SWIGLU_CLASS_NAMES and _computes_swiglu(mod):
        return "swiglu"
    return None


def _computes_swiglu(mod: torch.nn.Module) -> bool:
    """Whether a module without parameters or buffers maps a probe exactly as ``apply_input_act(x, "swiglu")``."""
    if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
        return False
    x = torch.linspace(-4.0, 4.0, 24).reshape(3, 8)
    with torch.no_grad():
        try:
            y = mod(x)
        except (RuntimeError, TypeError, ValueError):  # not a one-tensor elementwise module: not foldable
            return False
    return isinstance(y, torch.Tensor) and torch.equal(y, apply_input_act(x, "swiglu"))
