"""Rectified flow for the digits DiT: the training loss and the Euler sampler with classifier-free guidance.

Convention (Flux / ComfyUI's CONST sampling): ``x_t = (1 - t) x_0 + t * noise``, the model predicts the
velocity ``noise - x_0``, sampling integrates from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from comfyquant.eval.data import from_latent

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, labels) -> v


@dataclass(frozen=True)
class SampleConfig:
    """Sampler settings shared by the eval, the demo and the training preview."""

    steps: int = 20
    cfg: float = 3.0
    per_class: int = 10
    seed: int = 1234


def flow_loss(velocity: Velocity, x0: Tensor, labels: Tensor, null_label: int, gen: torch.Generator,
              drop_prob: float = 0.1) -> Tensor:
    """MSE between predicted and true velocity at logit-normal t, labels dropped to null with ``drop_prob``."""
    b = x0.shape[0]
    dev = x0.device
    t = torch.sigmoid(torch.randn(b, generator=gen, device=dev))
    noise = torch.randn(x0.shape, generator=gen, device=dev)
    drop = torch.rand(b, generator=gen, device=dev) < drop_prob
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    tb = t[:, None, None, None]
    xt = (1 - tb) * x0 + tb * noise
    return (velocity(xt, t, labels) - (noise - x0)).float().square().mean()


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """Seeded starting noise, drawn on the CPU so every device and format starts from the same tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen)


@torch.no_grad()
def sample(velocity: Velocity, labels: Tensor, null_label: int, noise: Tensor, steps: int, cfg: float,
           on_step: Callable[[], None] | None = None) -> Tensor:
    """Euler integration from ``noise`` (t=1) to t=0 with CFG; returns images ``[B, 1, 32, 32]`` in [-1, 1].
    ``on_step`` is called after each step (progress)."""
    x = noise.clone()
    null = torch.full_like(labels, null_label)
    both = torch.cat((labels, null))
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((2 * x.shape[0],), float(ts[i]), device=x.device)
        v_c, v_u = velocity(torch.cat((x, x)), t, both).float().chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (v_u + cfg * (v_c - v_u))
        if on_step is not None:
            on_step()
    return from_latent(x).clamp(-1, 1)


def class_labels(num_classes: int, per_class: int) -> Tensor:
    """``[0]*per_class + [1]*per_class + ...``: the label batch every sample grid uses."""
    return torch.arange(num_classes).repeat_interleave(per_class)
