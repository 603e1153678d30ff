"""GPTQ / LDLQ: column-by-column rounding with inverse-Hessian error feedback (Frantar et al. 2022; QuIP's
LDLQ is the same update). Pure math on one weight in the format's basis; the grid comes from the format
registry (``LayerGrid.fake_quant``), so every registered format (per-row, per-tensor, block, rotated, fp8)
works unchanged, with its scales fixed before the pass ("static groups").

Each column ``j`` is rounded, and its error ``e = (w_j - q_j) / U_jj`` is spread over the not-yet-rounded
columns through row ``j`` of ``U``, the upper Cholesky factor of ``H^-1``. Updates inside a block of
``block`` columns are immediate; the rest of the matrix is updated once per block (one GEMM).
"""

from __future__ import annotations

import torch

from comfyquant import interrupt
from comfyquant.formats.base import LayerGrid


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (the most active inputs are rounded first)."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


@torch.no_grad()
def gptq_round(w: torch.Tensor, u: torch.Tensor, grid: LayerGrid, *, block: int = 128,
               perm: torch.Tensor | None = None) -> torch.Tensor:
    """On-grid weight (float32, same basis and column order as ``w``) minimizing ``tr(E H E^T)`` greedily.

    ``u`` is the upper Cholesky factor of ``H^-1`` *in the permuted order* when ``perm`` is given (columns
    are processed in the order ``perm``); ``grid`` rounds column ``c`` of the original order with its own
    scale.
    """
    k = w.shape[1]
    work = w.float().clone()
    uf = u.to(device=w.device, dtype=torch.float32)
    if perm is not None:
        perm = perm.to(w.device)
        work = work[:, perm]
    # the elementwise scales, looked up once: a column of them per column of w when scales vary along K
    scale = grid.scale_for().to(device=w.device, dtype=torch.float32)
    per_col = scale.dim() == 2 and scale.shape[1] == k and k > 1
    if per_col and perm is not None:
        scale = scale[:, perm]
    # multiply by 1/s (0 where s is 0: a zero-scale block rounds to 0) instead of dividing and testing per column
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / torch.where(scale == 0, 1.0, scale))
    snap = grid.fmt.element_grid.snap
    q = torch.empty_like(work)
    for b0 in range(0, k, block):
        interrupt.check()
        b1 = min(b0 + block, k)
        w1 = work[:, b0:b1].clone()
        err = torch.empty_like(w1)
        u1 = uf[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = w1[:, i:i + 1]
            c = slice(b0 + i, b0 + i + 1)
            s, si = (scale[:, c], inv[:, c]) if per_col else (scale, inv)
            qc = snap(col * si) * s
            q[:, b0 + i:b0 + i + 1] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e * u1[i:i + 1, i:]
            err[:, i:i + 1] = e
        if b1 < k:
            work[:, b1:] -= err @ uf[b0:b1, b1:]
    if perm is not None:
        out = torch.empty_like(q)
        out[:, perm] = q
        return out
    return q
