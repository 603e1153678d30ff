"""The digits data: scikit-learn's bundled 8x8 digits as 32x32 grey images and 16-channel latents.

Images live in [-1, 1]. The latent of an image is its 4x4 pixel-unshuffle (an invertible 16-channel
encoding, ``[B, 16, 8, 8]``), which plays the part of the VAE for the Flux-layout DiT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
UNSHUFFLE = 4


@dataclass(frozen=True)
class Digits:
    """All 1,797 digits: ``images [N, 1, 32, 32]`` in [-1, 1], ``small [N, 64]`` in 0..16, ``labels [N]``."""

    images: torch.Tensor
    small: np.ndarray
    labels: torch.Tensor


def load_digits() -> Digits:
    """Load the bundled digits (offline) and upsample them bilinearly to 32x32."""
    from sklearn.datasets import load_digits as sk_load

    ds = sk_load()
    small = torch.from_numpy(ds.images.astype(np.float32))[:, None] / 16.0 * 2.0 - 1.0
    images = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return Digits(images.clamp(-1, 1), ds.data.astype(np.float64), torch.from_numpy(ds.target).long())


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 32, 32]`` -> ``[B, 16, 8, 8]``."""
    return F.pixel_unshuffle(images, UNSHUFFLE)


def from_latent(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 16, 8, 8]`` -> ``[B, 1, 32, 32]``."""
    return F.pixel_shuffle(latents, UNSHUFFLE)


def to_classifier_features(images: torch.Tensor) -> np.ndarray:
    """32x32 images in [-1, 1] -> 8x8 average-pooled pixels on sklearn's 0..16 scale, ``[B, 64]`` float64."""
    small = F.avg_pool2d(images.float().clamp(-1, 1), UNSHUFFLE)
    return ((small + 1.0) / 2.0 * 16.0).reshape(images.shape[0], -1).double().numpy()
