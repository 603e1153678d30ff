"""Block-scaled formats whose scales are stored in the cuBLAS swizzled layout (``nvfp4``, ``mxfp8``).

One scale per ``block_k`` consecutive elements of a row; the ``[N, K/block_k]`` scale matrix is stored swizzled
(``quant.swizzle``: padded to ``[roundup(N, 128), roundup(K/block_k, 4)]``), which is what ComfyUI 0.30 and
``torch._scaled_mm``'s block-scaled recipes read. K must be a multiple of ``block_k`` (FormatShapeError
otherwise: the caller falls back); N is stored unpadded (ComfyUI slices its dequantized weight to ``[N, K]``
either way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats import scaling
from comfyquant.formats.base import AffineFormat, FormatShapeError, Params, TensorSlot
from comfyquant.formats.scaling import Block
from comfyquant.quant import swizzle


class BlockScaledFormat(AffineFormat):
    """``w ≈ values(codes) * scale_values(weight_scale)`` per ``(1, block_k)`` block, scales swizzled.

    Subclasses set ``block_k``, ``scale_dtype`` (the stored scale dtype) and implement :meth:`block_values`
    (stored scales -> float per block, ``[N, K/block_k]``) and :meth:`choose_scales`.
    """

    block_k: int = 16
    scale_dtype: torch.dtype = torch.uint8

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        return (1, self.block_k)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        if shape[1] % self.block_k:
            raise FormatShapeError(f"{self.name}: in_features {shape[1]} is not a multiple of its scale block "
                                   f"{self.block_k}")
        return self._common(options)

    def scale_slot_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        return swizzle.swizzled_shape(shape[0], shape[1] // self.block_k)

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        return [TensorSlot("weight", self.storage_dtype, self.storage_shape(shape, params)),
                TensorSlot("weight_scale", self.scale_dtype, self.scale_slot_shape(shape, params))]

    def shape_ok(self, slot: TensorSlot, got: tuple[int, ...]) -> bool:
        if slot.suffix == "weight_scale":  # ComfyUI reads the swizzled scales by element count: flat is fine too
            return got == slot.shape or (len(got) == 1 and got[0] == slot.shape[0] * slot.shape[1])
        if slot.suffix == "weight_scale_2":
            return len(got) <= 2 and _numel(got) == 1
        return got == slot.shape

    def describe_shape(self, slot: TensorSlot, params: Mapping[str, Any]) -> str:
        if slot.suffix == "weight_scale":
            return f"{list(slot.shape)}: one scale per {self.block_k} along K, swizzled"
        return super().describe_shape(slot, params)

    # ---- scales ---------------------------------------------------------------------------------------------
    def block_values(self, scales: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        """float32 scale of every block ``[rows, cols]`` (cols = K / block_k) from the stored scale tensors."""
        raise NotImplementedError

    def element_scale(self, scales: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                      shape: tuple[int, int], cols: slice = slice(None)) -> torch.Tensor:
        n, k = shape
        grid = self.block_values(scales, n, k // self.block_k)
        return scaling.expand(grid, self.block(shape, params), shape, cols)

    # ---- rows -----------------------------------------------------------------------------------------------
    def take_rows(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                  rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        w = tensors["weight"]
        n, k = self.logical_shape(tuple(w.shape), params) or (0, 0)
        cols = k // self.block_k
        out = dict(tensors)
        out["weight"] = w[rows]
        stored = tensors["weight_scale"]
        grid = swizzle.unswizzle(stored.view(torch.uint8), n, cols)[rows]
        out["weight_scale"] = swizzle.swizzle(grid).view(stored.dtype)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
