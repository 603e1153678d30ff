"""A DiT attention's q / k RMSNorm and interleaved RoPE, from the qkv projection's output into attention's layout.

``norm_rope_heads`` does what ComfyUI's Flux-family blocks do between the qkv projection and SDPA (view the
projection as ``[3, B, H, L, D]``, ``QKNorm`` on q and k, ``apply_rope`` with ``EmbedND``'s rotations, and in a
double block ``torch.cat`` of the text and image streams) as one Triton launch per stream on CUDA
(``kernels.triton_rope``), writing each stream's rows of the joint q / k / v directly. Elsewhere it runs the same
torch ops the stock blocks run (comfy-kitchen's eager RoPE formula), so CPU results are the stock ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfyquant.runtime.kernels.backends import triton_available

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rope_reference(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as comfy-kitchen's eager backend computes it: ``x`` ``[..., L, D]`` in ``pe``'s dtype,
    pair ``i`` rotated by ``pe[..., i, :, :]`` (``[., ., L, D/2, 2, 2]``), back in x's dtype."""
    x_ = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x_.shape[2] != 1 and pe.shape[2] != 1 and x_.shape[2] != pe.shape[2]:
        pe = pe[:, :, :x_.shape[2]]
    out = pe[..., 0] * x_[..., 0]
    out.addcmul_(pe[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def rope_fits(pe: torch.Tensor | None, batch: int, tokens: int, head_dim: int) -> bool:
    """Whether the kernel reads ``pe`` as it is: fp32 ``[1 or B, 1, 1 or >= tokens, D/2, 2, 2]`` with the last
    three dims contiguous (ComfyUI's ``EmbedND`` output is)."""
    if pe is None:
        return True
    return (pe.dtype == torch.float32 and pe.dim() == 6 and pe.shape[0] in (1, batch) and pe.shape[1] == 1
            and (pe.shape[2] == 1 or pe.shape[2] >= tokens) and tuple(pe.shape[3:]) == (head_dim // 2, 2, 2)
            and pe.stride()[3:] == (4, 2, 1))


def kernel_applies(qkv: torch.Tensor, heads: int, head_dim: int,
                   weights: tuple[torch.Tensor | None, torch.Tensor | None], pe: torch.Tensor | None,
                   tokens: int) -> bool:
    """Whether :func:`norm_rope_heads` takes the Triton kernel for this call: a CUDA fp16 / bf16 projection
    ``[B, L, >= 3 H D]`` with a unit last stride, ``D`` a power of two from 16 to 256, the norm weights (both or
    neither) ``[D]`` in its dtype on its device, and ``pe`` as :func:`rope_fits` reads it for ``tokens``."""
    d = head_dim
    if not (qkv.is_cuda and triton_available() and qkv.dtype in (torch.float16, torch.bfloat16)):
        return False
    if qkv.dim() != 3 or qkv.stride(-1) != 1 or qkv.shape[-1] < 3 * heads * d or d < 16 or d > 256 or d & (d - 1):
        return False
    qw, kw = weights
    if (qw is None) != (kw is None):
        return False
    for w in (qw, kw):
        if w is not None and (w.shape != (d,) or w.dtype != qkv.dtype or w.device != qkv.device):
            return False
    return rope_fits(pe, qkv.shape[0], tokens, d)


def norm_rope_heads(qkv: torch.Tensor, heads: int, head_dim: int, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, eps: float | None, pe: torch.Tensor | None,
                    out: QKV | None = None, start: int = 0, write_v: bool = True, kernel: bool | None = None) -> QKV:
    """q, k, v of one stream's projection ``qkv`` (``[B, L, 3 H D]``, or a view whose first ``3 H D`` columns
    are it): q and k each ``F.rms_norm`` over the head dim with their weight (None: no norm; ``eps`` None: the
    norm's default), then rotated by ``pe`` (None: not rotated), all ``[B, H, L_OUT, D]``. ``out``: the joint
    buffers to write rows ``[start, start + L)`` of (a double block's streams share them; ``pe`` then covers
    the joint sequence); None: new tensors of ``L`` tokens. ``write_v`` False leaves v as the view of ``qkv``
    (``out`` must be None then). ``kernel``: whether to launch the Triton kernel, as a caller that checked
    :func:`kernel_applies` itself knows (None: checked here)."""
    b, length = qkv.shape[0], qkv.shape[1]
    width = 3 * heads * head_dim
    if out is None:
        shape = (b, heads, length, head_dim)
        out = (torch.empty(shape, dtype=qkv.dtype, device=qkv.device),
               torch.empty(shape, dtype=qkv.dtype, device=qkv.device),
               torch.empty(shape, dtype=qkv.dtype, device=qkv.device) if write_v else None)
    elif not write_v:
        raise ValueError("norm_rope_heads: joint buffers need v written (write_v=True)")
    q, k, v = out
    view = qkv[..., :width] if qkv.shape[-1] != width else qkv
    if kernel is None:
        kernel = kernel_applies(qkv, heads, head_dim, (q_weight, k_weight), pe, start + length)
    if kernel:
        from comfyquant.runtime.kernels.triton_rope import norm_rope_launch

        norm_eps = torch.finfo(torch.float32).eps if eps is None else eps  # F.rms_norm's default below fp64
        norm_rope_launch(qkv, heads, q_weight, k_weight, norm_eps, pe, q, k, v, start)
    else:
        sq, sk, sv = view.reshape(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if q_weight is not None:
            sq = F.rms_norm(sq, (head_dim,), q_weight, eps)
            sk = F.rms_norm(sk, (head_dim,), k_weight, eps)
        if pe is not None:
            rows = pe if pe.shape[2] == 1 else pe[:, :, start:start + length]
            sq, sk = rope_reference(sq, rows), rope_reference(sk, rows)
        q[:, :, start:start + length] = sq
        k[:, :, start:start + length] = sk
        if write_v:
            v[:, :, start:start + length] = sv
        else:
            v = sv
    if not write_v:
        v = view.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)[2]
    return q, k, v
