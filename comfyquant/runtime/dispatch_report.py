"""``describe_dispatch(model, *example_inputs)``: which kernel backend each quantized layer runs, and why.

Runs one forward (no grad) with a pre-hook on every ``QuantLinear`` that asks the same choice the layer's call
makes (the kernel kind's cost model for this device, input shape, the layer's pinned backend or policy, and
the rank of a dynamic LoRA's low-rank term it hands the kernel; ``dense_copy``: a 16-bit copy under the policy's
copy budget, ``runtime.kernels.dense_copy``), and an observer on every sibling / gated group
for the GEMMs it runs for its members; returns one row per GEMM call. ``format_dispatch`` renders the rows as a
table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.gated import GatedForward
from comfyquant.runtime.kernels.acts import GATED, ModulatedNorm, apply_input_act
from comfyquant.runtime.kernels.backends import BackendChoice
from comfyquant.runtime.kernels.dispatch import choose_backend, copy_choice, folds_norm
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import kernel_kind
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.siblings import ArmedForward, SiblingGroup


@dataclass(frozen=True)
class LayerDispatch:
    """One layer call: its name, kernel kind, (M, N, K), the backend chosen for it, and what it applies to its
    input first (``folded``: a folded activation or RMSNorm, and whether that backend's kernel applies it or torch
    does before it; empty for none)."""

    layer: str
    kind: str
    m: int
    n: int
    k: int
    backend: str
    reason: str
    folded: str = ""


def _folded(kind: str, backend: str, scales: tuple, opts: tuple, act: str | None, norm: Any, low_rank: bool,
            x: torch.Tensor, w: Any) -> str:
    """``"rms_norm: in the kernel"`` / ``"layer_mod: torch first"`` (a DiT block's modulated LayerNorm;
    ``"layer_norm"`` a folded affine one) / ``"gelu_tanh: torch first"`` / ``""`` for a
    call of ``x`` on weight ``w`` by ``backend`` with input activation ``act`` or a norm (``acts.RowNorm``,
    ``acts.ModulatedNorm``: in the kernel where ``dispatch.folds_norm`` says so; a low-rank term reads the normed
    x: the norm is applied in torch)."""
    if act is None and norm is None:
        return ""
    b = kernel_kind(kind).backends.get(backend)
    if norm is not None:
        inside = not low_rank and b is not None and folds_norm(b, scales, opts, x, w, norm)
        what = (("layer_norm" if norm.rows == 0 else "layer_mod") if isinstance(norm, ModulatedNorm)
                else "rms_norm")
        return f"{what}: {'in the kernel' if inside else 'torch first'}"
    inside = b is not None and b.fuses_input_act and (act not in GATED or b.fuses_gated_act)
    return f"{act}: {'in the kernel' if inside else 'torch first'}"


def _kind_and_args(w: Any) -> tuple[str, tuple, tuple[int, ...]]:
    """The kernel kind, scales and static opts a quantized weight's format passes to the kernel table."""
    p = w.params
    spec = p.format
    scales, opts = spec.kernel_args(p.stored(w.qdata), p.layer_params)
    return spec.kernel_kind, tuple(scales), tuple(opts)


def _choice(name: str, x: torch.Tensor, w: Any, n: int, k: int, low_rank: Any, act: str | None,
            norm: Any) -> LayerDispatch:
    """The row of one GEMM call: ``x`` as the kernel is handed it (after a folded activation), weight ``w``
    (its pinned backend or policy), the low-rank term's operands (None: none), what it applies first."""
    kind, scales, opts = _kind_and_args(w)
    pinned = w.params.backend
    policy = pinned if isinstance(pinned, DispatchPolicy) else None
    override = None if policy is not None or pinned is None else pinned
    rank = 0 if low_rank is None else int(low_rank[0].shape[0])
    copied = copy_choice(x, kind, w.qdata, opts, policy, rank, act is not None or norm is not None)
    choice: BackendChoice = copied or choose_backend(x, kind=kind, n=n, k=k, override=override, opts=opts,
                                                   policy=policy, low_rank=rank)
    m = x.numel() // k
    return LayerDispatch(name, kind, m, n, k, choice.name, choice.reason,
                         _folded(kind, choice.name, scales, opts, act, norm, low_rank is not None, x, w))


