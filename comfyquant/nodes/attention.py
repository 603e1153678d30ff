"""The ``attention`` option of Enable INT8 on MODEL: the model's long self-attention on comfyquant's int8
attention kernel (``runtime.attention``), through ComfyUI's ``optimized_attention_override`` hook.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` in place of its
attention function ``func``; the override runs ``func`` (or an override another node set before, kept and
called) inside a ``QuantizedAttention`` scope, so ComfyUI's own reshapes and masks stay as they are and only its
``F.scaled_dot_product_attention`` call, when eligible, goes to the kernel. ComfyUI 0.30 orders SDPA's backends
FlashAttention-2 first; on an H200 the int8 kernel beats that from ~4K tokens at head size 128 (Flux 1024²:
~1.45x, Wan 480p: 2.1-2.4x; docs/PERFORMANCE.md runs 16-17), so the node routes head size 128 from 4,096 keys.
Other attention backends (xformers, sage, flash-attn packages) do not call SDPA and pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention

MODES = ("sdpa", "int8", "int8-fp8")  # sdpa: ComfyUI's own; int8: q k^T int8, p v bf16; int8-fp8: p v fp8 too
OVERRIDE_KEY = "optimized_attention_override"
NODE_MIN_TOKENS = 4096
NODE_HEAD_DIMS = (128,)


def policy_for(mode: str) -> AttentionPolicy | None:
    """The routing policy of a node ``attention`` mode (None for ``sdpa``)."""
    if mode not in MODES:
        raise ValueError(f"attention {mode!r} is not one of {', '.join(MODES)}")
    if mode == "sdpa":
        return None
    return AttentionPolicy(min_tokens=NODE_MIN_TOKENS, pv_fp8=mode == "int8-fp8", head_dims=NODE_HEAD_DIMS)


class QuantizedAttentionOverride:
    """ComfyUI's attention override: ``func`` (or the override it replaced) inside a quantized-attention scope.
    ``calls`` / ``routed`` count overridden calls and the SDPA calls that ran on the int8 kernel."""

    def __init__(self, policy: AttentionPolicy, previous: Callable[..., Any] | None = None) -> None:
        self.policy, self.previous = policy, previous
        self.calls = self.routed = 0

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        run = (lambda: self.previous(func, *args, **kwargs)) if self.previous is not None else (
            lambda: func(*args, **kwargs))
        if not self.may_route(*args, **kwargs):  # no scope: a TorchFunctionMode costs every op in it host time
            return run()
        with QuantizedAttention(self.policy) as scope:
            out = run()
        self.routed += scope.routed
        return out

    def may_route(self, q: Any = None, k: Any = None, v: Any = None, heads: int = 1, *args: Any,
                  mask: Any = None, skip_reshape: bool = False, **kwargs: Any) -> bool:
        """Whether ComfyUI's attention call ``(q, k, v, heads, mask=..., skip_reshape=...)`` can reach the kernel:
        CUDA tensors, no mask, a routed head size and enough keys (``[B, H, T, D]`` when ``skip_reshape``, else
        ``[B, T, H * D]``). The scope's own check decides on the SDPA call itself."""
        if args or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or mask is not None:
            return False
        if not q.is_cuda or k.dim() not in (3, 4):
            return False
        tokens = k.shape[2] if skip_reshape else k.shape[1]
        head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // max(int(heads), 1)
        return tokens >= self.policy.min_tokens and head_dim in self.policy.head_dims

    def __deepcopy__(self, memo: dict) -> QuantizedAttentionOverride:  # ComfyUI deep-copies model options
        return QuantizedAttentionOverride(self.policy, self.previous)


def enable_quantized_attention(patcher: Any, mode: str) -> QuantizedAttentionOverride | None:
    """Install the override for ``mode`` on ``patcher``'s model options (keeping an earlier override inside it);
    returns it, or None for ``sdpa``."""
    policy = policy_for(mode)
    if policy is None:
        return None
    opts = patcher.model_options.setdefault("transformer_options", {})
    override = QuantizedAttentionOverride(policy, opts.get(OVERRIDE_KEY))
    opts[OVERRIDE_KEY] = override
    return override
