"""The dynamic LoRA side path of one layer: ``y + (x @ A^T) @ B^T`` next to the quantized product.

Every dynamic LoRA on a layer contributes rows to one ``A [R, in]`` and columns to one ``B [out, R]`` (its
strength and ``alpha/rank`` folded into ``B``; a LoRA on a row slice of a fused layer, such as Flux's q of
``img_attn.qkv``, has zeros in the other rows of its ``B`` columns), so any number of LoRAs costs two matmuls:
one ``[M, in] x [in, R]`` and one ``addmm`` that adds ``[M, R] x [R, out]`` into the output. Adapters that are
not low-rank (LoHa, LoKr, full diffs) add a dense ``[out, in]`` term; ``diff_b`` adds to the bias.

This is a plain object, not a module, so it never shows up in the layer's state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from comfyquant.runtime.kernels.dispatch import add_low_rank


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
        self._padded: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __repr__(self) -> str:
        rank = 0 if self.down is None else self.down.shape[0]
        return f"LoRASidePath({len(self.entries)} LoRA(s), rank {rank}, dense={self.dense is not None})"

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def device(self) -> torch.device | None:
        """Where the side path's tensors are (None: it holds none)."""
        for t in (self.down, self.dense, self.bias):
            if t is not None:
                return t.device
        return None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LoRASidePath:
        """A new side path holding ``fn`` of every tensor (``nn.Module._apply``'s moves and casts); this one is
        left as it is, so a layer copy that shares it is unaffected."""
        out = LoRASidePath()
        for key, e in self.entries.items():
            out.entries[key] = SideEntry(**{f.name: None if getattr(e, f.name) is None else fn(getattr(e, f.name))
                                            for f in fields(SideEntry)})
        out._rebuild()
        return out

    def copy(self) -> LoRASidePath:
        """A new side path with the same entries (tensors shared): add to it without changing this one."""
        return self.map_tensors(lambda t: t)

    def weight_delta(self, out_features: int, in_features: int) -> torch.Tensor:
        """Every LoRA's change to the layer's weight as one float32 ``[out, in]`` matrix (to bake the side path
        into the weight, e.g. when the model is saved)."""
        device = self.device or torch.device("cpu")
        delta = torch.zeros(out_features, in_features, dtype=torch.float32, device=device)
        if self.down is not None and self.up_t is not None:
            delta += self.up_t.to(torch.float32).t() @ self.down.to(torch.float32)
        if self.dense is not None:
            delta += self.dense.to(torch.float32)
        return delta

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
        self._padded = {}

    def fused_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``(down [R, in], up [R, out], r)`` in ``x``'s dtype with R the rank rounded up to 16 (zero rows past
        ``r``): the low-rank part as a GEMM epilogue adds it (``runtime.kernels.dispatch.LowRank``); made once
        per dtype and device. None when this side path has no low-rank part."""
        if self.down is None or self.up_t is None:
            return None
        key = (x.dtype, x.device)
        ops = self._padded.get(key)
        if ops is None:
            r = self.rank
            pad = -r % 16
            down = F.pad(self.down.to(device=x.device, dtype=x.dtype), (0, 0, 0, pad)).contiguous()
            up = F.pad(self.up_t.to(device=x.device, dtype=x.dtype), (0, 0, 0, pad)).contiguous()
            ops = self._padded[key] = (down, up, r)
        return ops

    def rest(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus the parts that are not low-rank (dense diffs, bias diffs): what is left to add after a
        kernel added :meth:`fused_operands`."""
        if self.dense is not None:
            y = y + F.linear(x, self.dense.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus every LoRA's contribution for input ``x`` (``[..., in]`` -> ``[..., out]``)."""
        if self.down is not None and self.up_t is not None:  # unpadded, uncached: no copy when dtypes match
            y = add_low_rank(x, y, (self.down.to(x.dtype), self.up_t.to(x.dtype), self.rank))
        return self.rest(x, y)
