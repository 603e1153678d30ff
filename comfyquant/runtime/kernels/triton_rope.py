"""Triton kernel: a DiT's per-head q / k RMSNorm and interleaved RoPE in one pass, from the qkv projection's output
straight into attention's ``[B, H, L, D]`` layout (the device code and its launch).

In ComfyUI's Flux blocks each attention call costs, besides the GEMMs and SDPA: an RMSNorm of q and of k (a
launch each), RoPE (comfy-kitchen's kernel, or without its CUDA build seven fp32 elementwise launches per tensor),
and in double blocks three ``torch.cat`` joining the text and image streams. ComfyUI's Flux class at 1024² spent
about 10 ms of a 50 ms int8 step there on an H100 (docs/PERFORMANCE.md, run 99's profile). Here one program takes
``BT`` tokens x ``HG`` heads: it loads their RoPE rotations once (``[D/2, 2, 2]`` per token, fp32 or 16-bit, ComfyUI's
``EmbedND`` layout), and per head reads q, k (and v) of those tokens from the projection's rows, normalizes q and k
(fp32 sum of squares, the norm rounded to the input dtype as ``F.rms_norm`` returns it), rotates them in fp32
(``out[2i + r] = F[i, r, 0] x[2i] + F[i, r, 1] x[2i + 1]``) and stores q, k (and v) at token ``start + t`` of the
joint sequence: a double block's two streams each write their own rows, so no join is left to do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels.configs import cdiv
from comfyquant.runtime.kernels.launch import FastKernel

TOKENS = 32  # tokens per program
HEADS = 4  # heads per program (their RoPE rotations loaded once)
WARPS = 4


@triton.jit
def _norm_rope_head(src, w_ptr, f00, f01, f10, f11, dst, toks, tmask, cols, eps, D: tl.constexpr,
                    NORM: tl.constexpr, ROPE: tl.constexpr):
    """One head of ``toks``: load ``[BT, D]`` from ``src`` rows, RMSNorm with ``w`` (NORM), rotate (ROPE), store."""
    x = tl.load(src + cols[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols).to(tl.float32)
        x = (x * rstd[:, None] * w[None, :]).to(dst.dtype.element_ty).to(tl.float32)  # F.rms_norm's rounding
    if ROPE:
        e, o = tl.split(tl.reshape(x, (x.shape[0], D // 2, 2)))
        x = tl.reshape(tl.join(f00 * e + f01 * o, f10 * e + f11 * o), (x.shape[0], D))
    tl.store(dst + cols[None, :], x.to(dst.dtype.element_ty), mask=tmask[:, None])


@triton.jit(do_not_specialize=["q_off", "k_off", "v_off", "L", "H", "L_OUT", "start", "s_b", "s_l", "pe_b", "pe_l"])
def _norm_rope_kernel(qs_ptr, ks_ptr, vs_ptr, q_off, k_off, v_off, qw_ptr, kw_ptr, pe_ptr, q_ptr, k_ptr, v_ptr, L, H,
                      L_OUT, start, s_b, s_l, pe_b, pe_l, eps, D: tl.constexpr, BT: tl.constexpr, HG: tl.constexpr,
                      NORM: tl.constexpr, ROPE: tl.constexpr, WRITE_V: tl.constexpr):
    """Program (token block, head group, batch item). q's / k's / v's heads (``H * D`` columns each) start at
    column ``*_off`` of their source rows (one projection's output for all three, or three projections'), rows
    ``s_l`` elements apart a token, ``s_b`` a batch item; ``pe``: fp32 or 16-bit ``[., Lj, D/2, 2, 2]`` (widened
    to fp32 as loaded) rows at ``pe_l`` elements a token (``pe_b`` a batch item, 0 broadcast); q / k / v:
    ``[B, H, L_OUT, D]``."""
    b = tl.program_id(2)
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = toks < L
    cols = tl.arange(0, D)
    pairs = tl.arange(0, D // 2)
    f00 = tl.zeros((BT, D // 2), dtype=tl.float32)
    f01 = f00
    f10 = f00
    f11 = f00
    if ROPE:
        pe = pe_ptr + b.to(tl.int64) * pe_b + (start + toks).to(tl.int64)[:, None] * pe_l + 4 * pairs[None, :]
        f00 = tl.load(pe, mask=tmask[:, None], other=0.0).to(tl.float32)
        f01 = tl.load(pe + 1, mask=tmask[:, None], other=0.0).to(tl.float32)
        f10 = tl.load(pe + 2, mask=tmask[:, None], other=0.0).to(tl.float32)
        f11 = tl.load(pe + 3, mask=tmask[:, None], other=0.0).to(tl.float32)
    rows = b.to(tl.int64) * s_b + toks.to(tl.int64)[:, None] * s_l
    for j in tl.static_range(HG):
        h = tl.program_id(1) * HG + j
        if h < H:
            out_rows = ((b * H + h).to(tl.int64) * L_OUT + start + toks.to(tl.int64))[:, None] * D
            _norm_rope_head(qs_ptr + rows + q_off + h * D, qw_ptr, f00, f01, f10, f11, q_ptr + out_rows, toks, tmask,
                            cols, eps, D, NORM, ROPE)
            _norm_rope_head(ks_ptr + rows + k_off + h * D, kw_ptr, f00, f01, f10, f11, k_ptr + out_rows, toks, tmask,
                            cols, eps, D, NORM, ROPE)
            if WRITE_V:
                v = tl.load(vs_ptr + rows + v_off + h * D + cols[None, :], mask=tmask[:, None], other=0.0)
                tl.store(v_ptr + out_rows + cols[None, :], v, mask=tmask[:, None])


_KERNEL = FastKernel(_norm_rope_kernel)


def norm_rope_launch(srcs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], offsets: tuple[int, int, int],
                     heads: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                     pe: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                     start: int = 0) -> None:
    """Write the normed, rotated q / k (and v, where given) of one stream into rows ``[start, start + L)`` of ``q`` /
    ``k`` / ``v`` (``[B, H, L_OUT, D]``, contiguous). ``srcs``: q's, k's and v's source (``[B, L, .]`` with one
    set of strides and a unit last stride; the same projection output three times, or three projections), their
    heads at columns ``offsets``. ``pe``: fp32 or 16-bit ``[B or 1, 1, >= start + L, D/2, 2, 2]`` with its last
    three dims contiguous, or None (no rotation); weights None: no norm. The caller checks shapes
    (:func:`runtime.rope.kernel_applies`)."""
    src = srcs[0]
    b, length = src.shape[0], src.shape[1]
    d = q.shape[-1]
    if pe is not None:
        pe_b = pe.stride(0) if pe.shape[0] > 1 else 0
        pe_l = pe.stride(2) if pe.shape[2] > 1 else 0  # one rotation for every token
    else:
        pe_b = pe_l = 0
    norm = q_weight is not None
    ptrs = (*srcs, q_weight if norm else src, k_weight if norm else src, pe if pe is not None else src, q, k,
            v if v is not None else q)
    args = (*ptrs[:3], *offsets, *ptrs[3:], length, heads, q.shape[2], start, src.stride(0), src.stride(1), pe_b,
            pe_l, float(eps), d, TOKENS, HEADS, norm, pe is not None, v is not None)
    # what Triton specializes on (the ints are not specialized): the pointers' dtypes and 16-byte alignment, the
    # constexprs; cheaper than FastKernel's generic key over 25 arguments on every call
    key = (d, norm, pe is not None, v is not None, *((t.dtype, t.data_ptr() % 16 == 0) for t in ptrs))
    grid = (cdiv(length, TOKENS), cdiv(heads, HEADS), b)
    _KERNEL(grid, args, src.device, num_warps=WARPS, num_stages=1, key=key)
