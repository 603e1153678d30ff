"""Fold a gated MLP's activation and product into its down projection's quantizer (``QuantLinear.input_act``).

T5 v1.1 (``T5DenseGatedActDense``: ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``) and Llama / Qwen / Gemma-style MLPs
(``down_proj(act(gate_proj(x)) * up_proj(x))``) run the gate's activation and the product as two elementwise
kernels before the down projection quantizes their result. Folded, the module's ``forward`` becomes
``down(first(x) | second(x))``: the two input projections as one GEMM (``siblings.SiblingGroup.fused_product``;
their outputs side by side, the first's columns first) and the down projection applying ``gated_gelu_tanh`` or
``swiglu`` to that ``[..., 2K]`` input, inside its quantizer on the GPU kernels and with the model's own torch
ops on every other path.

Which modules fold is decided by running the module's own ``forward`` on a stand-in (its plain attributes, its
parameterless children, recorders for the three projections), never by names alone. The ``forward`` is set on
the instance (:func:`fold_gated_mlps`) or object-patched on a ComfyUI clone (``nodes.adapter``); the state dict
keys do not change.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import apply_input_act
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.siblings import ArmedForward, SiblingGroup, fusable

# (first input projection, second input projection, down projection): T5's and Llama-style MLPs' child names
GATED_MLP_NAMES: tuple[tuple[str, str, str], ...] = (("wi_0", "wi_1", "wo"), ("gate_proj", "up_proj", "down_proj"))
GATED_MLP_ACTS = ("gated_gelu_tanh", "swiglu")  # act(first) * second, as ``acts.apply_input_act`` computes them
# the fused output stands for the two outputs the unfolded forward holds anyway: no memory for a size cap to save
UNCAPPED = sys.maxsize

_X = torch.linspace(-2.0, 2.0, 24).reshape(3, 8)  # the probe's input, and what the two projections return
_FIRST = torch.linspace(-4.0, 4.0, 18).reshape(3, 6)
_SECOND = torch.linspace(2.5, -3.0, 18).reshape(3, 6)


class _Recorder:
    """A projection's stand-in: records its inputs and returns a fresh copy of ``out`` (None: of its input)."""

    def __init__(self, out: torch.Tensor | None) -> None:
        self.out = out
        self.inputs: list[object] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.inputs.append(v)
        y = (v if self.out is None else self.out).clone()
        self.outputs.append(y)
        return y


