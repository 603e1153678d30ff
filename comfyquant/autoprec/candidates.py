"""Which formats automatic precision may choose for a layer, derived from the format registry.

A registered quantized format is a candidate when stock ComfyUI 0.30 loads it (``stock_comfy``; any format
with ``allow_comfyquant_formats``) and the target GPU is at least its ``min_gpu``. Plain casts (bf16, fp16) are
candidates for weights stored wider than them. "keep" (the weight as stored) is always one. A format added to
the registry becomes a candidate with no change here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import (
    GPU_GENERATIONS,
    REGISTRY,
    FormatShapeError,
    QuantFormat,
    get_format,
    gpu_at_least,
)

KEEP = "keep"  # the weight stays as stored (high precision)


@dataclass(frozen=True)
class CandidatePolicy:
    """``target_gpu``: a ``GPU_GENERATIONS`` name (None: any GPU; formats with a ``min_gpu`` are left out);
    ``allow_comfyquant_formats``: also formats stock ComfyUI 0.30 cannot load (int8-block); ``formats``: only
    these registry names (None: every eligible one); ``options``: layer options passed to ``resolve``."""

    target_gpu: str | None = None
    allow_comfyquant_formats: bool = False
    formats: tuple[str, ...] | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.target_gpu is not None and self.target_gpu not in GPU_GENERATIONS:
            raise UserError(f"--target-gpu {self.target_gpu}: choose one of {', '.join(GPU_GENERATIONS)}")
        if self.formats is not None:
            for name in self.formats:
                if name != KEEP:
                    get_format(name)

    @property
    def layer_options(self) -> dict[str, Any]:
        return dict(self.options)

    def eligible(self, fmt: QuantFormat) -> bool:
        """Whether ``fmt`` may be chosen at all under this policy (dtype aside)."""
        if self.formats is not None and fmt.name not in self.formats:
            return False
        if fmt.is_quantized and not fmt.stock_comfy and not self.allow_comfyquant_formats:
            return False
        return gpu_at_least(self.target_gpu, fmt.min_gpu)

    def formats_for(self, stored: torch.dtype) -> list[QuantFormat]:
        """Candidate formats (registry order) for a weight stored as ``stored``: every eligible quantized format,
        and the casts narrower than ``stored``."""
        width = torch.empty((), dtype=stored).element_size()
        out = []
        for fmt in REGISTRY.formats():
            if not self.eligible(fmt):
                continue
            if not fmt.is_quantized and torch.empty((), dtype=fmt.storage_dtype).element_size() >= width:
                continue
            out.append(fmt)
        return out

    def names(self) -> list[str]:
        """Every format name this policy can choose for some float weight, plus ``keep``."""
        return [f.name for f in REGISTRY.formats() if self.eligible(f)] + [KEEP]

    def describe(self) -> str:
        gpu = f"target GPU {self.target_gpu}" if self.target_gpu else "any GPU"
        scope = "all registered formats" if self.allow_comfyquant_formats else "formats stock ComfyUI 0.30 loads"
        return f"{', '.join(self.names())} ({scope}, {gpu})"


def layer_params(fmt: QuantFormat, shape: tuple[int, int], options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The format's parameters for this layer, or None when the shape cannot take it (no fallback here: the
    other candidates are the fallback)."""
    try:
        return fmt.resolve(shape, {k: v for k, v in options.items() if k in fmt.options})
    except FormatShapeError:
        return None
