"""The group-wise *regular* Hadamard rotation that ComfyUI / comfy-kitchen use for ``convrot``.

comfy-kitchen builds ``H = H4 ⊗ H4 ⊗ ... / sqrt(g)`` with ``H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``
(not Sylvester's matrix), so the group size ``g`` is a power of 4. ``H`` is symmetric and orthogonal, so
``x W^T = (x H)(W H)^T`` for every group of ``g`` columns. The fast transform below applies the same matrix
with the radix-4 structure in ``O(K log4 g)`` instead of a dense ``g x g`` product per group.
"""

from __future__ import annotations

import math

import torch

VALID_GROUP_SIZES = (16, 64, 256, 1024, 4096)

_H4 = ((1.0, 1.0, 1.0, -1.0), (1.0, 1.0, -1.0, 1.0), (1.0, -1.0, 1.0, 1.0), (-1.0, 1.0, 1.0, 1.0))


def is_power_of_4(n: int) -> bool:
    """True for 1, 4, 16, 64, ..."""
    return n >= 1 and (n & (n - 1)) == 0 and (n.bit_length() - 1) % 2 == 0


def h4(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The 4x4 regular Hadamard block (unnormalized)."""
    return torch.tensor(_H4, dtype=dtype, device=device)


def hadamard_matrix(group: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Dense normalized ``H4^{⊗k} / sqrt(group)``; for tests and references, not for hot paths."""
    if not is_power_of_4(group) or group < 4:
        raise ValueError(f"Hadamard group size must be a power of 4 (>= 4), got {group}")
    base = h4(dtype, device)
    h = base
    while h.shape[0] < group:
        h = torch.kron(h, base)
    return h / math.sqrt(group)


def fast_hadamard(x: torch.Tensor, group: int) -> torch.Tensor:
    """Apply ``x_g @ H`` to every group of ``group`` consecutive elements of the last dim.

    Radix-4 butterflies: the last dim is viewed as ``[..., K/g, 4, 4, ..., 4]`` and H4 is applied along each
    of the ``log4(g)`` axes, each stage scaled by 1/2 (so the product is ``1/sqrt(g)``). Computes in the
    input's dtype (pass float32/float64 for accuracy).
    """
    if not is_power_of_4(group) or group < 4:
        raise ValueError(f"Hadamard group size must be a power of 4 (>= 4), got {group}")
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"last dim {k} is not a multiple of the Hadamard group size {group}")
    stages = (group.bit_length() - 1) // 2
    lead = x.shape[:-1]
    y = x.reshape(-1, k // group, *([4] * stages))
    for axis in range(2, 2 + stages):
        y = y.movedim(axis, -1)
        a, b, c, d = y.unbind(-1)
        # rows of H4: (1,1,1,-1), (1,1,-1,1), (1,-1,1,1), (-1,1,1,1); H4 is symmetric so x @ H4 = H4 x.
        s = (a + b + c + d) * 0.5
        y = torch.stack((s - d, s - c, s - b, s - a), dim=-1)
        y = y.movedim(-1, axis)
    return y.reshape(*lead, k)


def choose_group_size(in_features: int, preferred: int = 256) -> int | None:
    """The largest power-of-4 group (<= ``preferred``, >= 16) dividing ``in_features``; None if none does."""
    g = preferred
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 4
    return None


def rotate_weight(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``W_rot = W_g @ H`` for each group of K columns (the stored convrot weight), in float32 or wider."""
    w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    return fast_hadamard(w, group)


def unrotate_weight(weight_rot: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`rotate_weight` (``H`` is its own inverse)."""
    return rotate_weight(weight_rot, group)
