"""Signed INT4: nibble packing (ComfyUI's ``convrot_w4a4`` byte layout) and per-row scale choice.

Packing: two values per byte along the last dim, the even element in the LOW nibble, two's complement, stored
as int8 (comfy-kitchen's row-major int4 layout). Codes are emitted in ``-7 .. 7`` (``scale = max / 7``): the
nibble could hold -8, but the W4A4 kernels assume a symmetric range.

Scale choice: absmax / 7 wastes most of the 15 levels on a row whose largest values are rare; a clipped scale
lowers the row's squared error. :func:`mse_row_scales` searches the clip ratio per row (absmax is always a
candidate, so it is never worse) and refines it by least squares with the codes fixed.
"""

from __future__ import annotations

import torch

QMAX = 7


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int values in ``-8 .. 7`` ``[..., K]`` into int8 ``[..., K/2]``: element ``2i`` low nibble, ``2i+1`` high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    lo = c[..., 0::2] & 0x0F
    hi = (c[..., 1::2] & 0x0F) << 4
    return (lo | hi).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., K/2]`` (or uint8) to signed int8 values ``[..., K]``."""
    b = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    lo = (b & 0x0F).to(torch.int8)
    hi = (b >> 4).to(torch.int8)
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(out >= 8, out - 16, out)


def round_int4(y: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """Nearest integer (ties to even) clamped to ``+-qmax``, as int8."""
    return torch.round(y).clamp_(-qmax, qmax).to(torch.int8)


def _row_sse(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    q = torch.round(w / scale).clamp_(-qmax, qmax)
    return (q.mul_(scale).sub_(w)).square_().sum(-1, keepdim=True)


def absmax_row_scales(w: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """``max|w_row| / qmax`` as float32 ``[N, 1]`` (1 for an all-zero row)."""
    s = w.abs().amax(-1, keepdim=True).float() / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def mse_row_scales(w: torch.Tensor, qmax: int = QMAX, coarse: int = 10, fine: int = 4,
                   refine: int = 1) -> torch.Tensor:
    """Per-row float32 scales ``[N, 1]`` minimizing ``||w - s * clamp(round(w / s))||^2`` row by row.

    Clip ratios ``alpha * absmax / qmax``: ``coarse`` values in ``[0.4, 1]``, then ``fine`` around the best, then
    ``refine`` least-squares steps ``s = <w, q> / <q, q>`` with the codes fixed. Each step only replaces a
    row's scale when its error drops, so the result is never worse than absmax (``alpha = 1``).
    """
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    base = absmax_row_scales(work, qmax).to(work.dtype)
    best_s, best_e = base, _row_sse(work, base, qmax)

    def consider(s: torch.Tensor) -> None:
        nonlocal best_s, best_e
        s = torch.where(s > 0, s, base)
        e = _row_sse(work, s, qmax)
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)

    step = 0.6 / (coarse - 1)
    for a in torch.linspace(0.4, 1.0, coarse)[:-1].tolist():
        consider(base * a)
    center = best_s
    for d in torch.linspace(-step, step, fine + 2)[1:-1].tolist():
        consider(center + base * d)
    for _ in range(refine):
        q = torch.round(work / best_s).clamp_(-qmax, qmax)
        num, den = (work * q).sum(-1, keepdim=True), q.square().sum(-1, keepdim=True)
        consider(torch.where(den > 0, num / den.clamp_min(1.0), base))
    return best_s.float()
