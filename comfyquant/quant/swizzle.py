"""The cuBLAS block-scale layout ("32_4_4" swizzle) that NVFP4 / MXFP8 scale tensors are stored in.

A ``[R, C]`` scale matrix (one scale per row and K-block) is zero-padded to ``[roundup(R, 128), roundup(C, 4)]``
and cut into ``128 x 4`` tiles, stored tile after tile in row-major tile order; inside a tile, scale ``(r, c)``
sits at byte ``(r % 32) * 16 + (r // 32) * 4 + c``. The result is kept as a 2-D tensor of the padded shape (how
ComfyUI / comfy-kitchen store it), so the 128-row tile band ``b`` is exactly rows ``128b .. 128b+127``.
"""

from __future__ import annotations

import torch

TILE_ROWS, TILE_COLS = 128, 4


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    """The stored shape of a ``[rows, cols]`` scale matrix."""
    return _roundup(rows, TILE_ROWS), _roundup(cols, TILE_COLS)


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` scales -> the swizzled ``[roundup(R,128), roundup(C,4)]`` tensor (same dtype, zero padding)."""
    rows, cols = scales.shape
    pr, pc = swizzled_shape(rows, cols)
    padded = scales
    if (pr, pc) != (rows, cols):
        padded = torch.zeros((pr, pc), dtype=scales.dtype, device=scales.device)
        padded[:rows, :cols] = scales
    # [row tile, r // 32, r % 32, col tile, c] -> [row tile, col tile, r % 32, r // 32, c]
    tiles = padded.view(pr // 128, 4, 32, pc // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(pr, pc)


def unswizzle(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle`: the ``[rows, cols]`` scales of a stored swizzled tensor (any shape of the
    right element count, e.g. flattened)."""
    pr, pc = swizzled_shape(rows, cols)
    if stored.numel() != pr * pc:
        raise ValueError(f"swizzled scales hold {stored.numel()} values, [{rows}, {cols}] needs {pr}x{pc}")
    tiles = stored.reshape(pr // 128, pc // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(pr, pc)[:rows, :cols]
