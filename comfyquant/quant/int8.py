"""INT8 symmetric weight quantizers (round-to-nearest-even, absmax scaling) and their inverses.

Scales follow ComfyUI's ``int8_tensorwise`` convention: ``w ≈ q * scale`` with ``scale = absmax / 127``
(scalar for per-tensor, ``[N, 1]`` for per-row). Block-wise uses one scale per ``block x block`` tile,
shape ``[ceil(N/b), ceil(K/b)]``. All math runs in float32 (or float64 when given float64).
"""

from __future__ import annotations

import torch

QMAX = 127.0


def _work(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def _safe_scale(amax: torch.Tensor) -> torch.Tensor:
    # An all-zero row/tensor gets scale 1 so it dequantizes to exact zeros without denormals.
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def _round_q(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row INT8: returns ``(q int8 [N,K], scale fp32 [N,1])``."""
    x = _work(w)
    scale = _safe_scale(x.abs().amax(dim=-1, keepdim=True))
    return _round_q(x / scale), scale.float()


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor INT8: returns ``(q int8, scale fp32 scalar [])``."""
    x = _work(w)
    scale = _safe_scale(x.abs().amax())
    return _round_q(x / scale), scale.float().reshape(())


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n, k = x.shape
    pn, pk = -n % block, -k % block
    if pn or pk:
        x = torch.nn.functional.pad(x, (0, pk, 0, pn))
    return x


def block_scale_shape(shape: tuple[int, int], block: int) -> tuple[int, int]:
    """Shape of the block-scale grid for a ``[N, K]`` weight."""
    n, k = shape
    return (-(-n // block), -(-k // block))


def quantize_blockwise(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D block INT8: returns ``(q int8 [N,K], scale fp32 [ceil(N/b), ceil(K/b)])``; edge tiles are partial."""
    if block < 1:
        raise ValueError(f"block size must be positive, got {block}")
    x = _work(w)
    n, k = x.shape
    xp = _pad_to_blocks(x, block)
    gn, gk = xp.shape[0] // block, xp.shape[1] // block
    tiles = xp.reshape(gn, block, gk, block)
    scale = _safe_scale(tiles.abs().amax(dim=(1, 3)))
    q = _round_q(tiles / scale[:, None, :, None]).reshape(xp.shape)[:n, :k].contiguous()
    return q, scale.float()


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Broadcast a ``[gn, gk]`` block-scale grid to the full ``[N, K]`` weight shape."""
    n, k = shape
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` for scalar or per-row scales."""
    return (q.to(dtype) * scale.to(dtype)).to(dtype)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`."""
    return q.to(dtype) * expand_block_scale(scale.to(dtype), tuple(q.shape), block)
