"""QuIP (Chee et al. 2023): incoherence processing + LDLQ.

Two ways to store the result:

* ``convrot``: the incoherence is the format's own rotation (ComfyUI's group-wise regular Hadamard along K,
  which stock ComfyUI undoes at run time), and LDLQ rounds in that basis. Nothing extra is stored.
* ``folded``: random incoherence on both sides (random signs, a random permutation and a block Hadamard,
  ``W' = U W V^T``), LDLQ on ``W'``, then the result is rotated back (``U^T Q V``) and requantized onto the
  target format's grid in the original basis by LDLQ again (a plain per-row / per-tensor / block file).
  The requantization rounds a second time, so this variant pays twice; the report measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfyquant.formats.base import AffineFormat, LayerGrid
from comfyquant.optimize.gptq import gptq_round
from comfyquant.optimize.hessian import damped_inverse_factor
from comfyquant.quant import hadamard


@dataclass(frozen=True)
class Incoherence:
    """A random orthogonal map of one side: ``x -> H_g(P (s * x))`` along the last dim (signs, permutation,
    block Hadamard of group ``g``)."""

    signs: torch.Tensor
    perm: torch.Tensor
    group: int

    @classmethod
    def random(cls, n: int, gen: torch.Generator) -> Incoherence:
        group = hadamard.choose_group_size(n, preferred=1024) or 1
        signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        return cls(signs, torch.randperm(n, generator=gen), group)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M^T`` for the orthogonal ``M`` (acting on the last dim)."""
        y = (x * self.signs.to(x))[..., self.perm.to(x.device)]
        return hadamard.fast_hadamard(y, self.group) if self.group > 1 else y

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        x = hadamard.fast_hadamard(y, self.group) if self.group > 1 else y
        out = torch.empty_like(x)
        out[..., self.perm.to(x.device)] = x
        return out * self.signs.to(x)


def ldlq(w: torch.Tensor, h: torch.Tensor, fmt: AffineFormat, params: dict, *, damp: float, retries: int,
         block: int) -> tuple[torch.Tensor, LayerGrid]:
    """LDLQ (GPTQ's update in natural column order) of ``w`` onto ``fmt``'s grid chosen for ``w`` itself;
    returns the on-grid weight and that grid."""
    grid = fmt.grid(w, params)
    u, _ = damped_inverse_factor(h, damp, retries)
    return gptq_round(w, u, grid, block=block), grid


def quip_folded(w: torch.Tensor, h: torch.Tensor, fmt: AffineFormat, params: dict, *, damp: float, retries: int,
                block: int, seed: int) -> tuple[torch.Tensor, LayerGrid]:
    """QuIP with random two-sided incoherence, folded back and requantized (in ``fmt``'s basis, which for a
    non-rotated format is the original one). Returns the on-grid weight and its grid."""
    gen = torch.Generator().manual_seed(seed)
    n, k = w.shape
    left, right = Incoherence.random(n, gen), Incoherence.random(k, gen)
    w_inc = left.apply(right.apply(w.float()).T).T  # U W V^T
    h64 = h.double()
    h_inc = right.apply(right.apply(h64).T).T  # V H V^T
    q_inc, _ = ldlq(w_inc, h_inc, fmt, params, damp=damp, retries=retries, block=block)
    w_back = right.invert(left.invert(q_inc.T).T)  # U^T Q V
    return ldlq(w_back, h64, fmt, params, damp=damp, retries=retries, block=block)
