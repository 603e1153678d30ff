"""The quality report of one conversion: per-layer error statistics, decisions and a summary."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from comfyquant.io.writer import write_small_file


@dataclass
class LayerReport:
    """One input tensor: what happened to it and, for quantized/cast weights, how far it moved."""

    name: str
    shape: tuple[int, ...]
    action: str
    format: str | None
    rule: str
    reason: str
    sqnr_db: float | None = None
    rel_mse: float | None = None
    max_abs_err: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    stats_rows: int | None = None  # rows the stats were computed on when subsampled (None: all rows)
    optimizer: str | None = None  # the rounding method that ran (None: plain round to nearest)
    optimizer_gain_db: float | None = None  # calibration output error of RTN over the optimizer's, in dB
    notes: list[str] = field(default_factory=list)  # per-layer fallbacks and refusals, with the reason

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        for k in ("sqnr_db", "rel_mse", "max_abs_err", "optimizer_gain_db"):
            v = d[k]
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = "inf" if v > 0 else "-inf" if v < 0 else None
        return d


@dataclass
class Report:
    """A whole conversion; ``layers`` in file order, ``notes`` for things the user should know."""

    input: str
    output: str
    format: str
    model: str
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    auto: Any = None  # comfyquant.autoprec.AutoPlan of a --format auto conversion


    # -- summary --------------------------------------------------------------------------------------------
    @property
    def bytes_before(self) -> int:
        return sum(x.bytes_in for x in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(x.bytes_out for x in self.layers)

    def measured(self) -> list[LayerReport]:
        """Layers with error statistics (quantized or cast)."""
        return [x for x in self.layers if x.sqnr_db is not None]

    def summary(self) -> dict[str, Any]:
        m = self.measured()
        finite = [x.sqnr_db for x in m if x.sqnr_db is not None and math.isfinite(x.sqnr_db)]
        worst = sorted(m, key=lambda x: x.sqnr_db if x.sqnr_db is not None else math.inf)[:5]
        counts = Counter(x.action for x in self.layers)
        return {
            "layers_measured": len(m),
            "mean_sqnr_db": sum(finite) / len(finite) if finite else None,
            "min_sqnr_db": min(finite) if finite else None,
            "worst_layers": [{"name": x.name, "sqnr_db": x.sqnr_db} for x in worst],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "counts": dict(sorted(counts.items())),
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "format": self.format, "model": self.model,
            "summary": self.summary(), "notes": list(self.notes),
            "layers": [x.to_dict() for x in self.layers],
            **({"auto": self.auto.to_dict()} if self.auto is not None else {}),
        }

    def to_json(self, path: str | Path) -> None:
        """Write the report as JSON (``inf`` SQNR of exact layers written as the string "inf")."""
        write_small_file(path, json.dumps(self.to_dict(), indent=1) + "\n")

    # -- text -----------------------------------------------------------------------------------------------
    def to_text(self) -> str:
        """The table printed after a conversion: every weight tensor, then the summary."""
        rows = [x for x in self.layers if x.action == "quantize" or x.name.endswith(".weight")]
        shown = {id(x) for x in rows}
        other = Counter(x.action for x in self.layers if id(x) not in shown)
        w = max([len(x.name) for x in rows] + [5])
        lines = [f"{'layer':<{w}}  {'shape':<14} {'action':<8} {'format':<10} {'SQNR dB':>8} {'rel MSE':>9} "
                 f"{'max|err|':>9}  rule / reason"]
        for x in rows:
            shape = "x".join(map(str, x.shape)) or "scalar"
            lines.append(f"{x.name:<{w}}  {shape:<14} {x.action:<8} {x.format or '-':<10} {_num(x.sqnr_db, 8, 2)} "
                         f"{_num(x.rel_mse, 9, 2, sci=True)} {_num(x.max_abs_err, 9, 2, sci=True)}  "
                         f"{x.rule}: {x.reason}")
        if other:
            what = ", ".join(f"{n} {_DONE.get(a, a)}" for a, n in sorted(other.items()))
            lines.append(f"... and {sum(other.values())} other tensors (biases, norms, embeddings): {what}")
        s = self.summary()
        lines.append("")
        counts = ", ".join(f"{v} {k}" for k, v in s["counts"].items())
        lines.append(f"summary: {len(self.layers)} tensors ({counts}); format {self.format}, model {self.model}")
        if s["mean_sqnr_db"] is not None:
            lines.append(f"SQNR: mean {s['mean_sqnr_db']:.2f} dB, min {s['min_sqnr_db']:.2f} dB; worst: "
                         + ", ".join(f"{x['name']} ({_fmt(x['sqnr_db'])})" for x in s["worst_layers"]))
        ratio = s["bytes_after"] / s["bytes_before"] if s["bytes_before"] else 1.0
        lines.append(f"size: {_mb(s['bytes_before'])} -> {_mb(s['bytes_after'])} ({ratio:.1%})"
                     + (f" in {self.seconds:.1f} s" if self.seconds else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        opt = [x for x in self.layers if x.optimizer is not None]
        if opt:
            gains = [x.optimizer_gain_db for x in opt if x.optimizer_gain_db is not None]
            methods = ", ".join(f"{v} {k}" for k, v in sorted(Counter(x.optimizer for x in opt).items()))
            lines.append(f"optimizer: {methods}" + (f"; calibration output error vs RTN: mean "
                                                   f"{sum(gains) / len(gains):+.2f} dB" if gains else ""))
        for x in self.layers:
            lines.extend(f"note: {x.name}: {n}" for n in x.notes)
        if self.auto is not None:
            lines.append(self.auto.to_text())
        return "\n".join(lines)


_DONE = {"keep": "kept unchanged", "cast": "cast", "drop": "dropped", "quantize": "quantized"}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} dB"


def _num(v: float | None, width: int, prec: int, sci: bool = False) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if not math.isfinite(v):
        return f"{'inf' if v > 0 else '-inf':>{width}}"
    return f"{v:>{width}.{prec}e}" if sci else f"{v:>{width}.{prec}f}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
