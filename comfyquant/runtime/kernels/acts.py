"""Input activations a quantized linear can apply to its input itself (``QuantLinear.input_act``).

A model's ``GELU(tanh) -> Linear`` or ``SiLU -> Linear`` pair costs a separate elementwise kernel that reads
and writes the whole activation; the W8A8 / W8A16 / FP8 kernels can apply it while they read x instead (the
GEMM's quantizer or A-tile load). Every backend that does not fuse it gets ``apply_input_act(x)`` first, in
x's dtype, exactly as the model computed it.

Gated activations (:data:`GATED`) halve the width: ``swiglu`` is ``silu(x[..., :K]) * x[..., K:]`` on a
``[..., 2K]`` input (Flux.2's MLP: ``Linear(d, 2h), SiLUActivation(), Linear(h, d)``), ``geglu`` is
``x[..., :K] * gelu(x[..., K:])`` (SD1.x / SDXL feed-forwards: ``GEGLU`` projects and gates in one module,
:func:`gate_of_module`); only the activation quantizers fuse those (they read both halves of each row).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

# name -> the code the Triton kernels take as a constexpr (0: none)
INPUT_ACTS: dict[str, int] = {"gelu_tanh": 1, "gelu": 2, "silu": 3, "swiglu": 4, "geglu": 5}
GATED = frozenset({"swiglu", "geglu"})  # input [..., 2K] -> [..., K]
SWIGLU, GEGLU = INPUT_ACTS["swiglu"], INPUT_ACTS["geglu"]
GATED_CODES = frozenset(INPUT_ACTS[n] for n in GATED)


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
    if name == "geglu":
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)
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


# classes of projections whose forward is ``act(self.proj(x))``: ComfyUI's GEGLU (SD1.x / SDXL), GELU_approx
# (LTXV) and GELU (Qwen-Image, Hunyuan3D: ``approximate`` an attribute)
PROJECTION_CLASS_NAMES = frozenset({"GEGLU", "GELU_approx", "GELU"})
_PROJECTED = ("geglu", "gelu_tanh", "gelu", "silu")


def gate_of_module(mod: torch.nn.Module) -> str | None:
    """The activation a projection module applies after its ``proj`` child (``"geglu"``, ``"gelu_tanh"``, ...),
    or None: a module of :data:`PROJECTION_CLASS_NAMES` with ``proj`` as its only child and no parameters of its
    own, whose forward, run on a probe with ``proj`` standing for the identity (on a stand-in holding the
    module's plain attributes: the module itself is not touched), returns exactly one of those activations."""
    if type(mod).__name__ not in PROJECTION_CLASS_NAMES or [n for n, _ in mod.named_children()] != ["proj"]:
        return None
    if any(True for _ in mod.named_parameters(recurse=False)) or any(True for _ in mod.named_buffers(recurse=False)):
        return None
    x = torch.linspace(-4.0, 4.0, 24).reshape(3, 8)
    plain = {k: v for k, v in vars(mod).items() if not k.startswith("_")}
    stand_in = SimpleNamespace(**plain, proj=torch.nn.Identity())
    with torch.no_grad():
        try:
            y = type(mod).forward(stand_in, x)
        except (AttributeError, RuntimeError, TypeError, ValueError):  # its forward needs more than proj
            return None
    if not isinstance(y, torch.Tensor):
        return None
    return next((a for a in _PROJECTED if y.shape == apply_input_act(x, a).shape
                 and torch.equal(y, apply_input_act(x, a))), None)
