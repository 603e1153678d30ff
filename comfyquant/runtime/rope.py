"""A DiT attention's q / k RMSNorm and interleaved RoPE, from the projections' output into attention's layout.

``norm_rope_heads`` does what ComfyUI's Flux-family blocks do between the qkv projection and SDPA (view the
projection as ``[3, B, H, L, D]``, ``QKNorm`` on q and k, ``apply_rope`` with ``EmbedND``'s rotations, and in a
double block ``torch.cat`` of the text and image streams) as one Triton launch per stream on CUDA
(``kernels.triton_rope``), writing each stream's rows of the joint q / k / v directly; ``norm_rope_parts`` the same
from separate q / k / v projections (Qwen-Image's attention). Elsewhere they run the same torch ops the stock blocks
run (comfy-kitchen's eager RoPE formula), so CPU results are the stock ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfyquant.runtime.kernels.backends import triton_available

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v (or their sources)


def rope_reference(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as comfy-kitchen's eager backend computes it: ``x`` ``[..., L, D]`` in ``pe``'s dtype,
    pair ``i`` rotated by ``pe[..., i, :, :]`` (``[., ., L, D/2, 2, 2]``), back in x's dtype."""
    x_ = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x_.shape[2] != 1 and pe.shape[2] != 1 and x_.shape[2] != pe.shape[2]:
        pe = pe[:, :, :x_.shape[2]]
    out = pe[..., 0] * x_[..., 0]
    out.addcmul_(pe[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


PE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Flux's EmbedND output; Qwen-Image casts it to x's dtype


def rope_fits(pe: torch.Tensor | None, batch: int, tokens: int, head_dim: int) -> bool:
    """Whether the kernel reads ``pe`` as it is: ``[1 or B, 1, 1 or >= tokens, D/2, 2, 2]`` in fp32 (ComfyUI's
    ``EmbedND`` output) or 16-bit (Qwen-Image's forward casts it to the model's dtype; the kernel widens it to fp32
    as it loads it), with the last three dims contiguous."""
    if pe is None:
        return True
    return (pe.dtype in PE_DTYPES and pe.dim() == 6 and pe.shape[0] in (1, batch) and pe.shape[1] == 1
            and (pe.shape[2] == 1 or pe.shape[2] >= tokens) and tuple(pe.shape[3:]) == (head_dim // 2, 2, 2)
            and pe.stride()[3:] == (4, 2, 1))


def kernel_applies(srcs: QKV, heads: int, head_dim: int,
                   weights: tuple[torch.Tensor | None, torch.Tensor | None], pe: torch.Tensor | None,
                   tokens: int) -> bool:
    """Whether the Triton kernel takes this call: q's, k's and v's sources CUDA fp16 / bf16 ``[B, L, >= H D]`` of
    one dtype and one set of strides with a unit last stride (one projection passed three times, or three), ``D``
    a power of two from 16 to 256, the norm weights (both or neither) ``[D]`` in their dtype on their device, and
    ``pe`` as :func:`rope_fits` reads it for ``tokens``."""
    d, src = head_dim, srcs[0]
    if not (src.is_cuda and triton_available() and src.dtype in (torch.float16, torch.bfloat16)):
        return False
    if src.dim() != 3 or src.stride(-1) != 1 or d < 16 or d > 256 or d & (d - 1):
        return False
    for t in srcs[1:]:
        if t is not src and (t.dtype != src.dtype or t.device != src.device or t.shape[:2] != src.shape[:2]
                             or t.stride() != src.stride()):
            return False
    if any(t.shape[-1] < heads * d for t in srcs):
        return False
    qw, kw = weights
    if (qw is None) != (kw is None):
        return False
    for w in (qw, kw):
        if w is not None and (w.shape != (d,) or w.dtype != src.dtype or w.device != src.device):
            return False
    return rope_fits(pe, src.shape[0], tokens, d)


def _heads(t: torch.Tensor, offset: int, heads: int, head_dim: int) -> torch.Tensor:
    """``[B, H, L, D]`` view of the ``H D`` columns of ``t`` (``[B, L, .]``) from ``offset``."""
    return t[..., offset:offset + heads * head_dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)


def norm_rope_parts(srcs: QKV, offsets: tuple[int, int, int], heads: int, head_dim: int,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float | None,
                    pe: torch.Tensor | None, out: QKV | None = None, start: int = 0, write_v: bool = True,
                    kernel: bool | None = None) -> QKV:
    """q, k, v of one stream, each ``[B, H, L_OUT, D]``: the ``H D`` columns of ``srcs[i]`` (``[B, L, .]``) from
    ``offsets[i]``, q and k each ``F.rms_norm`` over the head dim with their weight (None: no norm; ``eps`` None:
    the norm's default) and then rotated by ``pe`` (None: not rotated). ``out``: the joint buffers to write rows
    ``[start, start + L)`` of (a double block's streams share them; ``pe`` then covers the joint sequence); None:
    new tensors of ``L`` tokens. ``write_v`` False leaves v as its view of the source (``out`` must be None then).
    ``kernel``: whether to launch the Triton kernel, as a caller that checked :func:`kernel_applies` knows (None:
    checked here)."""
    src = srcs[0]
    b, length = src.shape[0], src.shape[1]
    if out is None:
        shape = (b, heads, length, head_dim)
        out = (torch.empty(shape, dtype=src.dtype, device=src.device),
               torch.empty(shape, dtype=src.dtype, device=src.device),
               torch.empty(shape, dtype=src.dtype, device=src.device) if write_v else None)
    elif not write_v:
        raise ValueError("norm_rope_heads: joint buffers need v written (write_v=True)")
    q, k, v = out
    if kernel is None:
        kernel = kernel_applies(srcs, heads, head_dim, (q_weight, k_weight), pe, start + length)
    if kernel:
        from comfyquant.runtime.kernels.triton_rope import norm_rope_launch

        norm_eps = torch.finfo(torch.float32).eps if eps is None else eps  # F.rms_norm's default below fp64
        norm_rope_launch(srcs, offsets, heads, q_weight, k_weight, norm_eps, pe, q, k, v, start)
    else:
        sq, sk = (_heads(t, o, heads, head_dim) for t, o in zip(srcs[:2], offsets[:2], strict=True))
        if q_weight is not None:
            sq = F.rms_norm(sq, (head_dim,), q_weight, eps)
            sk = F.rms_norm(sk, (head_dim,), k_weight, eps)
        if pe is not None:
            rows = pe if pe.shape[2] == 1 else pe[:, :, start:start + length]
            sq, sk = rope_reference(sq, rows), rope_reference(sk, rows)
        q[:, :, start:start + length] = sq
        k[:, :, start:start + length] = sk
        if write_v:
            v[:, :, start:start + length] = _heads(srcs[2], offsets[2], heads, head_dim)
    if not write_v:
        v = _heads(srcs[2], offsets[2], heads, head_dim)
    return q, k, v


def norm_rope_heads(qkv: torch.Tensor, heads: int, head_dim: int, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, eps: float | None, pe: torch.Tensor | None,
                    out: QKV | None = None, start: int = 0, write_v: bool = True, kernel: bool | None = None) -> QKV:
    """:func:`norm_rope_parts` of one projection ``qkv`` (``[B, L, >= 3 H D]``: q's heads, then k's, then v's, as a
    Flux block's ``qkv`` and a single block's ``linear1`` write them)."""
    width = heads * head_dim
    return norm_rope_parts((qkv, qkv, qkv), (0, width, 2 * width), heads, head_dim, q_weight, k_weight, eps, pe,
                           out, start, write_v, kernel)
