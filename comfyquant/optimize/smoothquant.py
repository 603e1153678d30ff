"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, per input channel.

``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` over every layer of a group (they share the input); the
layers store ``W diag(s)`` and the producer emits ``x / s`` (``smooth_graph``). The output of the model is
unchanged in exact arithmetic; activations become easier to quantize per token. A :class:`SmoothPlan`
rewrites tensors as they stream through the converter and transforms each target layer's calibration
statistics to the smoothed input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from comfyquant.calibration.stats import LayerStats
from comfyquant.optimize.smooth_graph import SmoothGroup, SourceEdit, smoothing_groups

MIN_SCALE = 1e-5


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel ``s`` (float32); channels never active or with zero weights get ``s = 1``."""
    a = act_absmax.float().clamp_min(0)
    w = weight_absmax.float().clamp_min(0)
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp_min(MIN_SCALE), torch.ones_like(s))


@dataclass
class SmoothPlan:
    """Per-target input scales and the producer edits, applied tensor by tensor."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # target layer -> s [K]
    edits: dict[str, list[tuple[SourceEdit, torch.Tensor]]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    groups: list[SmoothGroup] = field(default_factory=list)

    def touches(self, tensor: str) -> bool:
        return tensor in self.edits or (tensor.endswith(".weight") and tensor.removesuffix(".weight") in self.scales)

    def rewrite(self, tensor: str, x: torch.Tensor) -> torch.Tensor:
        """The tensor as the smoothed model stores it (same dtype as given); untouched tensors pass through."""
        if not self.touches(tensor):
            return x
        out = x.double().clone()
        layer = tensor.removesuffix(".weight")
        if tensor.endswith(".weight") and layer in self.scales:
            out *= self.scales[layer].to(out)[None, :]
        for edit, s in self.edits.get(tensor, []):
            s = s.to(out)
            seg = slice(edit.offset, edit.offset + s.shape[0])
            view = out[seg]
            if edit.kind == "div":
                view /= s[:, None] if view.dim() == 2 else s
            elif view.dim() == 2:  # one_plus, weight rows
                view /= s[:, None]
            else:  # one_plus, bias
                view.copy_((1 + view) / s - 1)
        return out.to(x.dtype)

    def stats_for(self, layer: str, stats: LayerStats | None) -> LayerStats | None:
        """The layer's calibration statistics for the smoothed input ``x / s``."""
        s = self.scales.get(layer)
        if s is None or stats is None:
            return stats
        s = s.to(stats.hessian.device)
        inv = 1.0 / s.double()
        return LayerStats(stats.hessian * (inv[:, None] * inv[None, :]).to(stats.hessian.dtype), stats.count,
                          stats.col_sum * inv, stats.absmax / s.float(), stats.sample / s.float()[None, :],
                          stats.keys)


def plan_smoothing(layers: list[str], shapes: Mapping[str, tuple[int, ...]],
                   act_absmax: Callable[[str], torch.Tensor | None],
                   weight_absmax: Callable[[str], torch.Tensor], alpha: float) -> SmoothPlan:
    """Scales for every foldable group of the quantized ``layers``. ``act_absmax(layer)`` is the calibrated
    per-channel input absmax (None: not calibrated), ``weight_absmax(layer)`` the weight's per-column absmax."""
    groups, refused = smoothing_groups(layers, shapes)
    plan = SmoothPlan(refused=dict(refused))
    for g in groups:
        acts = [a for a in (act_absmax(t) for t in g.targets) if a is not None]
        if not acts:
            for t in g.targets:
                plan.refused[t] = "SmoothQuant not applied: no calibration statistics for this layer"
            continue
        a = torch.stack([x.float().cpu() for x in acts]).amax(0)
        w = torch.stack([weight_absmax(t).float().cpu() for t in g.targets]).amax(0)
        s = smooth_scales(a, w, alpha)
        for t in g.targets:
            plan.scales[t] = s
        for e in g.edits:
            plan.edits.setdefault(e.tensor, []).append((e, s))
        plan.groups.append(g)
    return plan
