"""End-to-end quality metrics, pure functions in float64: PSNR, SSIM, Frechet distance, cosine, accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> float:
    """``10 log10(range^2 / MSE)`` over all elements (inf when identical); images in [-1, 1] have range 2."""
    mse = float((ref.double() - test.double()).square().mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0, win: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03, valid region).

    ``ref``/``test``: ``[B, 1, H, W]``; returns ``[B]`` float64.
    """
    x, y = ref.double(), test.double()
    w = _gaussian_window(win, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``."""
    return frechet_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; the trace of the root via a symmetric eigenproblem."""
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    ev, vec = np.linalg.eigh(s1)
    root1 = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    mid = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_root = float(np.sqrt(np.clip(mid, 0, None)).sum())
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_root)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float64, ``[N]``."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    return float((np.asarray(pred) == np.asarray(labels)).mean())
