"""Optional per-tensor hooks of the streamed conversion (what ``ConvertOptions`` may carry).

* ``WeightTransform``: changes float weights before anything else sees them (``--merge-lora``). ``bind`` reads
  the input's header and raises ``UserError`` for any mismatch before the output is opened; the bound object maps
  ``(tensor name, float32 weight)`` to the new float32 weight for the tensors in ``names``. The converter reads
  the input through :class:`TransformedReader`, so the optimizers, bias correction, kept layers and the quantizer
  all see the transformed weights.
* ``QuantErrorSink``: sees every quantized layer's float weight and stored tensors (``--extract-lora``), and
  writes its own output after the conversion succeeded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch

from comfyquant.io.reader import CheckpointReader, TensorInfo


class BoundWeightTransform(Protocol):
    names: frozenset[str]

    @property
    def notes(self) -> list[str]: ...

    @property
    def warnings(self) -> list[str]: ...

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor: ...


class WeightTransform(Protocol):
    def bind(self, infos: Mapping[str, TensorInfo], base: str = ...) -> BoundWeightTransform: ...


class QuantErrorSink(Protocol):
    def add(self, name: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
            comfy_quant: Mapping[str, Any] | None) -> None: ...

    def finish(self) -> list[str]: ...


class TransformedReader:
    """A :class:`CheckpointReader` whose ``get`` returns the transformed weight (float32, a fresh tensor) for the
    names the transform changes, and the stored tensor for every other name. Headers, paths and prefetching
    are the wrapped reader's; the input file is never modified."""

    def __init__(self, reader: CheckpointReader, transform: BoundWeightTransform) -> None:
        self.reader, self.transform = reader, transform

    def __getattr__(self, name: str) -> Any:  # path, files, infos, metadata, prefetch, shapes, nbytes
        return getattr(self.reader, name)

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader)

    def get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        if name not in self.transform.names:
            return t
        return self.transform(name, t.to(torch.float32, copy=True))