def _one_tensor_argument(mod: nn.Module) -> bool:
    """Whether the class's ``forward`` takes exactly one argument besides self (what the folded one takes)."""
    try:
        params = list(inspect.signature(type(mod).forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 2 and params[1].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def gated_act_of_module(mod: nn.Module, names: tuple[str, str, str]) -> str | None:
    """The gated activation (:data:`GATED_MLP_ACTS`) ``mod``'s forward applies between its projections ``names``,
    or None. Its class's ``forward`` is run on a stand-in holding its plain attributes and its other children
    (only parameterless ones; any with state: None), the two input projections recording stand-ins that return
    fixed probes, the down projection one that returns a copy of its input: it must call each projection once,
    the input ones on its own argument, and return exactly the down projection's output, whose input must equal
    ``apply_input_act(cat([first, second], -1), name)`` to a few ulps."""
    children = mod._modules
    if not all(isinstance(children.get(n), nn.Module) for n in names) or not _one_tensor_argument(mod):
        return None
    others = {k: m for k, m in children.items() if k not in names}
    if any(m is None or any(True for _ in m.parameters()) or any(True for _ in m.buffers())
           for m in others.values()):
        return None
    # a dropout that would drop anything in training mode: the folded forward has no place for it, so a later
    # ``train()`` would skip it silently (ComfyUI's T5 and Llama MLPs hold none)
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in others.values()):
        return None
    first, second, down = _Recorder(_FIRST), _Recorder(_SECOND), _Recorder(None)
    plain = {k: v for k, v in vars(mod).items() if not k.startswith("_")}
    stand_in = SimpleNamespace(**plain, **others, **dict(zip(names, (first, second, down), strict=True)))
    with torch.no_grad():
        try:
            y = type(mod).forward(stand_in, _X)  # type: ignore[arg-type]
        except Exception:  # a forward that needs more than the stand-in holds (or fails on it): not foldable
            return None
    if not (len(first.inputs) == len(second.inputs) == len(down.inputs) == 1 and first.inputs[0] is _X
            and second.inputs[0] is _X and y is down.outputs[0]):
        return None
    got = down.inputs[0]
    both = torch.cat([_FIRST, _SECOND], -1)
    for name in GATED_MLP_ACTS:
        want = apply_input_act(both, name)
        # to a few ulps, not bit for bit: the model's activation on its own 6-wide tensor and ours on one half of
        # a 12-wide one take different vector paths (ATen's AVX2 kernels: the last bit of tanh / exp differs, and
        # a bitwise test found no fold at all); erf-GELU is 4.6e-4 from the tanh form on these probes, far outside
        if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype \
                and torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return name
    return None


def gated_mlps(model: nn.Module, is_target: Callable[[str, nn.Module], bool]
               ) -> list[tuple[str, tuple[str, str, str], str]]:
    """``(module path, (first, second, down) child names, activation name)`` for every module of ``model`` with
    the children of a :data:`GATED_MLP_NAMES` triple, all three ``is_target(path, module)``, whose forward
    computes ``down(act(first(x)) * second(x))`` (:func:`gated_act_of_module`); nothing is changed."""
    out = []
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        for names in GATED_MLP_NAMES:
            kids = [mod._modules.get(n) for n in names]
            if any(k is None or not is_target(prefix + n, k) for n, k in zip(names, kids, strict=True)):
                continue
            act = gated_act_of_module(mod, names)
            if act is not None:
                out.append((path, names, act))
                break
    return out


def inputs_fuse(first: torch.Tensor, second: torch.Tensor, down: torch.Tensor, biases: tuple[bool, bool]) -> bool:
    """Whether the input projections' weights ``first`` / ``second`` (with / without biases) concatenate into
    one GEMM (``siblings.fusable``, equal widths and bias presence) whose output ``down``'s weight reads gated."""
    return (fusable([first, second]) and biases[0] == biases[1] and first.dim() == second.dim() == down.dim() == 2
            and first.shape[0] == second.shape[0] == down.shape[1])


class GatedForward:
    """A folded gated MLP's ``forward`` (on the instance, or a ComfyUI object patch): the down projection (its
    ``input_act`` the gated activation) of the input projections' outputs side by side, from one GEMM where
    they fuse (``group.fused_product``), else each computed alone and concatenated. Members are read from
    ``parent`` at call time (a ComfyUI clone's layers while its patches are applied)."""

    def __init__(self, parent: nn.Module, group: SiblingGroup, down: str) -> None:
        self.parent = parent
        self.group = group
        self.down = down

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        (x,) = (*args, *kwargs.values())  # the module's one argument (gated_act_of_module), however it is passed
        mods = self.parent._modules
        y = self.group.fused_product(x)
        if y is None:
            y = torch.cat([mods[n](x) for n in self.group.names], -1)  # type: ignore[misc]
        return mods[self.down](y)  # type: ignore[misc]


def gated_group(parent: nn.Module, names: tuple[str, str, str]) -> tuple[SiblingGroup, GatedForward]:
    """The input projections' group (its plan: both, on one input) and the folded forward of ``parent``."""
    group = SiblingGroup(parent, names[:2], UNCAPPED)
    group.plan = (0, 1)  # (diagnostics only: fused_product does not read it, and the group is never armed)
    return group, GatedForward(parent, group, names[2])


def _unfolded_layer(path: str, mod: nn.Module) -> bool:
    return isinstance(mod, QuantLinear) and mod.weight is not None and getattr(mod, "input_act", None) is None


def _release(parent: nn.Module, names: tuple[str, str]) -> bool:
    """Clear an ``ArmedForward`` of ``parent`` whose groups hold only ``names`` (the gated fold wins over plain
    sibling fusion); False when another forward is set on the instance (the module is left alone)."""
    before = parent.__dict__.get("forward")
    if before is None:
        return True
    if not isinstance(before, ArmedForward) or any(set(g.names) - set(names) for g in before.groups):
        return False
    for g in before.groups:
        for n in g.names:
            parent._modules[n].sibling = None  # type: ignore[union-attr]
    del parent.forward
    return True


def fold_gated_mlps(model: nn.Module) -> list[str]:
    """Fold every gated MLP of ``model`` (:func:`gated_mlps`) whose three layers are ``QuantLinear`` without an
    input activation and whose input projections fuse (:func:`inputs_fuse`): sets the down projection's
    ``input_act``, the input projections' ``sibling`` and the module's ``forward`` (a :class:`GatedForward` on
    the instance). A module whose forward something else set is left alone. Returns ``"mlp.wo: gated_gelu_tanh"``
    for each."""
    done = []
    for path, names, act in gated_mlps(model, _unfolded_layer):
        parent = model.get_submodule(path) if path else model
        first, second, down = (parent._modules[n] for n in names)
        if not inputs_fuse(first.weight, second.weight, down.weight,  # type: ignore[union-attr, arg-type]
                           (first.bias is not None, second.bias is not None)):  # type: ignore[union-attr]
            continue
        if not _release(parent, names[:2]) or first.sibling is not None or second.sibling is not None:  # type: ignore[union-attr]
            continue
        group, forward = gated_group(parent, names)
        first.sibling, second.sibling = (group, 0), (group, 1)  # type: ignore[union-attr]
        down.input_act = act  # type: ignore[union-attr]
        parent.forward = forward
        done.append(f"{path}.{names[2]}: {act}" if path else f"{names[2]}: {act}")
    return done
