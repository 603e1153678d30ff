"""The layer Hessian an optimizer minimizes against: ``E[x^T x]`` from calibration, in the format's basis.

Pure functions: normalisation, the LoRA input-direction term, damping with escalation, and the upper
Cholesky factor of the inverse that GPTQ/LDLQ use. Errors are specific exceptions the driver turns into a
fallback with a reason.
"""

from __future__ import annotations

import torch


class LayerFallback(Exception):
    """The optimizer cannot run on this layer; ``reason`` says why (goes into the conversion report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SingularHessianError(LayerFallback):
    """The Hessian stays singular/indefinite even after damping was raised to its limit."""


class NonFiniteError(LayerFallback):
    """NaN/Inf in the weight, the statistics, or an optimizer's result."""


def normalized(h: torch.Tensor, lora_a: torch.Tensor | None = None, lora_strength: float = 1.0) -> torch.Tensor:
    """``H / mean(diag H)`` (float64), plus ``lora_strength * A^T A / mean(diag A^T A)`` for a LoRA's
    down matrix ``A [r, K]``: the LoRA's input directions get weight in the error the optimizer minimizes."""
    h = h.double()
    scale = float(torch.diagonal(h).mean())
    out = h / scale if scale > 0 else h.clone()
    if lora_a is not None and lora_strength > 0:
        a = lora_a.to(device=h.device, dtype=torch.float64)
        g = a.T @ a
        gs = float(torch.diagonal(g).mean())
        if gs > 0:
            out = out + (lora_strength / gs) * g
    return out


def dead_columns(h: torch.Tensor) -> torch.Tensor:
    """Input channels that were always zero in calibration (diag 0): bool ``[K]``."""
    return torch.diagonal(h) <= 0


def damped_inverse_factor(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` with ``d = damp * mean(diag H)``, in float64.

    Dead channels get a unit diagonal first (their weights are then rounded to nearest). When the
    factorization fails the damping is raised x10, at most ``retries`` times; then SingularHessianError.
    Returns ``(U, damping fraction used)``.
    """
    h = h.double().clone()
    dead = dead_columns(h)
    mean_diag = float(torch.diagonal(h)[~dead].mean()) if bool((~dead).any()) else 1.0
    if not torch.isfinite(h).all():
        raise NonFiniteError("calibration Hessian holds NaN/Inf")
    h[dead, dead] = mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    frac = damp
    for _ in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + (frac * mean_diag) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(u).all():
                return u, frac
        frac *= 10.0
    raise SingularHessianError(f"Hessian not positive definite even with damping {frac / 10:g} x mean diagonal")


def output_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Wq) H (W - Wq)^T) / N``: the mean squared output error per row for inputs with Hessian H."""
    e = (w.double() - w_q.double())
    return float(((e @ h.double()) * e).sum()) / max(1, w.shape[0])
