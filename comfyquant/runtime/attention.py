"""Quantized attention for plain PyTorch models: ``F.scaled_dot_product_attention`` calls routed to the int8
attention kernel (``kernels.triton_attention``) inside a scope, the rest passed through unchanged.

Measured on an H200 against SDPA's default (cuDNN) in the same run (docs/PERFORMANCE.md, "Attention"): at Wan
2.x 480p's 32,760 tokens int8 q k^T with fp8 p v runs 1.26x faster (3.9% relative error on random inputs,
SDPA 0.2%); at Flux 1024²'s 4,608 tokens it runs 0.74x. So only calls whose key sequence reaches
``min_tokens`` are routed; a shorter one, a mask, dropout, causal attention, a CPU tensor or an unsupported
head size goes to SDPA.

    with QuantizedAttention(AttentionPolicy(pv_fp8=True)):
        out = model(x)

With ``cudnn_first`` the calls left to SDPA run with cuDNN's fused kernel first in SDPA's backend order (exact
bf16 attention; ComfyUI 0.30 puts FlashAttention-2 first, 0.48-0.60x cuDNN's speed on an H200); with
``quantize=False`` that backend order is all the scope changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from comfyquant.runtime.kernels.backends import FP8_CC, device_capability
from comfyquant.runtime.kernels.configs import ATTENTION_HEAD_DIMS, ATTENTION_TILE


@dataclass(frozen=True)
class AttentionPolicy:
    """Which SDPA calls run quantized: key sequences of at least ``min_tokens`` (below it cuDNN's bf16 kernel
    is faster; against FlashAttention-2, which ComfyUI puts first, from about 4,096), head sizes in
    ``head_dims``, p and v in fp8 (``pv_fp8``, the faster variant) or 16-bit."""

    min_tokens: int = 16384
    pv_fp8: bool = True
    head_dims: tuple[int, ...] = ATTENTION_HEAD_DIMS  # head sizes to route (the kernel takes any of these)
    emulate: bool = False  # CPU tensors: the scheme's float64 reference (q k^T part; p v exact), for quality evals
    quantize: bool = True  # False: no call runs on the int8 kernel (with cudnn_first: only the backend order changes)
    cudnn_first: bool = False  # CUDA calls left to SDPA: cuDNN's kernel first, then SDPA's others (exact bf16)


CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]  # SDPA falls through to the next backend for a call cuDNN cannot run
# backend order (``set_priority``) came after torch 2.4, which comfyquant supports: without it ``cudnn_first``
# leaves SDPA's own choice (as ComfyUI does on such a torch)
ORDER_SUPPORTED = "set_priority" in inspect.signature(sdpa_kernel).parameters


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: AttentionPolicy,
             kwargs: dict[str, Any]) -> bool:
    """Whether the int8 kernel can and should run ``F.scaled_dot_product_attention(q, k, v, **kwargs)``."""
    if kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal", False):
        return False
    if kwargs.get("enable_gqa", False) or set(kwargs) - {"attn_mask", "dropout_p", "is_causal", "scale"}:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    on_gpu = q.is_cuda and k.is_cuda and v.is_cuda
    emulated = policy.emulate and not (q.is_cuda or k.is_cuda or v.is_cuda)  # any float dtype: the reference
    if not (emulated or (on_gpu and q.dtype in (torch.float16, torch.bfloat16))):
        return False
    b, h, _, d = q.shape
    return (d in ATTENTION_HEAD_DIMS and d in policy.head_dims and k.shape[:2] == (b, h) and k.shape[3] == d
            and v.shape == k.shape and k.shape[2] >= policy.min_tokens and not torch.is_grad_enabled())


def pv_fp8(policy: AttentionPolicy, device: torch.device) -> bool:
    """Whether a routed call takes p and v in fp8: the policy asks and the GPU has fp8 (sm_89+; Triton has no e4m3
    type on an A100 or RTX 30 series card, so there the call takes them in 16 bits)."""
    cap = device_capability(device)
    return policy.pv_fp8 and cap is not None and cap >= FP8_CC


class QuantizedAttention(TorchFunctionMode):
    """A scope in which eligible ``F.scaled_dot_product_attention`` calls run on the int8 attention kernel."""

    def __init__(self, policy: AttentionPolicy | None = None) -> None:
        super().__init__()
        self.policy = policy or AttentionPolicy()
        self.routed = 0  # calls that ran quantized (inspectable: a scope that routed nothing is visible)
        self.cudnn = 0  # calls left to SDPA that ran with cuDNN first in its backend order

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or len(args) != 3:
            return func(*args, **kwargs)
        if self.policy.quantize and eligible(*args, self.policy, kwargs):
            self.routed += 1
            q, k, v = args
            if not q.is_cuda:  # policy.emulate: the scheme's reference, with the kernel's default blocks
                from comfyquant.runtime.kernels.reference import int8_attention_ref

                return int8_attention_ref(q, k, v, ATTENTION_TILE.block_m, ATTENTION_TILE.block_n,
                                          kwargs.get("scale")).to(q.dtype)
            from comfyquant.runtime.kernels.triton_attention import int8_attention

            return int8_attention(q, k, v, sm_scale=kwargs.get("scale"), pv_fp8=pv_fp8(self.policy, q.device))
        if self.policy.cudnn_first and ORDER_SUPPORTED and all(isinstance(t, torch.Tensor) and t.is_cuda
                                                               for t in args):
            self.cudnn += 1
            with sdpa_kernel(CUDNN_FIRST, set_priority=True):  # inner to ComfyUI's own order: this one applies
                return func(*args, **kwargs)
        return func(*args, **kwargs)
