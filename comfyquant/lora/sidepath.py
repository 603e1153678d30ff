"""The dynamic LoRA side path of one layer: ``y + (x @ A^T) @ B^T`` next to the quantized product.

Every dynamic LoRA on a layer contributes rows to one ``A [R, in]`` and columns to one ``B [out, R]`` (its
strength and ``alpha/rank`` folded into ``B``; a LoRA on a row slice of a fused layer, such as Flux's q of
``img_attn.qkv``, has zeros in the other rows of its ``B`` columns), so any number of LoRAs costs two matmuls:
one ``[M, in] x [in, R]`` and one ``addmm`` that adds ``[M, R] x [R, out]`` into the output. Adapters that are
not low-rank (LoHa, LoKr, full diffs) add a dense ``[out, in]`` term; ``diff_b`` adds to the bias.

This is a plain object, not a module, so it never shows up in the layer's state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SideEntry:
    """One LoRA's part of a layer's side path (tensors already in the compute dtype and device)."""

    down: torch.Tensor | None = None  # [r, in]
    up: torch.Tensor | None = None  # [out, r], strength and alpha/rank folded in
    dense: torch.Tensor | None = None  # [out, in]
    bias: torch.Tensor | None = None  # [out]


class LoRASidePath:
    """All dynamic LoRAs of one linear layer, concatenated; call it as ``side(x, y)`` after the layer's product."""

    def __init__(self) -> None:
        self.entries: dict[int, SideEntry] = {}
        self.down: torch.Tensor | None = None
        self.up_t: torch.Tensor | None = None  # [R, out]: addmm's right operand
        self.dense: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __repr__(self) -> str:
        rank = 0 if self.down is None else self.down.shape[0]
        return f"LoRASidePath({len(self.entries)} LoRA(s), rank {rank}, dense={self.dense is not None})"

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def add(self, key: int, entry: SideEntry) -> None:
        self.entries[key] = entry
        self._rebuild()

    def discard(self, key: int) -> None:
        self.entries.pop(key, None)
        self._rebuild()

    def _rebuild(self) -> None:
        low = [e for e in self.entries.values() if e.down is not None]
        self.down = torch.cat([e.down for e in low]).contiguous() if low else None  # type: ignore[misc]
        self.up_t = torch.cat([e.up for e in low], dim=1).t().contiguous() if low else None  # type: ignore[misc]
        dense = [e.dense for e in self.entries.values() if e.dense is not None]
        self.dense = torch.stack(dense).sum(0) if dense else None
        bias = [e.bias for e in self.entries.values() if e.bias is not None]
        self.bias = torch.stack(bias).sum(0) if bias else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus every LoRA's contribution for input ``x`` (``[..., in]`` -> ``[..., out]``)."""
        if self.down is not None and self.up_t is not None:
            h = F.linear(x, self.down.to(x.dtype))
            out = y.shape[-1]
            y = torch.addmm(y.reshape(-1, out), h.reshape(-1, h.shape[-1]), self.up_t.to(x.dtype)).view(y.shape)
        if self.dense is not None:
            y = y + F.linear(x, self.dense.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
