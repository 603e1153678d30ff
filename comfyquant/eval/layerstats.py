"""Per-layer error of a quantized model against its float reference: weight SQNR (dequantized stored weight
vs the reference weight) and output SQNR on real activations (forward hooks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from comfyquant.quant.metrics import error_stats
from comfyquant.runtime.nn import QuantLinear


@dataclass
class LayerStat:
    """One quantized layer: its format, weight SQNR, and output SQNR when fed the reference's own input
    (``out_sqnr_db``, the layer's error alone) and inside the quantized model (``out_sqnr_e2e_db``)."""

    name: str
    format: str
    shape: tuple[int, int]
    weight_sqnr_db: float
    out_sqnr_db: float
    out_sqnr_e2e_db: float

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "format": self.format, "shape": list(self.shape),
                "weight_sqnr_db": _json(self.weight_sqnr_db), "out_sqnr_db": _json(self.out_sqnr_db),
                "out_sqnr_e2e_db": _json(self.out_sqnr_e2e_db)}


def _json(v: float) -> float | None:
    return None if v != v or v in (float("inf"), float("-inf")) else round(v, 3)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every loaded ``QuantLinear`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight is not None}


def _record(model: nn.Module, names: set[str], store: dict[str, tuple[torch.Tensor, torch.Tensor]],
            ) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for name, mod in model.named_modules():
        if name in names:
            def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
                store[name] = (inp[0].detach(), out.detach())
            handles.append(mod.register_forward_hook(hook))
    return handles


def _alone(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``q`` applied to the reference layer's own input ``x``. That input is already past any activation the
    loader folded into ``q`` (``runtime.fold``: the GELU before Flux's mlp.2), so the fold is left out here."""
    act = getattr(q, "input_act", None)
    q.input_act = None
    try:
        return q(x)
    finally:
        q.input_act = act


@torch.no_grad()
def layer_stats(ref: nn.Module, quant: nn.Module, run: Callable[[nn.Module], object]) -> list[LayerStat]:
    """Run ``run(model)`` (one representative forward pass) on both models with hooks on the quantized layers.

    A layer whose reference is not an ``nn.Linear`` of the same name is an error, never skipped.
    """
    qlayers = quantized_layers(quant)
    ref_mods = dict(ref.named_modules())
    missing = [n for n in qlayers if not isinstance(ref_mods.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"quantized layers without a float nn.Linear in the reference: {missing[:5]}")
    ref_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    q_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = _record(ref, set(qlayers), ref_io) + _record(quant, set(qlayers), q_io)
    try:
        run(ref)
        run(quant)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for name, q in qlayers.items():
        r = ref_mods[name]
        w_sq = error_stats(r.weight.float(), q.qweight.dequantize().float()).sqnr_db
        iso = e2e = float("nan")  # a layer the workload never calls (e.g. BERT's pooler) has no output error
        if name in ref_io:
            x_ref, y_ref = ref_io[name]
            iso = error_stats(y_ref, _alone(q, x_ref)).sqnr_db
            e2e = error_stats(y_ref, q_io[name][1]).sqnr_db
        stats.append(LayerStat(name, q.qweight.layout_name, (q.out_features, q.in_features), w_sq, iso, e2e))
    return stats
