"""Learning-rate schedules and the optimizers for learned rounding, with convert_to_quant's knob names.

``plateau`` (reduce on stall: patience, factor, cooldown, threshold rel/abs, lr_min), ``exponential`` (gamma
per step), ``adaptive`` (reduce on a worse step, grow on a better one), ``cosine`` and ``constant``; early
stops on loss, LR and stalled steps. ``make_optimizer`` maps the peer's optimizer names onto torch (AdamW,
RAdam), a normalized-gradient step ("original") and Prodigy's distance-adapted Adam.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from comfyquant.optimize.config import LearnedConfig


@dataclass
class LRSchedule:
    """Mutable schedule state for one layer's optimization (created per layer, never shared)."""

    cfg: LearnedConfig
    lr: float
    best: float = math.inf
    stall: int = 0
    plateau: int = 0
    cooldown: int = 0
    step_no: int = 0

    def improved(self, loss: float) -> bool:
        c = self.cfg
        if c.lr_threshold > 0 and math.isfinite(self.best):
            if c.lr_threshold_mode == "rel":
                return loss < self.best * (1.0 - c.lr_threshold)
            return self.best - loss > c.lr_threshold
        return loss < self.best

    def step(self, loss: float) -> float:
        """Record one step's loss; returns the learning rate for the next step."""
        c = self.cfg
        self.step_no += 1
        better = self.improved(loss)
        if better:
            self.best, self.stall, self.plateau = loss, 0, 0
        else:
            self.stall += 1
            self.plateau += 1
        base = c.default_lr()
        if c.schedule == "exponential":
            self.lr = max(self.lr * c.lr_gamma, c.lr_min)
        elif c.schedule == "plateau":
            if self.cooldown > 0:
                self.cooldown -= 1
            elif self.plateau >= c.lr_patience:
                self.lr = max(self.lr * c.lr_factor, c.lr_min)
                self.cooldown, self.plateau = c.lr_cooldown, 0
        elif c.schedule == "adaptive":
            self.lr = min(self.lr * 1.05, base) if better else max(self.lr * c.lr_factor, c.lr_min)
        elif c.schedule == "cosine":
            t = min(1.0, self.step_no / max(1, c.iters))
            self.lr = c.lr_min + (base - c.lr_min) * 0.5 * (1 + math.cos(math.pi * t))
        return self.lr

    def should_stop(self) -> bool:
        c = self.cfg
        return ((c.early_stop_loss > 0 and self.best <= c.early_stop_loss)
                or (c.early_stop_lr > 0 and self.lr <= c.early_stop_lr)
                or (c.early_stop_stall > 0 and self.stall > c.early_stop_stall))


class NormalizedGD(torch.optim.Optimizer):
    """convert_to_quant's "original" optimizer: a step of ``lr`` along the unit-norm gradient."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad / p.grad.norm().clamp_min(1e-20), alpha=-g["lr"])


class Prodigy(torch.optim.Optimizer):
    """Prodigy (Mishchenko & Defazio 2023): Adam whose step size is scaled by an estimate ``d`` of the
    distance to the solution; ``lr`` is a multiplier (1.0 = the estimate itself)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 d0: float = 1e-6, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "d": d0, "eps": eps, "num": 0.0, "den_acc": None})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            b1, b2 = g["betas"]
            d, lr = g["d"], g["lr"]
            sb2 = math.sqrt(b2)
            num, den = g["num"] * sb2, 0.0
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["p0"], st["m"], st["v"], st["s"] = p.clone(), torch.zeros_like(p), torch.zeros_like(p), \
                        torch.zeros_like(p)
                gr = p.grad
                num += (1 - sb2) * lr * d * d * float((gr * (st["p0"] - p)).sum())
                st["m"].mul_(b1).add_(gr, alpha=d * (1 - b1))
                st["v"].mul_(b2).addcmul_(gr, gr, value=d * d * (1 - b2))
                st["s"].mul_(sb2).add_(gr, alpha=d * d * lr * (1 - sb2))
                den += float(st["s"].abs().sum())
            g["num"] = num
            if den > 0:
                g["d"] = max(d, num / den)
            d = g["d"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.addcdiv_(st["m"], st["v"].sqrt().add_(d * g["eps"]), value=-d * lr)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (adamw, radam, original, prodigy) over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr)
    if name == "original":
        return NormalizedGD(params, lr=lr)
    if name == "prodigy":
        return Prodigy(params, lr=lr)
    raise ValueError(f"unknown optimizer {name}")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
