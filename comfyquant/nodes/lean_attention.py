"""ComfyUI's PyTorch attention without its per-call backend-order scope, where that scope would not change the
kernel SDPA runs.

ComfyUI 0.30 wraps every ``F.scaled_dot_product_attention`` call of ``attention_pytorch`` (the attention of
SDXL's UNet, Flux, Wan, SD3 ...) in ``torch.nn.attention.sdpa_kernel(order, set_priority=True)``: about twenty
calls into torch to set and restore SDPA's enabled backends and their order, 16.7 µs a call on the CPU we build
on and about twice that on the H100 / H200 hosts (the SDXL profile, run 90: 140 such calls a step, ~10% of a
host-bound step's host time under the profiler). When the first backend of ComfyUI's order can run the call and
is also first and enabled in SDPA's current state, SDPA picks it with or without the scope: the same kernel on
the same inputs, so the same output, for a read of two flags and one eligibility check (~1 µs).

:class:`LeanSdpa` does ``attention_pytorch``'s own work (the heads reshape, SDPA, the output reshape) for such
calls and declines every other one (a mask, grouped-query attention, a batch over ComfyUI's split limit, another
attention function, a backend SDPA would pick differently, tracing), which then runs ComfyUI's function as
before. Read once from ComfyUI: the undecorated ``attention_pytorch``, its batch limit and its backend order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# SDPA's backends and the checks that say whether one can run a call (the enabled flag's getter, the eligibility
# test on ``SDPAParams``); the math backend runs anything, so a call it would take is left to ComfyUI's scope
_BACKENDS: dict[int, tuple[Callable[[], bool], Callable[[Any], bool]]] = {
    int(SDPBackend.FLASH_ATTENTION): (torch._C._get_flash_sdp_enabled, torch.backends.cuda.can_use_flash_attention),
    int(SDPBackend.EFFICIENT_ATTENTION): (torch._C._get_mem_efficient_sdp_enabled,
                                          torch.backends.cuda.can_use_efficient_attention),
    int(SDPBackend.CUDNN_ATTENTION): (torch._C._get_cudnn_sdp_enabled,
                                      getattr(torch.backends.cuda, "can_use_cudnn_attention", lambda p: False)),
}


class ComfyAttention:
    """What :class:`LeanSdpa` reads from ComfyUI once: its undecorated ``attention_pytorch``, the batch size above
    which it splits SDPA calls, and the backend order its SDPA wrapper sets (None: it sets none, so its call is
    SDPA's plain one)."""

    def __init__(self, function: Callable[..., Any] | None, batch_limit: int, order: list[int] | None) -> None:
        self.function, self.batch_limit, self.order = function, batch_limit, order

    @classmethod
    def load(cls) -> ComfyAttention:
        attention = importlib.import_module("comfy.ldm.modules.attention")
        ops = importlib.import_module("comfy.ops")
        fn = getattr(getattr(attention, "attention_pytorch", None), "__wrapped__", None)
        order = getattr(ops, "SDPA_BACKEND_PRIORITY", None)
        return cls(fn, int(getattr(attention, "SDP_BATCH_LIMIT", 0)),
                   None if order is None else [int(b) for b in order])


def same_kernel(order: list[int] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA, in its current state, runs ``(q, k, v)`` (no mask, no dropout, not causal) on the kernel it
    would run inside ``sdpa_kernel(order, set_priority=True)``: ``order`` None (no scope); on a CUDA tensor, the
    first backend of ``order`` can run the call and is enabled and first in the current order; on the CPU (whose
    SDPA picks its flash kernel where it can, else math, by the same enabled flags) both flags set, as the scope
    sets them."""
    if order is None:
        return True
    if not q.is_cuda:
        return torch._C._get_flash_sdp_enabled() and torch._C._get_math_sdp_enabled()
    first = order[0]
    checks = _BACKENDS.get(first)
    if checks is None or torch._C._get_sdp_priority_order()[0] != first or not checks[0]():
        return False
    return bool(checks[1](torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)))


class LeanSdpa:
    """``attention_pytorch``'s calls that :func:`same_kernel` accepts, computed without ComfyUI's backend-order
    scope; ``calls`` counts them."""

    def __init__(self, comfy: ComfyAttention) -> None:
        self.comfy = comfy
        self.calls = 0

    def __call__(self, func: Callable[..., Any], q: Any = None, k: Any = None, v: Any = None, heads: int = 1,
                 *args: Any, mask: Any = None, skip_reshape: bool = False, skip_output_reshape: bool = False,
                 **kwargs: Any) -> torch.Tensor | None:
        """ComfyUI's ``func(q, k, v, heads, mask=..., ...)`` output, or None where this declines (the caller then
        runs ``func``)."""
        c = self.comfy
        if (func is not c.function or args or mask is not None or kwargs.get("enable_gqa", False)
                or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor)
                or not isinstance(v, torch.Tensor) or q.dim() != (4 if skip_reshape else 3)
                or torch.compiler.is_compiling()):
            return None
        b = int(q.shape[0])
        if b > c.batch_limit:
            return None
        if skip_reshape:
            dim_head = int(q.shape[-1])
        else:  # [B, T, heads * D] -> [B, heads, T, D], as attention_pytorch reshapes
            dim_head = int(q.shape[-1]) // heads
            q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        if not same_kernel(c.order, q, k, v):
            return None
        scale = kwargs.get("scale")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                             **({} if scale is None else {"scale": scale}))
        self.calls += 1
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * dim_head)
