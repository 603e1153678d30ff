"""``describe_dispatch(model, *example_inputs)``: which kernel backend each quantized layer runs, and why.

Runs one forward (no grad) with a pre-hook on every ``QuantLinear`` that asks the same choice the layer's call
makes (the kernel kind's cost model for this device, input shape, the layer's pinned backend or policy, and
the rank of a dynamic LoRA's low-rank term it hands the kernel), and returns one row per layer call. ``format_dispatch`` renders the rows as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import GATED, apply_input_act
from comfyquant.runtime.kernels.backends import BackendChoice
from comfyquant.runtime.kernels.dispatch import choose_backend
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import kernel_kind
from comfyquant.runtime.nn import QuantLinear


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


def _folded(mod: QuantLinear, kind: str, backend: str, scales: tuple, opts: tuple) -> str:
    """``"rms_norm: in the kernel"`` / ``"gelu_tanh: torch first"`` / ``""`` for a layer call on ``backend``."""
    act, src = getattr(mod, "input_act", None), mod.__dict__.get("input_norm")
    if act is None and src is None:
        return ""
    b = kernel_kind(kind).backends.get(backend)
    if src is not None:
        inside = b is not None and b.fuses_norm is not None and b.fuses_norm(scales, opts)
        return f"rms_norm: {'in the kernel' if inside else 'torch first'}"
    inside = b is not None and b.fuses_input_act and (act not in GATED or b.fuses_gated_act)
    return f"{act}: {'in the kernel' if inside else 'torch first'}"


def _kind_and_args(w: Any) -> tuple[str, tuple, tuple[int, ...]]:
    """The kernel kind, scales and static opts a quantized weight's format passes to the kernel table."""
    p = w.params
    spec = p.format
    scales, opts = spec.kernel_args(p.stored(w.qdata), p.layer_params)
    return spec.kernel_kind, tuple(scales), tuple(opts)


def describe_dispatch(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> list[LayerDispatch]:
    """Run ``model(*example_inputs, **example_kwargs)`` once and report each ``QuantLinear`` call's backend."""
    rows: list[LayerDispatch] = []
    hooks = []

    def hook(name: str):
        def pre(mod: QuantLinear, args: tuple) -> None:
            # what the kernel sees: the input after a folded activation (a gated one halves its width)
            x, w = apply_input_act(args[0], getattr(mod, "input_act", None)), mod.qweight
            kind, scales, opts = _kind_and_args(w)
            pinned = w.params.backend
            policy = pinned if isinstance(pinned, DispatchPolicy) else None
            override = None if policy is not None or pinned is None else pinned
            n, k = mod.out_features, mod.in_features
            # a dynamic LoRA's low-rank part goes to the kernel (``nn.run_linear``) except on smoothed layers
            ops = getattr(getattr(mod, "adapter", None), "fused_operands", None)
            low_rank = ops(x) if ops is not None and getattr(w.params, "pre_quant_scale", None) is None else None
            choice: BackendChoice = choose_backend(x, kind=kind, n=n, k=k, override=override, opts=opts,
                                                   policy=policy, low_rank=0 if low_rank is None else
                                                   int(low_rank[0].shape[0]))
            rows.append(LayerDispatch(name, kind, x.numel() // k, n, k, choice.name, choice.reason,
                                      _folded(mod, kind, choice.name, scales, opts)))

        return pre

    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.weight is not None:
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(*example_inputs, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return rows


def format_dispatch(rows: list[LayerDispatch]) -> str:
    """A markdown table of :func:`describe_dispatch` rows."""
    lines = ["| layer | kind | M | K→N | backend | input first | why |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.kind} | {r.m} | {r.k}→{r.n} | {r.backend} | {r.folded or '-'} | {r.reason} |"
              for r in rows]
    return "\n".join(lines)
