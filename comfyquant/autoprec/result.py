"""What automatic precision decided: one :class:`LayerChoice` per layer and the :class:`AutoPlan` around them
(sizes, predicted and measured quality, notes), with their JSON and text forms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from comfyquant.autoprec.budget import Budget


@dataclass
class LayerChoice:
    """One layer's chosen option, its error, and the reason in words."""

    name: str
    shape: tuple[int, int]
    format: str
    params: dict[str, Any]
    nbytes: int
    bytes_in: int
    weight_err: float
    act_err: float
    gain: float | None
    basis: str
    reason: str = ""

    @property
    def sqnr_db(self) -> float:
        e = self.weight_err + self.act_err
        return math.inf if e <= 0 else -10 * math.log10(e)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "format": self.format, "params": self.params,
                "bytes": self.nbytes, "bytes_in": self.bytes_in, "output_sqnr_db": _num(self.sqnr_db),
                "weight_err": self.weight_err, "act_err": self.act_err, "gain": self.gain, "basis": self.basis,
                "reason": self.reason}


@dataclass
class AutoPlan:
    """The chosen format of every candidate layer, the sizes, predicted and measured quality, notes."""

    budget: Budget
    candidates: str
    layers: list[LayerChoice]
    bytes_in: int  # the whole input (tensor data)
    fixed_bytes: int  # output bytes of everything automatic precision does not choose for
    metric: str | None  # "psnr" / "cosine" with a probe, else None
    predicted: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)  # on the calibration inputs, whole plan at once
    heldout: dict[str, Any] = field(default_factory=dict)  # on held-out inputs, the written file
    # a quality floor's confidence bound: target, margin, confidence, items, predicted/measured mean, sd, bound
    floor: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_out(self) -> int:
        return self.fixed_bytes + sum(x.nbytes for x in self.layers)

    @property
    def size_ratio(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 1.0

    def formats(self) -> dict[str, str]:
        """Layer name -> chosen format (registry name, or ``keep``)."""
        return {x.name: x.format for x in self.layers}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for x in self.layers:
            out[x.format] = out.get(x.format, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict[str, Any]:
        """Compact JSON-able summary (goes into the output file's ``__metadata__``)."""
        return {"budget": self.budget.describe(), "candidates": self.candidates, "size": round(self.size_ratio, 6),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "counts": self.counts(),
                "metric": self.metric, "predicted": self.predicted, "measured_calibration": self.measured,
                "floor": self.floor, "layers": self.formats()}

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d.update(heldout=self.heldout, rounds=self.rounds, notes=self.notes,
                 layers=[x.to_dict() for x in self.layers])
        return d

    def to_text(self) -> str:
        """A few lines for the converter's report."""
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items())
        lines = [f"auto precision: budget {self.budget.describe()}; {len(self.layers)} layers chosen ({counts}); "
                 f"size {self.size_ratio:.1%} of the input"]
        if self.predicted:
            lines.append("  predicted (calibration): " + _kv(self.predicted))
        if self.measured:
            lines.append("  measured (calibration inputs, whole plan): " + _kv(self.measured))
        if self.floor:
            lines.append("  " + floor_text(self.floor))
        if self.heldout:
            lines.append("  measured (held-out inputs, written file): " + _kv(self.heldout))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# the numbers floor_text prints (AutoPlan.floor also has the metric's name)
FLOOR_KEYS = ("target", "floor", "confidence", "items", "t", "margin_db", "predicted_mean", "predicted_bound",
              "measured_mean", "measured_sd", "measured_bound")


def floor_text(f: dict[str, Any]) -> str:
    """One line: what the quality floor was planned on and where the plan's mean and bound are."""
    return (f"floor: {f['metric']} >= {f['target']:g} planned as mean - t sd / sqrt(n) >= {f['floor']:.6g} "
            f"({f['confidence'] * 100:g}% one-sided, n {f['items']} calibration items, t {f['t']:.4g}, margin "
            f"{f['margin_db']:g} dB): predicted mean {f['predicted_mean']:.6g} bound {f['predicted_bound']:.6g}; "
            f"measured mean {f['measured_mean']:.6g} sd {f['measured_sd']:.4g} bound {f['measured_bound']:.6g}")


def _num(v: float) -> float | str:
    return "inf" if v == math.inf else v


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
