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
    # An all-zero row/tensor gets scale 1 so it dequantizes to exact zeros without denormals; a scale that
    # underflows to 0 (absmax below ~1.8e-43) is treated the same way instead of dividing by zero.
    scale = amax.float() / QMAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_q(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp_(-QMAX, QMAX).to(torch.int8)


def _absmax(w: torch.Tensor, dim: int | None) -> torch.Tensor:
    """max |w| over ``dim`` (all elements when None) in one pass over the stored dtype (no float copy)."""
    lo, hi = torch.aminmax(w) if dim is None else torch.aminmax(w, dim=dim, keepdim=True)
    return torch.maximum(hi.float(), lo.float().neg())


def _divide_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(w / scale)`` as int8 in three passes.

    Dividing a bf16/fp16 tensor by the fp32 scale upcasts exactly, so the quotient equals ``w.float() / scale``;
    ``|w / scale| <= 127`` holds by construction (``scale = absmax / 127``, round-off stays below 127.5), so
    no clamp pass is needed.
    """
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    # a 0-dim scale would not take part in type promotion (bf16 / f32-scalar stays bf16): give it rank
    y = torch.div(w, scale.to(work).reshape(scale.shape if scale.dim() else [1] * w.dim()))
    if y.dtype != work:  # pragma: no cover - promotion above guarantees it; a wrong dtype would lose precision
        raise RuntimeError(f"int8 quantization computed in {y.dtype}, expected {work}")
    return y.round_().to(torch.int8)


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row INT8: returns ``(q int8 [N,K], scale fp32 [N,1])``."""
    scale = _safe_scale(_absmax(w, -1))
    return _divide_round(w, scale), scale


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor INT8: returns ``(q int8, scale fp32 scalar [])``."""
    scale = _safe_scale(_absmax(w, None)).reshape(())
    return _divide_round(w, scale), scale


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
