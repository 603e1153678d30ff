"""The eval's quality metrics against known values and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyquant.eval import metrics as M


def test_psnr_formula() -> None:
    a = torch.zeros(2, 1, 8, 8)
    b = a + 0.1  # MSE 0.01, range 2 -> 10 log10(4 / 0.01)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(400.0), abs=1e-5)
    assert M.psnr(a, a) == math.inf


def test_ssim_identical_is_one() -> None:
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(M.ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_ssim_constant_images_closed_form() -> None:
    # Zero variance everywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * range)^2.
    a, b = 0.3, -0.2
    c1 = (0.01 * 2.0) ** 2
    got = M.ssim(torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64))
    assert float(got) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_drops_with_noise() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    small = M.ssim(x, x + 0.01 * torch.randn(x.shape, generator=g))
    large = M.ssim(x, x + 0.3 * torch.randn(x.shape, generator=g))
    assert bool((small > large).all()) and bool((small < 1).all())


def test_frechet_identical_gaussians_is_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_commuting_covariances() -> None:
    # Diagonal covariances commute: FD = |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert M.frechet_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-12)


def test_frechet_general_case_matches_scipy_sqrtm() -> None:
    import scipy.linalg as scipy_linalg  # scikit-learn (the eval extra) depends on scipy
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root))
    assert M.frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_cosine_and_accuracy() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert M.cosine(a, b).tolist() == pytest.approx([1.0, -1.0])
    assert M.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
