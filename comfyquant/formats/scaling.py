"""Scale granularity as one block shape, torchao-style: one scale per ``(rows, cols)`` block of the weight.

``(None, None)`` is one scale per tensor, ``(1, None)`` one per output row, ``(b, b)`` square tiles,
``(1, g)`` groups of ``g`` along K. Edge blocks are partial. Scales are ``absmax / grid max`` in float32, and an
all-zero block gets scale 1 (it dequantizes to exact zeros, no division by zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Block = tuple[int | None, int | None]


def _edge(n: int, b: int | None) -> int:
    return n if b is None else b


def grid_shape(shape: tuple[int, int], block: Block) -> tuple[int, int]:
    """Shape of the scale grid of a ``[N, K]`` weight: ``[ceil(N/bn), ceil(K/bk)]``."""
    n, k = shape
    bn, bk = _edge(n, block[0]), _edge(k, block[1])
    return (-(-n // max(bn, 1)), -(-k // max(bk, 1)))


def block_absmax(w: torch.Tensor, block: Block) -> torch.Tensor:
    """max |w| over every block, float32, shape :func:`grid_shape` (zero padding for partial edge blocks)."""
    n, k = w.shape
    bn, bk = _edge(n, block[0]), _edge(k, block[1])
    if bn == n and bk == k:
        return w.abs().amax().float().reshape(1, 1)
    if bn == 1 and bk == k:
        return w.abs().amax(dim=1, keepdim=True).float()
    gn, gk = grid_shape((n, k), block)
    x = w.abs()
    if gn * bn != n or gk * bk != k:
        x = F.pad(x, (0, gk * bk - k, 0, gn * bn - n))
    return x.reshape(gn, bn, gk, bk).amax(dim=(1, 3)).float()


def safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax`` in float32; 1 where that is zero (all-zero block, or an absmax that underflows)."""
    scale = amax.float() / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def divide(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w / scale``, with 0 where the scale is 0 (a block stored with a zero scale dequantizes to zeros)."""
    # dividing by +inf instead of 0 gives the zeros without a data-dependent branch (no device sync per call)
    return w / torch.where(scale == 0, torch.full_like(scale, float("inf")), scale)


def expand(scale: torch.Tensor, block: Block, shape: tuple[int, int], cols: slice = slice(None)) -> torch.Tensor:
    """The scale grid broadcast to the elements ``[:, cols]`` of a ``[N, K]`` weight (a view where possible)."""
    n, k = shape
    bn, bk = _edge(n, block[0]), _edge(k, block[1])
    g = scale.reshape(grid_shape(shape, block))
    c0, c1, _ = cols.indices(k)
    if g.shape[0] > 1:
        g = g.repeat_interleave(bn, 0)[:n]
    if g.shape[1] > 1:
        g = g[:, c0 // bk: -(-c1 // bk)].repeat_interleave(bk, 1)
        off = c0 - (c0 // bk) * bk
        g = g[:, off: off + (c1 - c0)]
    return g


def infer_block(scale_shape: tuple[int, ...], shape: tuple[int, int]) -> Block:
    """The block a stored per-tensor or per-row scale implies: scalar -> tensor, ``[N,1]``/``[N]`` -> rows."""
    n, _ = shape
    numel = 1
    for d in scale_shape:
        numel *= d
    if numel == 1:
        return (None, None)
    if tuple(scale_shape) in ((n, 1), (n,)):
        return (1, None)
    raise ValueError(f"scale shape {tuple(scale_shape)} fits neither per-tensor nor per-row scales of a "
                     f"{tuple(shape)} weight")
