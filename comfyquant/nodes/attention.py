"""The ``attention`` option of Enable INT8 on MODEL: the model's self-attention on the fastest kernel for each
call (cuDNN's bf16 kernel, or comfyquant's int8 kernel, ``runtime.attention``), and at the least host time,
through ComfyUI's ``optimized_attention_override`` hook.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` in place of its
attention function ``func``; the override runs ``func`` (or an override another node set before, kept and
called) inside a ``QuantizedAttention`` scope, so ComfyUI's own reshapes and masks stay as they are and only its
``F.scaled_dot_product_attention`` call changes. ComfyUI 0.30 orders SDPA's backends FlashAttention-2 first, at
0.48-0.60x cuDNN's speed on an H200 (docs/PERFORMANCE.md runs 16-17). Modes:

- ``auto`` (the default): per call shape the faster exact kernel of two, ComfyUI's choice and cuDNN's, timed once
  per GPU and cached (``runtime.sdpa_choice``), both without ComfyUI's per-call backend-order scope;
- ``sdpa``: ComfyUI's own choice of kernel, without its per-call backend-order scope where the scope would not
  change that choice (``nodes.lean_attention``: the same kernel, without the scope's host time);
- ``comfyui``: ComfyUI's attention function untouched (no override);
- ``cudnn``: calls of 1,024+ keys run on cuDNN's kernel (exact bf16 attention, no quantization), called directly;
- ``int8`` / ``int8-fp8``: calls of 16,384+ keys at head size 128 (Wan 480p and longer video), where the int8
  kernel beats cuDNN too, run on it (``int8-fp8``: p and v in fp8 as well); the rest as ``auto`` runs them.

Only the int8 kernel's calls (and, over another node's override, the ``cudnn`` modes' cuDNN-first order) go
through a ``QuantizedAttention`` scope: a TorchFunctionMode costs every op inside it host time.

Other attention backends (xformers, sage, flash-attn packages) do not call SDPA and pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from comfyquant.nodes.lean_attention import ComfyAttention, LeanSdpa, unscoped_call
from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention
from comfyquant.runtime.sdpa_choice import CudnnFirst, SdpaChooser

# auto: the faster of ComfyUI's kernel and cuDNN's per call shape (measured); sdpa: ComfyUI's kernel choice at less
# host time; comfyui: its attention untouched; cudnn: exact, on cuDNN; int8: q k^T int8 and p v bf16 on long
# sequences (the rest as auto); int8-fp8: p v fp8 too
MODES = ("auto", "sdpa", "comfyui", "cudnn", "int8", "int8-fp8")
# each mode's kernel choice for the calls the lean path computes (runtime.sdpa_choice): measured, cuDNN, or none
CHOOSERS = {"auto": "measured", "int8": "measured", "int8-fp8": "measured", "cudnn": "cudnn"}
DEFAULT_MODE = "auto"
OVERRIDE_KEY = "optimized_attention_override"
NODE_MIN_TOKENS = 16384  # int8 kernel vs cuDNN: 0.74x at 4,608 keys, 1.05-1.26x at 32,760 (runs 16-17)
NODE_CUDNN_MIN_TOKENS = 1024  # below this a call is short enough that the backend order's host cost is not paid
NODE_HEAD_DIMS = (128,)
# what each mode does, as the node's log line says it
DESCRIPTIONS = {
    "auto": "per call shape the faster of ComfyUI's kernel and cuDNN's, host time counted (timed once per GPU, "
            "cached)",
    "sdpa": "ComfyUI's kernel choice without its per-call backend setup (attention comfyui: ComfyUI's own)",
    "comfyui": "ComfyUI's own",
    "cudnn": f"cuDNN's kernel on every call of {NODE_CUDNN_MIN_TOKENS}+ keys",
    "int8": f"the int8 kernel for head size 128 from {NODE_MIN_TOKENS} keys, the rest as auto",
    "int8-fp8": f"the int8 kernel with p v in fp8 for head size 128 from {NODE_MIN_TOKENS} keys, the rest as auto",
}


def policy_for(mode: str) -> AttentionPolicy | None:
    """The routing policy of a node ``attention`` mode (None for ``auto``, ``sdpa`` and ``comfyui``: nothing is
    routed through a scope)."""
    if mode not in MODES:
        raise ValueError(f"attention {mode!r} is not one of {', '.join(MODES)}")
    if mode in ("auto", "sdpa", "comfyui"):
        return None
    return AttentionPolicy(min_tokens=NODE_MIN_TOKENS, pv_fp8=mode == "int8-fp8", head_dims=NODE_HEAD_DIMS,
                           quantize=mode != "cudnn", cudnn_first=True)


class QuantizedAttentionOverride:
    """ComfyUI's attention override: ``func`` (or the override it replaced) inside a quantized-attention scope
    where the ``policy`` may route the call (None: never), else ComfyUI's kernel choice at less host time
    (``lean``, :class:`~comfyquant.nodes.lean_attention.LeanSdpa`; not past an earlier override, which must run).
    ``calls`` / ``routed`` / ``cudnn`` count overridden calls, the SDPA calls that ran on the int8 kernel and
    those that ran with cuDNN first; ``lean.calls`` those computed without ComfyUI's backend-order scope, and with
    ``choose`` (:data:`CHOOSERS`: ``"measured"``, ``"cudnn"``) ``lean.chooser.chosen`` those of them that ran on
    cuDNN's kernel, as measured faster or always."""

    def __init__(self, policy: AttentionPolicy | None, previous: Callable[..., Any] | None = None,
                 comfy: ComfyAttention | None = None, choose: str | None = None) -> None:
        self.policy, self.previous, self.comfy, self.choose = policy, previous, comfy, choose
        self.lean = None
        if comfy is not None and previous is None:
            chooser: SdpaChooser | CudnnFirst | None = None
            if choose == "measured":
                chooser = SdpaChooser(comfy.order, unscoped=unscoped_call(comfy.order))
            elif choose == "cudnn":
                chooser = CudnnFirst()
            elif choose is not None:
                raise ValueError(f"attention kernel choice {choose!r} is not measured or cudnn")
            self.lean = LeanSdpa(comfy, chooser)
        self.calls = self.routed = self.cudnn = 0

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        routes = self.may_route(*args, **kwargs)
        if not routes and self.lean is not None:
            out = self.lean(func, *args, **kwargs)
            if out is not None:
                return out
        run = (lambda: self.previous(func, *args, **kwargs)) if self.previous is not None else (
            lambda: func(*args, **kwargs))
        if not routes:  # no scope: a TorchFunctionMode costs every op in it host time
            return run()
        with QuantizedAttention(self.policy) as scope:
            out = run()
        self.routed += scope.routed
        self.cudnn += scope.cudnn
        return out

    def may_route(self, q: Any = None, k: Any = None, v: Any = None, heads: int = 1, mask: Any = None,
                  attn_precision: Any = None, skip_reshape: bool = False, *args: Any, **kwargs: Any) -> bool:
        """Whether ComfyUI's attention call ``(q, k, v, heads, mask=..., skip_reshape=...)`` goes through the
        policy's scope: CUDA tensors, no mask, and at a routed head size enough keys for the int8 kernel, or (only
        over another node's override, where the lean path does not run) enough keys for cuDNN first
        (``[B, H, T, D]`` when ``skip_reshape``, else ``[B, T, H * D]``). The scope decides on the SDPA call
        itself."""
        if self.policy is None:
            return False
        if args or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or mask is not None:
            return False
        if not q.is_cuda or k.dim() not in (3, 4):
            return False
        tokens = k.shape[2] if skip_reshape else k.shape[1]
        head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // max(int(heads), 1)
        if self.policy.quantize and tokens >= self.policy.min_tokens and head_dim in self.policy.head_dims:
            return True
        return self.lean is None and self.policy.cudnn_first and tokens >= NODE_CUDNN_MIN_TOKENS

    def __deepcopy__(self, memo: dict) -> QuantizedAttentionOverride:  # ComfyUI deep-copies model options
        return QuantizedAttentionOverride(self.policy, self.previous, self.comfy, self.choose)


def enable_quantized_attention(patcher: Any, mode: str) -> QuantizedAttentionOverride | None:
    """Install the override for ``mode`` on ``patcher``'s model options (keeping an earlier override inside it);
    returns it, or None where it would change nothing (``comfyui``; ``auto`` / ``sdpa`` over another node's
    override, which must run). Works on any model patcher: quantized or not."""
    policy = policy_for(mode)
    opts = patcher.model_options.setdefault("transformer_options", {})
    previous = opts.get(OVERRIDE_KEY)
    if mode == "comfyui" or (policy is None and previous is not None):
        return None
    override = QuantizedAttentionOverride(policy, previous, ComfyAttention.load(), choose=CHOOSERS.get(mode))
    opts[OVERRIDE_KEY] = override
    return override