def _groups(model: nn.Module) -> dict[int, tuple[str, SiblingGroup]]:
    """id -> (parent path, group) of every sibling or gated group whose parent's forward runs it."""
    out = {}
    for path, mod in model.named_modules():
        fwd = mod.__dict__.get("forward")
        groups = fwd.groups if isinstance(fwd, ArmedForward) else (fwd.group,) if isinstance(fwd, GatedForward) \
            else ()
        for g in groups:
            out[id(g)] = (path, g)
    return out


def describe_dispatch(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> list[LayerDispatch]:
    """Run ``model(*example_inputs, **example_kwargs)`` once and report each quantized GEMM call's backend: one row
    per ``QuantLinear`` call, and one per fused GEMM of sibling projections (``runtime.siblings``: named
    ``parent.q+k+v``) or of a gated MLP's input projections (``runtime.gated``), which replaces the rows of the
    members it computed."""
    rows: list[LayerDispatch | None] = []
    hooks = []
    groups = _groups(model)
    # id(member) -> (its row, its group's fused GEMMs before its call, whether its output waited in the stash)
    marks: dict[int, tuple[int, int, bool]] = {}

    def hook(name: str):
        def pre(mod: QuantLinear, args: tuple) -> None:
            # what the kernel sees: the input after a folded activation (a gated one halves its width)
            act = getattr(mod, "input_act", None)
            x, w = apply_input_act(args[0], act), mod.qweight
            # a dynamic LoRA's low-rank part goes to the kernel (``nn.run_linear``) except on smoothed layers
            ops = getattr(getattr(mod, "adapter", None), "fused_operands", None)
            low_rank = ops(x) if ops is not None and getattr(w.params, "pre_quant_scale", None) is None else None
            rows.append(_choice(name, x, w, mod.out_features, mod.in_features, low_rank, act, mod.norm_for_call()))
            sib = getattr(mod, "sibling", None)
            if sib is not None and sib[0].armed:  # served by a fused GEMM: its view waits, or it leads one now
                marks[id(mod)] = (len(rows) - 1, sib[0].fused_calls, sib[0].waiting(sib[1], args[0]))

        def post(mod: QuantLinear, args: tuple, out: Any) -> None:
            mark = marks.pop(id(mod), None)
            if mark is not None and (mark[2] or mod.sibling[0].fused_calls > mark[1]):
                rows[mark[0]] = None  # the fused GEMM's row stands for it

        return pre, post

    def observe(g: SiblingGroup, plan: tuple[int, ...], w: Any, bias: Any, x: torch.Tensor, term: Any,
                norm: Any) -> None:
        path = groups[id(g)][0]
        name = f"{path}.{'+'.join(g.names[i] for i in plan)}" if path else "+".join(g.names[i] for i in plan)
        low_rank = None if term is None else term.fused_operands(x)
        rows.append(_choice(name, x, w, int(w.shape[0]), int(x.shape[-1]), low_rank, None, norm))

    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.weight is not None:
            pre, post = hook(name)
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    for _, g in groups.values():
        g.observer = observe
    try:
        with torch.no_grad():
            model(*example_inputs, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
        for _, g in groups.values():
            g.observer = None
    return [r for r in rows if r is not None]


def format_dispatch(rows: list[LayerDispatch]) -> str:
    """A markdown table of :func:`describe_dispatch` rows."""
    lines = ["| layer | kind | M | K→N | backend | input first | why |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.kind} | {r.m} | {r.k}→{r.n} | {r.backend} | {r.folded or '-'} | {r.reason} |"
              for r in rows]
    return "\n".join(lines)
