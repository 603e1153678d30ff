"""Learned rounding (AdaRound, Nagel et al. 2020): for every weight, learn whether it rounds down or up.

The two grid points around each weight (``lo <= w <= hi``) are found through the format's own rounding
(``LayerGrid.fake_quant``, probing outward at doubling distances), so any registered grid works (int8,
int4, fp8's uneven spacing). The soft weight ``lo + (hi - lo) h(V)`` with the rectified sigmoid ``h``
minimizes the layer's output error ``tr(E H E^T)`` on the calibration Hessian plus an annealed regularizer
that pushes every ``h`` to 0 or 1; the result is then rounded hard (``h >= 0.5`` -> ``hi``), and each output row
keeps the nearest rounding where that has the smaller error (the objective is separable by rows).
"""

from __future__ import annotations

import math

import torch

from comfyquant import interrupt
from comfyquant.formats.base import LayerGrid
from comfyquant.optimize.config import LearnedConfig
from comfyquant.optimize.hessian import NonFiniteError
from comfyquant.optimize.schedule import LRSchedule, make_optimizer, set_lr

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
PROBE_EXPONENTS = range(-12, 8)  # probe distances scale * 2^j: covers fp8's finest and widest spacings


@torch.no_grad()
def grid_neighbors(w: torch.Tensor, grid: LayerGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: the grid points at or below and at or above each weight (equal where w is on the grid
    or at the grid's end). The nearest point is one of them; the other is found by probing from it."""
    q0 = grid.fake_quant(w).float()
    scale = grid.scale_for().float().expand_as(w)
    up = w >= q0  # the other neighbour lies above q0 (or w is exactly on the grid)
    direction = torch.where(up, 1.0, -1.0)
    other = q0.clone()
    found = w == q0
    for j in PROBE_EXPONENTS:
        probe = q0 + direction * scale * (2.0 ** j)
        q = grid.fake_quant(probe).float()
        new = ~found & (q != q0)
        other = torch.where(new, q, other)
        found |= new
        if bool(found.all()):
            break
    lo, hi = torch.minimum(q0, other), torch.maximum(q0, other)
    return lo, hi


def rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with ``rect_sigmoid(V) == frac`` (frac in [0, 1], kept off the clamp)."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def learned_round(w: torch.Tensor, h: torch.Tensor, grid: LayerGrid, cfg: LearnedConfig,
                  seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """On-grid weight (float32) from learned rounding, and a summary (iterations run, final losses).

    ``h`` is the (normalized) Hessian in the same basis as ``w``. Raises NonFiniteError when the loss
    becomes NaN/Inf (the driver then falls back).
    """
    torch.manual_seed(seed)
    w = w.float()
    lo, hi = grid_neighbors(w, grid)
    gap = hi - lo
    movable = gap > 0
    frac = torch.where(movable, (w - lo) / torch.where(movable, gap, torch.ones_like(gap)), torch.zeros_like(w))
    v = init_v(frac).requires_grad_(True)
    hf = h.to(device=w.device, dtype=torch.float32)
    rtn = grid.fake_quant(w).float()
    e0 = rtn - w
    base = float(((e0 @ hf) * e0).sum()).__abs__() or 1.0
    lr = cfg.default_lr()
    opt = make_optimizer(cfg.optimizer, [v], lr)
    sched = LRSchedule(cfg, lr)
    warm = int(cfg.warmup * cfg.iters)
    n_mov = max(1, int(movable.sum()))
    it, rec_val = 0, math.nan
    for it in range(cfg.iters):
        interrupt.check()  # a Ctrl-C whose KeyboardInterrupt a finalizer swallowed (the step frees tensors)
        opt.zero_grad(set_to_none=True)
        soft = lo + gap * rect_sigmoid(v)
        e = soft - w
        rec = ((e @ hf) * e).sum() / base
        loss = rec
        if it >= warm:
            t = (it - warm) / max(1, cfg.iters - warm)
            beta = cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (1 + math.cos(math.pi * t))
            hv = rect_sigmoid(v)[movable]
            reg = (1 - (2 * hv - 1).abs().pow(beta)).sum() / n_mov
            loss = rec + cfg.reg_weight * reg
        loss.backward()
        rec_val, loss_val = float(rec.detach()), float(loss.detach())
        if not math.isfinite(loss_val):
            raise NonFiniteError(f"learned rounding diverged (loss {loss_val} at step {it})")
        opt.step()
        set_lr(opt, sched.step(loss_val))
        if it >= warm and sched.should_stop():
            break
    with torch.no_grad():
        out = torch.where(rect_sigmoid(v) >= 0.5, hi, lo)
        # tr(E H E^T) is a sum over output rows, so each row keeps whichever of the learned and the nearest
        # rounding has the smaller error: never worse than RTN, row by row
        e = out - w
        row_learned, row_rtn = ((e @ hf) * e).sum(1), ((e0 @ hf) * e0).sum(1)
        out = torch.where((row_learned <= row_rtn)[:, None], out, rtn)
        e = out - w
        final = float(((e @ hf) * e).sum()) / base
    if not torch.isfinite(out).all():
        raise NonFiniteError("learned rounding produced NaN/Inf weights")
    return out, {"iters": it + 1, "soft_loss_vs_rtn": rec_val, "hard_loss_vs_rtn": final}
