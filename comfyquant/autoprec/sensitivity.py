"""How much each candidate format disturbs one layer's output, from its calibration statistics.

For a weight ``W [N, K]`` with inputs of Hessian ``H = E[x^T x]`` and a format storing ``Wq``, the layer's
mean squared output error from the weight is ``tr(E H E^T)`` with ``E = W - Wq`` (exact for the calibration
inputs; ``Wq`` is what the format's quantizer stores, dequantized in the original basis, so rotated formats
need no separate ``R^T H R``). Formats whose kernel also rounds activations (W8A8) add
``E||(x - xq) Wq^T||^2`` over the calibration row sample (``QuantFormat.quantize_input``). Both are relative to
the layer's output power ``tr(W H W^T)``: a noise-to-signal ratio, ``-10 log10`` of which is the layer's
output SQNR. Without statistics the Hessian is the identity (weight error only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.autoprec.candidates import KEEP, layer_params
from comfyquant.calibration.stats import LayerStats
from comfyquant.formats import QuantFormat
from comfyquant.io.comfy_meta import encoded_size


@dataclass(frozen=True)
class Option:
    """One way to store a layer: the format (registry name or ``keep``), its params, exact stored bytes, and
    the relative output error of the weight rounding and of the activation rounding."""

    format: str
    params: Mapping[str, Any]
    nbytes: int
    weight_err: float
    act_err: float = 0.0

    @property
    def err(self) -> float:
        return self.weight_err + self.act_err

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.err <= 0 else -10.0 * math.log10(self.err)


@dataclass
class LayerSensitivity:
    """A layer's candidate options. ``basis`` says what the errors were measured on."""

    name: str
    shape: tuple[int, int]
    bytes_in: int
    options: list[Option]
    basis: str  # "calibration" | "weight only (no calibration statistics)" | ...
    notes: list[str] = field(default_factory=list)

    def option(self, fmt: str) -> Option | None:
        return next((o for o in self.options if o.format == fmt), None)


def option_bytes(fmt: QuantFormat, shape: tuple[int, int], params: Mapping[str, Any]) -> int:
    """Bytes a layer stores in ``fmt``: every slot, plus the ``comfy_quant`` tensor of quantized formats."""
    n = sum(s.nbytes for s in fmt.slots(shape, params))
    return n + (encoded_size(fmt.comfy_quant(params)) if fmt.is_quantized else 0)


def _hessian(stats: LayerStats | None, device: torch.device) -> torch.Tensor | None:
    if stats is None or stats.count <= 0:
        return None
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    return stats.hessian_mean(dtype).to(device)


def _quad(e: torch.Tensor, h: torch.Tensor | None) -> float:
    """``tr(E H E^T)`` (``||E||^2`` when H is None)."""
    if h is None:
        return float(e.double().square().sum())
    e = e.to(h.dtype)
    return float(((e @ h) * e).sum())


def layer_sensitivity(name: str, w: torch.Tensor, stats: LayerStats | None, formats: Sequence[QuantFormat],
                      options: Mapping[str, Any] | None = None, device: str | torch.device | None = None
                      ) -> LayerSensitivity:
    """Every candidate's option for one weight ``w [N, K]`` (as stored: its dtype is the ``keep`` option's).

    ``formats`` are the candidate formats (``CandidatePolicy.formats_for``); a format the shape cannot take is
    left out. A format whose result is not finite (fp16 overflow) is left out with a note.
    """
    dev = torch.device(device) if device is not None else w.device
    shape = (int(w.shape[0]), int(w.shape[1]))
    work = torch.float64 if dev.type == "cpu" else torch.float32  # errors ~1e-5 of the signal: fp32 suffices on GPUs
    w32 = w.to(device=dev, dtype=torch.float32)
    wk = w32.to(work)
    h = _hessian(stats, dev)
    rows = stats.rows().to(dev) if stats is not None and stats.count > 0 else None
    if rows is not None and rows.shape[0] == 0:
        rows = None
    notes: list[str] = []
    basis = "calibration" if h is not None else "weight only (no calibration statistics for this layer)"
    power = _quad(wk, h)
    out_power = float((rows @ w32.T).double().square().sum()) if rows is not None else 0.0
    opts = [Option(KEEP, {}, w.numel() * w.element_size(), 0.0, 0.0)]
    for fmt in formats:
        params = layer_params(fmt, shape, options or {})
        if params is None:
            continue
        tensors = fmt.quantize(w32, params)
        deq = fmt.dequantize(tensors, params, work)
        if not bool(torch.isfinite(deq).all()):
            notes.append(f"{fmt.name}: not finite for this weight (out of the format's range)")
            continue
        werr = _quad(wk - deq, h) / power if power > 0 else 0.0
        aerr = 0.0
        if rows is not None and out_power > 0:
            xq = fmt.quantize_input(rows, params)
            if xq is not rows:
                aerr = float(((rows - xq).to(work) @ deq.T).double().square().sum()) / out_power
        opts.append(Option(fmt.name, dict(params), option_bytes(fmt, shape, params), werr, aerr))
    return LayerSensitivity(name, shape, opts[0].nbytes, opts, basis, notes)
