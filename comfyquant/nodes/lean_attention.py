"""ComfyUI's PyTorch attention without its per-call backend-order scope, where that scope would not change the
kernel SDPA runs.

ComfyUI 0.30 wraps every ``F.scaled_dot_product_attention`` call of ``attention_pytorch`` (the attention of
SDXL's UNet, Flux, Wan, SD3 ...) in ``torch.nn.attention.sdpa_kernel(order, set_priority=True)``: about twenty
calls into torch to set and restore SDPA's enabled backends and their order, 16.7 µs a call on the CPU we build
on (the SDXL profile on an H100 host, run 90: 140 such calls a step, 9.7 ms of a host-bound step's host time
under the profiler). SDPA runs a call on the first backend of its order that is
enabled and can run it; when that is the same backend under ComfyUI's order (FlashAttention for most image and
video models' calls, the memory-efficient kernel for an fp32 one), the scope changes nothing: the same kernel on
the same inputs, so the same output, for a few flag reads, one eligibility test and SDPA's own selection
(``torch._fused_sdp_choice``). :func:`settle_priority` first lets torch set its lazily chosen order up inside
ComfyUI's scope, as ComfyUI's first call would.

:class:`LeanSdpa` does ``attention_pytorch``'s own work (the heads reshape, the mask's broadcast dims, SDPA, the
output reshape) for such calls and declines every other one (grouped-query attention, a batch over ComfyUI's
split limit, another attention function, a backend SDPA would pick differently, tracing), which then runs
ComfyUI's function as before. Read once from ComfyUI: the undecorated ``attention_pytorch``, its batch limit and
its backend order.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from comfyquant.runtime.sdpa_choice import SdpaChooser

# SDPA's fused backends and the checks that say whether one can run a call (the enabled flag's getter, the
# eligibility test on ``SDPAParams``: what SDPA's own selection asks); the math backend runs anything
# (a torch without one's test leaves it out: a call whose choice depends on it is declined)
_MATH = int(SDPBackend.MATH)
_OTHER_DEVICES = int(getattr(SDPBackend, "OVERRIDEABLE", -1))  # other device types' backends: never a CUDA call's
_BACKENDS: dict[int, tuple[Callable[[], bool], Callable[[Any], bool]]] = {
    int(getattr(SDPBackend, name)): (getattr(torch._C, flag), getattr(torch.backends.cuda, test))
    for name, flag, test in (("FLASH_ATTENTION", "_get_flash_sdp_enabled", "can_use_flash_attention"),
                             ("EFFICIENT_ATTENTION", "_get_mem_efficient_sdp_enabled", "can_use_efficient_attention"),
                             ("CUDNN_ATTENTION", "_get_cudnn_sdp_enabled", "can_use_cudnn_attention"))
    if hasattr(SDPBackend, name) and hasattr(torch._C, flag) and hasattr(torch.backends.cuda, test)}


# ComfyUI 0.30's ``attention_pytorch`` parameters, which LeanSdpa's call reproduces
SIGNATURE = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape", "kwargs")


class ComfyAttention:
    """What :class:`LeanSdpa` reads from ComfyUI once: its undecorated ``attention_pytorch``, the batch size above
    which it splits SDPA calls, and the backend order its SDPA wrapper sets (None: it sets none, so its call is
    SDPA's plain one)."""

    def __init__(self, function: Callable[..., Any] | None, batch_limit: int, order: list[int] | None) -> None:
        self.function, self.batch_limit, self.order = function, batch_limit, order

    @classmethod
    def load(cls) -> ComfyAttention:
        """Read from the imported ComfyUI; ``function`` None (nothing is taken) where ``attention_pytorch`` has
        another signature than the one :class:`LeanSdpa` reproduces (a ComfyUI that changed it)."""
        attention = importlib.import_module("comfy.ldm.modules.attention")
        ops = importlib.import_module("comfy.ops")
        fn = getattr(getattr(attention, "attention_pytorch", None), "__wrapped__", None)
        if fn is not None and tuple(inspect.signature(fn).parameters) != SIGNATURE:
            fn = None
        order = getattr(ops, "SDPA_BACKEND_PRIORITY", None)
        return cls(fn, int(getattr(attention, "SDP_BATCH_LIMIT", 0)),
                   None if order is None else [int(b) for b in order])


def _enabled(backend: int) -> bool | None:
    """Whether ``backend`` is enabled in SDPA's state; None for one this does not know."""
    if backend == _MATH:
        return torch._C._get_math_sdp_enabled()
    checks = _BACKENDS.get(backend)
    return None if checks is None else checks[0]()


def _first(order: list[int], params: Any) -> int | None:
    """The first backend of ``order`` that can run the call ``params`` (SDPA's own test, the enabled flag included;
    math runs anything it is given); None where a backend this does not know comes first."""
    for b in order:
        if b == _MATH:
            if torch._C._get_math_sdp_enabled():
                return b
            continue
        if b == _OTHER_DEVICES:
            continue
        checks = _BACKENDS.get(b)
        if checks is None:
            return None
        if checks[1](params):
            return b
    return None


def same_kernel(order: list[int] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> bool:
    """Whether SDPA, in its current state, runs ``(q, k, v, mask)`` (no dropout, not causal) on the kernel it would
    run inside ``sdpa_kernel(order, set_priority=True)``: ``order`` None (no scope); on a CUDA tensor, every
    backend of ``order`` is enabled now (the scope enables them) and the backend SDPA selects now
    (``torch._fused_sdp_choice``: its own selection, whatever order it keeps) is the first of ``order`` that can
    run the call; on the CPU (whose SDPA picks its flash kernel where it can, else math, by the same flags)
    those two flags set."""
    if order is None:
        return True
    if not q.is_cuda:
        return torch._C._get_flash_sdp_enabled() and torch._C._get_math_sdp_enabled()
    if not all(_enabled(b) for b in order):
        return False
    want = _first(order, torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False))
    return want is not None and want == int(torch._fused_sdp_choice(q, k, v, mask))


def unscoped_call(order: list[int] | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]:
    """Whether :class:`LeanSdpa` runs an unmasked call's stock kernel without ``order``'s scope (what the attention
    chooser times it as: ``runtime.sdpa_choice.SdpaChooser``'s ``unscoped``)."""
    return lambda q, k, v: same_kernel(order, q, k, v, None)


def settle_priority(order: list[int] | None) -> None:
    """Let SDPA set up its backend order inside ComfyUI's scope, as ComfyUI's first attention call does.

    torch (2.9+) picks its default order lazily, at the process's first SDPA selection: on Hopper / Blackwell with
    cuDNN > 9.15 it puts cuDNN first then, even inside a ``set_priority`` scope, whose exit restores the order it
    found (torch's). So the first call ran cuDNN where ComfyUI's order says FlashAttention (the H100 check of
    2026-12-06: only the process's first call differed), and a first selection outside any scope (this module's
    :func:`same_kernel`) would leave cuDNN first for good. Settled here, inside the scope, the first call follows
    ComfyUI's order and the order outside it stays torch's."""
    global _settled
    if _settled or order is None or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return
    t = torch.empty((1, 1, 128, 64), device="cuda", dtype=torch.bfloat16)  # the selection reads metadata only
    with sdpa_kernel([SDPBackend(b) for b in order], set_priority=True):
        torch._fused_sdp_choice(t, t, t)
    _settled = True


# whether settle_priority ran in this process: torch's lazy setup happens once, and ComfyUI deep-copies model
# options (and this override with them) per sampling call (a memo of a process fact, like torch's own flag)
_settled = False


class LeanSdpa:
    """``attention_pytorch``'s calls that :func:`same_kernel` accepts, computed without ComfyUI's backend-order
    scope; ``calls`` counts them. With a ``chooser`` (``runtime.sdpa_choice``) an unmasked call runs on cuDNN's
    kernel where the chooser measured it faster than the one ComfyUI's order picks (counted in ``calls`` too)."""

    def __init__(self, comfy: ComfyAttention, chooser: SdpaChooser | None = None) -> None:
        self.comfy, self.chooser = comfy, chooser
        self.calls = 0
        if comfy.function is not None:
            settle_priority(comfy.order)

    def __call__(self, func: Callable[..., Any], q: Any = None, k: Any = None, v: Any = None, heads: int = 1,
                 mask: Any = None, attn_precision: Any = None, skip_reshape: bool = False,
                 skip_output_reshape: bool = False, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """ComfyUI's ``func(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, **kwargs)``
        output, each argument positional or named as ComfyUI's callers pass them (Qwen-Image passes its mask
        positionally), or None where this declines (the caller then runs ``func``)."""
        c = self.comfy
        if (func is not c.function or args or kwargs.get("enable_gqa", False)
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
        if isinstance(mask, torch.Tensor):  # a batch dim, then a heads dim, where it has none (as ComfyUI adds them)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
        elif mask is not None:
            return None
        scale = kwargs.get("scale")
        out = self.chooser(q, k, v, scale) if self.chooser is not None and mask is None else None
        if out is None:
            if not same_kernel(c.order, q, k, v, mask):
                return None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                                 **({} if scale is None else {"scale": scale}))
        self.calls += 1
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * dim_head)
