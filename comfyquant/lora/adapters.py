"""Weight differences per adapter type, in float32, with the semantics ComfyUI 0.30 applies to users' LoRAs.

For a base weight ``W`` and strength ``s`` (facts from ``comfy/weight_adapter/{lora,loha,lokr,base}.py``):

* LoRA / LoCon: ``W += s * (alpha / rank) * up @ down`` (``alpha`` absent: factor 1; ``rank`` = rows of
  ``down``); with a Tucker ``mid`` (conv LoCon) ``down`` is first contracted with ``mid``.
* LoHa: ``W += s * (alpha / rank1) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise; CP ``t1/t2`` for convs).
* LoKr: ``W += s * f * kron(w1, w2)`` where ``w1``/``w2`` may be ``a @ b`` (``w2`` also CP with ``t2``) and
  ``f = alpha / rank`` of the last decomposed factor (``w2`` over ``w1``), else 1.
* DoRA (``dora_scale`` with any of the above): ``W' = (W + f * D) * dora_scale / (norm + eps)`` with the norm
  taken per input column of ``W + f * D`` (``dora_scale`` shaped ``[1, in]``), or per output row of ``W`` itself
  (``dora_scale`` shaped ``[out, 1]``; ComfyUI uses the unmerged weight there); then ``W += s * (W' - W)``.
* ``diff``: ``W += s * diff``; ``set``: ``W = set``; ``diff_b``: ``bias += s * diff_b``.

``fn`` is the row transform of a target whose halves are stored swapped (diffusers ``norm_out``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from comfyquant.lora.files import Adapter, LoRAFile

RowFn = Callable[[torch.Tensor], torch.Tensor]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves along dim 0 (diffusers stores adaLN ``norm_out`` as scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def alpha_factor(ad: Adapter) -> float:
    """The ``alpha / rank`` factor ComfyUI multiplies the raw difference by (1 without alpha)."""
    if ad.alpha is None:
        return 1.0
    if ad.kind == "lora":
        return ad.alpha / ad.shapes["down"][0]
    if ad.kind == "loha":
        return ad.alpha / ad.shapes["w1b"][0]
    if ad.kind == "lokr":
        rank = ad.shapes["w2b"][0] if "w2" not in ad.keys else ad.shapes["w1b"][0] if "w1" not in ad.keys else None
        return 1.0 if rank is None else ad.alpha / rank
    return 1.0


def delta_shape(ad: Adapter) -> tuple[int, int]:
    """``(rows, elements)`` of the raw difference, from the header shapes alone (for up-front checks)."""
    s = ad.shapes
    if ad.kind == "lora":
        inner = math.prod(s["down"][1:])
        if "mid" in s:
            inner = s["down"][1] * math.prod(s["mid"][2:])
        return s["up"][0], s["up"][0] * inner
    if ad.kind == "loha":
        if "t1" in s:  # CP form: w1_a is [rank, out], t1 [rank, rank, kh, kw]
            rows = s["w1a"][1]
            return rows, rows * s["w1b"][1] * math.prod(s["t1"][2:])
        return s["w1a"][0], s["w1a"][0] * math.prod(s["w1b"][1:])
    if ad.kind == "lokr":
        a = s["w1"] if "w1" in s else (s["w1a"][0], s["w1b"][1])
        b = s["w2"] if "w2" in s else (s["w2a"][0], *s["w2b"][1:]) if "t2" not in s else \
            (s["w2a"][1], s["w2b"][1], *s["t2"][2:])
        return a[0] * b[0], math.prod(a) * math.prod(b)
    t = s["diff"] if ad.kind == "diff" else s["set"]
    return (t[0] if t else 1), math.prod(t)


def raw_delta(ad: Adapter, lora: LoRAFile, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The difference before ``alpha`` and strength, float32 on ``device``, reshaped to ``shape``."""
    def get(role: str) -> torch.Tensor:
        return lora.tensor(ad.keys[role]).to(device)

    if ad.kind == "lora":
        up, down = get("up"), get("down")
        if "mid" in ad.keys:  # Tucker LoCon: down' [r, in, kh, kw] = sum_j mid[r, j, kh, kw] * down[j, in]
            mid = get("mid")
            down = torch.einsum("rjhw,ji->rihw", mid, down.flatten(1))
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)
    if ad.kind == "loha":
        if "t1" in ad.keys:
            m1 = torch.einsum("ijkl,jr,ip->prkl", get("t1"), get("w1b"), get("w1a"))
            m2 = torch.einsum("ijkl,jr,ip->prkl", get("t2"), get("w2b"), get("w2a"))
        else:
            m1, m2 = get("w1a") @ get("w1b"), get("w2a") @ get("w2b")
        return (m1 * m2).reshape(shape)
    if ad.kind == "lokr":
        w1 = get("w1") if "w1" in ad.keys else get("w1a") @ get("w1b")
        if "w2" in ad.keys:
            w2 = get("w2")
        elif "t2" in ad.keys:
            w2 = torch.einsum("ijkl,jr,ip->prkl", get("t2"), get("w2b"), get("w2a"))
        else:
            w2 = get("w2a") @ get("w2b")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(shape)
    if ad.kind == "diff":
        return get("diff").reshape(shape)
    raise ValueError(f"no difference for adapter kind {ad.kind}")  # pragma: no cover - set/bias handled by callers


def patch_weight(weight: torch.Tensor, ad: Adapter, lora: LoRAFile, strength: float,
                 fn: RowFn | None = None) -> torch.Tensor:
    """Apply one adapter to a float32 ``weight`` (a view of the target rows), in place; returns ``weight``."""
    fn = fn or (lambda t: t)
    if ad.kind == "set":
        weight.copy_(lora.tensor(ad.keys["set"]).to(weight.device).reshape(weight.shape))
        return weight
    if ad.kind == "bias":
        return weight
    diff = raw_delta(ad, lora, tuple(weight.shape), weight.device)
    factor = alpha_factor(ad)
    if ad.dora_key is None:
        weight += fn((strength * factor) * diff)
        return weight
    return dora(weight, fn(factor * diff), lora.tensor(ad.dora_key).to(weight.device), strength)


def dora(weight: torch.Tensor, diff: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """Weight-decomposed update (see the module docstring), in place on ``weight``."""
    merged = weight + diff
    if magnitude.shape[0] == merged.shape[0]:  # one magnitude per output row: norm of the unmerged weight
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:  # one magnitude per input column
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    merged *= magnitude / (norm + torch.finfo(weight.dtype).eps)
    weight += strength * (merged - weight)
    return weight


def bias_delta(ad: Adapter, lora: LoRAFile, device: torch.device) -> torch.Tensor | None:
    """The ``diff_b`` bias difference (float32), or None."""
    return None if ad.bias_key is None else lora.tensor(ad.bias_key).to(device)


def low_rank(ad: Adapter, lora: LoRAFile, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(down [r, in], up [out, r] * alpha/rank)`` of a linear LoRA (a side path can run it as two matmuls);
    None for adapters that are not a plain low-rank product (LoHa, LoKr, DoRA, Tucker, diffs)."""
    if ad.kind != "lora" or "mid" in ad.keys or ad.dora_key is not None:
        return None
    down = lora.tensor(ad.keys["down"]).to(device).flatten(1)
    up = lora.tensor(ad.keys["up"]).to(device).flatten(1)
    return down, up * alpha_factor(ad)
