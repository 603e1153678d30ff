"""End-to-end probes: how a layer's output error reaches the model's output, measured on a workload.

A :class:`Probe` runs a model on its calibration inputs with some layers fake-quantized and returns one
distortion per item (an image's mean squared error, an embedding's squared distance); ``quality`` turns those
into the workload's metric. Quantizing one layer alone to a format of relative output error ``e`` gives the
layer's propagation gain ``g = distortion / e`` per item: a first-order model in which the distortion of a
whole plan is ``sum_l g_l e_l`` (small errors of different layers add in mean square). Layers differ a lot in
``g`` (an error in the final projection lands in the image, one in an early MLP is partly washed out), which is
what a per-layer SQNR alone cannot see. Implementations live with the models they run (``eval.autoprobe``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from comfyquant.autoprec.candidates import KEEP
from comfyquant.autoprec.sensitivity import LayerSensitivity, Option
from comfyquant.calibration.stats import CalibrationStats
from comfyquant.formats import QuantFormat, get_format

Assignment = Mapping[str, tuple[QuantFormat, Mapping[str, Any]]]


class Probe(Protocol):
    """A workload that can run the float model with chosen layers fake-quantized (see the module docstring)."""

    name: str
    metric: str  # the budget kind it measures: "psnr" or "cosine"

    def statistics(self) -> CalibrationStats:
        """Input statistics of every linear layer on the calibration inputs (one reference run)."""
        ...

    def distortion(self, assign: Assignment) -> torch.Tensor:
        """Per-item distortion (float64 ``[items]``) on the calibration inputs with ``assign``'s layers
        fake-quantized (weights and activations, as the format's reference kernel computes them)."""
        ...

    def quality(self, d: torch.Tensor) -> float:
        """The workload's metric (mean sample PSNR in dB, mean cosine) from per-item distortions: a mean over
        items of a per-item value (``item_values`` reads it item by item for the confidence bound)."""
        ...

    def heldout(self, path: Path) -> dict[str, Any]:
        """The metric of a written file, loaded by the runtime loader, on held-out inputs the calibration never
        saw: ``{"metric": ..., "value": ..., "min": ..., "items": ..., "inputs": ...}``."""
        ...


def with_margin(metric: str, target: float, margin_db: float) -> float:
    """The floor a prediction must meet so that ``target`` holds with ``margin_db`` of distortion headroom
    (PSNR: ``target + margin``; cosine: ``1 - cos`` lowered by the same factor)."""
    if metric == "psnr":
        return target + margin_db
    if metric == "cosine":
        return 1.0 - (1.0 - target) * 10.0 ** (-margin_db / 10.0)
    raise ValueError(metric)


def item_values(probe: Probe, d: torch.Tensor) -> list[float]:
    """The metric of each item alone (``quality`` of one distortion), whose mean is ``probe.quality(d)``."""
    return [probe.quality(d[i:i + 1]) for i in range(d.numel())]


def probe_option(sens: LayerSensitivity) -> Option | None:
    """The option a layer's gain is measured with: its largest error (the clearest signal over rounding noise),
    None when no option changes the layer."""
    quant = [o for o in sens.options if o.format != KEEP and o.err > 0]
    return max(quant, key=lambda o: o.err) if quant else None


def measure_gains(probe: Probe, layers: Sequence[LayerSensitivity], progress: Any = None) -> list[torch.Tensor]:
    """Per layer, the per-item gain ``distortion / e`` of quantizing it alone (zeros when it has no error)."""
    gains: list[torch.Tensor] = []
    zero: torch.Tensor | None = None
    for sens in layers:
        opt = probe_option(sens)
        if opt is None:
            gains.append(torch.zeros(0))
        else:
            d = probe.distortion({sens.name: (get_format(opt.format), opt.params)}).double()
            gains.append(d / opt.err)
            zero = torch.zeros_like(d) if zero is None else zero
        if progress is not None:
            progress.update(1)
    items = zero if zero is not None else torch.zeros(1, dtype=torch.float64)
    return [g if g.numel() else torch.zeros_like(items) for g in gains]


def psnr_of(d: torch.Tensor, data_range: float = 2.0, cap: float = 99.0) -> float:
    """Mean over items of ``min(cap, 10 log10(range^2 / d))`` (the eval's sample PSNR, capped as it is)."""
    vals = [cap if float(x) <= 0 else min(cap, 10.0 * math.log10(data_range**2 / float(x))) for x in d]
    return sum(vals) / len(vals) if vals else cap


def cosine_of(d: torch.Tensor) -> float:
    """Mean cosine of unit vectors from their squared distances (``cos = 1 - |a - b|^2 / 2``)."""
    return float(1.0 - d.double().mean() / 2.0) if d.numel() else 1.0
