"""Optional per-tensor hooks of the streamed conversion (what ``ConvertOptions`` may carry).

* ``WeightTransform``: changes float weights before they are quantized or copied (``--merge-lora``). ``bind``
  sees the input's header and raises ``UserError`` for any mismatch before the output is opened; the bound
  object maps ``(tensor name, float32 weight)`` to the new float32 weight for the tensors in ``names``.
* ``QuantErrorSink``: sees every quantized layer's float weight and stored form (``--extract-lora``), and
  writes its own output after the conversion succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from comfyquant.io.reader import TensorInfo


class BoundWeightTransform(Protocol):
    names: frozenset[str]

    @property
    def notes(self) -> list[str]: ...

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor: ...


class WeightTransform(Protocol):
    def bind(self, infos: Mapping[str, TensorInfo], base: str = ...) -> BoundWeightTransform: ...


class QuantErrorSink(Protocol):
    def add(self, name: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
            comfy_quant: Mapping[str, Any] | None) -> None: ...

    def finish(self) -> list[str]: ...


def transformed(transform: BoundWeightTransform | None, name: str, t: torch.Tensor,
                device: torch.device | None = None) -> torch.Tensor:
    """``t`` through the transform when it changes ``name`` (float32 result, on ``device`` when given), else
    ``t`` unchanged. The input tensor is never modified."""
    if transform is None or name not in transform.names:
        return t
    work = t.to(device) if device is not None else t
    work = work.to(torch.float32, copy=True)
    return transform(name, work)
