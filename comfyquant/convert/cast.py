"""Cast formats (fp16, bf16) store the whole file in one float dtype, not only the layers a preset quantizes."""

from __future__ import annotations

from typing import Protocol

import torch

from comfyquant.formats import get_format
from comfyquant.io.writer import TensorSpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KEPT = "not quantized ("


class KeptEntry(Protocol):
    """The fields of a ``plan.PlanEntry`` this module reads and sets."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    action: str
    format: str | None
    reason: str
    outputs: list[TensorSpec]


def cast_kept_tensor(entry: KeptEntry, fmt_name: str) -> None:
    """Turn a kept floating tensor into a cast under a cast format (``--fp16`` used to write the quantizable
    layers as F16 and leave every other tensor in BF16). Other dtypes, quantized formats and tensors already
    in the target dtype are left as they are."""
    fmt = get_format(fmt_name)
    if fmt.is_quantized or entry.dtype not in FLOAT_DTYPES or entry.dtype == fmt.storage_dtype:
        return
    entry.action, entry.format = "cast", fmt.name
    entry.reason = f"{_KEPT}{entry.reason}); cast to {fmt.name} with the rest of the file"
    entry.outputs = [TensorSpec(entry.name, fmt.storage_dtype, entry.shape)]


def cast_of_kept(entry: KeptEntry) -> bool:
    """True for a cast made by :func:`cast_kept_tensor`: the preset keeps the layer out of quantization."""
    return entry.action == "cast" and entry.reason.startswith(_KEPT)
