"""INT8 attention (Triton): ``softmax(q k^T / sqrt(d)) v`` with q and k in int8, p and v in bf16/fp16 or fp8.

At Wan 2.x's 32K tokens attention is about half of a block's time; quantized linears cannot move that half. Here
the q k^T product runs on int8 tensor cores (twice bf16's rate on Hopper) and the p v product and the online
softmax stay in 16-bit / fp32, as SageAttention does: q is quantized per block of rows (the block a program
owns), k per block of columns after subtracting its mean over tokens (a shift that leaves every softmax row
unchanged, since it adds one constant per query, and that removes the per-channel offset that would otherwise
set k's scale). The softmax scale and log2(e) are folded into q's scales so the kernel works in exp2.

With ``pv_fp8`` p (times 448) and v (a scale per channel, stored transposed) go through fp8 tensor cores too.
H200, against SDPA's cuDNN kernel (docs/PERFORMANCE.md, runs 16-17): 1.05x / 1.26x (fp8 p v) at 32,760 tokens,
0.69-0.74x at 4,608; against FlashAttention-2, which ComfyUI puts first, ~1.45x at 4,608.

Layout ``[batch, heads, tokens, head_dim]`` (``F.scaled_dot_product_attention``'s); no mask, no dropout, not
causal (diffusion models' attention). Imported lazily: only GPU backends import this module.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels.act_kernels import rne_int8
from comfyquant.runtime.kernels.configs import (
    ATTENTION_HEAD_DIMS,
    ATTENTION_TILE,
    ATTENTION_TILE_PV_FP8,
    AttentionConfig,
    cdiv,
)

LOG2E = math.log2(math.e)
FP8_MAX = 448.0  # e4m3fn: v's codes and p (in [0, 1], times 448) use the whole range


@triton.jit
def _attn_quant_blocks(X, MEAN, Q, S, stride_xb, stride_xh, stride_xs, H, T, scale_mul, HAS_MEAN: tl.constexpr,
                       BLOCK: tl.constexpr, D: tl.constexpr):
    """One program per (batch*head, block of ``BLOCK`` tokens): ``(x - mean)`` to int8 codes with one scale."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    ok = rows[:, None] < T
    x_base = X + (bh // H) * stride_xb + (bh % H) * stride_xh
    x = tl.load(x_base + rows[:, None] * stride_xs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(MEAN + bh * D + cols)[None, :]
        x = tl.where(ok, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-12) / 127.0
    tl.store(Q + bh * T * D + rows[:, None] * D + cols[None, :], rne_int8(x / scale), mask=ok)
    tl.store(S + bh * tl.num_programs(1) + blk, scale * scale_mul)


@triton.jit
def _attn_quant_v(V, SV, VT, stride_vb, stride_vh, stride_vs, H, T, T_PAD, BLOCK: tl.constexpr, D: tl.constexpr):
    """One program per (batch*head, block of ``BLOCK`` tokens): ``v / sv`` (a scale per channel) to fp8 e4m3,
    written transposed (``[D, T_PAD]`` per head, zeros past ``T``): the B operand of the fp8 ``p v`` product."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    v_base = V + (bh // H) * stride_vb + (bh % H) * stride_vh
    v = tl.load(v_base + rows[:, None] * stride_vs + d[None, :], mask=rows[:, None] < T, other=0.0).to(tl.float32)
    v = v / tl.load(SV + bh * D + d)[None, :]
    tl.store(VT + bh * D * T_PAD + d[None, :] * T_PAD + rows[:, None], v.to(VT.dtype.element_ty),
             mask=rows[:, None] < T_PAD)


@triton.jit
def _attn_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, qs, KS, n0, T, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               PV_FP8: tl.constexpr):
    """One block of keys: int8 ``q k^T``, online softmax in exp2, ``p v`` accumulated in fp32 (``PV_FP8``: p
    times 448 and v in fp8 e4m3, v's block ``[D, BLOCK_N]`` from its transposed, padded copy)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < T, other=0)
    else:
        k = tl.load(k_ptrs)
    ks = tl.load(KS + n0 // BLOCK_N)
    qk = tl.dot(q, tl.trans(k)).to(tl.float32) * (qs * ks)
    if MASKED:
        qk = tl.where(cols[None, :] < T, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        vt = tl.load(v_ptrs)  # padded with zeros: no mask
        acc = tl.dot((p * 448.0).to(vt.dtype), tl.trans(vt), acc)
    else:
        if MASKED:
            v = tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attn_int8(Q, K, V, QS, KS, SV, Out, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, TQ, T,
               T_FULL, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PV_FP8: tl.constexpr):
    """One program per (block of ``TQ`` query rows, batch*head); the ``T`` keys walked in blocks of ``BLOCK_N``,
    the ``T_FULL`` (a multiple of ``BLOCK_N``) first without masks. ``PV_FP8``: ``V`` is the fp8 transposed copy
    (``[B*H, D, T_PAD]``, rows ``stride_vs`` apart) and ``SV`` its channel scales over 448."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(Q + bh * TQ * D + rows[:, None] * D + d[None, :], mask=rows[:, None] < TQ, other=0)
    qs = tl.load(QS + bh * tl.num_programs(0) + pid_m)
    ks_row = KS + bh * tl.cdiv(T, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_cols = tl.arange(0, BLOCK_N)
    k_base = K + bh * T * D + n_cols[:, None] * D + d[None, :]
    if PV_FP8:
        v_base = V + bh * stride_vb + d[:, None] * stride_vs + n_cols[None, :]
        v_step = 1
    else:
        v_base = V + (bh // H) * stride_vb + (bh % H) * stride_vh + n_cols[:, None] * stride_vs + d[None, :]
        v_step = stride_vs
    for i in range(0, tl.cdiv(T_FULL, BLOCK_N)):  # T_FULL is a multiple of BLOCK_N
        n0 = i * BLOCK_N
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base + n0 * D, v_base + n0 * v_step, qs, ks_row, n0, T,
                                   BLOCK_N, False, PV_FP8)
    if T_FULL < T:
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base + T_FULL * D, v_base + T_FULL * v_step, qs, ks_row,
                                   T_FULL, T, BLOCK_N, True, PV_FP8)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(SV + bh * D + d)[None, :]
    o_base = Out + (bh // H) * stride_ob + (bh % H) * stride_oh
    tl.store(o_base + rows[:, None] * stride_os + d[None, :], out.to(Out.dtype.element_ty),
             mask=rows[:, None] < TQ)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(3) == 1 else x.contiguous()


def quantize_qk(q: torch.Tensor, k: torch.Tensor, cfg: AttentionConfig = ATTENTION_TILE,
                sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q codes, q scales with the softmax scale and log2(e) folded in, k codes of ``k - mean_tokens(k)``, k
    scales): int8 ``[B*H, T, D]`` codes and fp32 scales per block of ``block_m`` / ``block_n`` tokens."""
    b, h, t, d = q.shape
    tk = k.shape[2]
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    q, k = _last_dim_dense(q), _last_dim_dense(k)
    k_mean = k.float().mean(dim=2).reshape(b * h, d).contiguous()
    qc = torch.empty(b * h, t, d, dtype=torch.int8, device=q.device)
    kc = torch.empty(b * h, tk, d, dtype=torch.int8, device=q.device)
    qsc = torch.empty(b * h, cdiv(t, cfg.block_m), dtype=torch.float32, device=q.device)
    ksc = torch.empty(b * h, cdiv(tk, cfg.block_n), dtype=torch.float32, device=q.device)
    _attn_quant_blocks[(b * h, qsc.shape[1])](q, k_mean, qc, qsc, q.stride(0), q.stride(1), q.stride(2), h, t, scale,
                                              HAS_MEAN=False, BLOCK=cfg.block_m, D=d, num_warps=4)
    _attn_quant_blocks[(b * h, ksc.shape[1])](k, k_mean, kc, ksc, k.stride(0), k.stride(1), k.stride(2), h, tk, 1.0,
                                              HAS_MEAN=True, BLOCK=cfg.block_n, D=d, num_warps=4)
    return qc, qsc, kc, ksc


def quantize_v_fp8(v: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v in fp8 e4m3 with a scale per channel over all tokens, transposed to ``[B*H, D, T_PAD]`` and padded
    with zeros to a multiple of ``block_n`` tokens; the scales ``[B*H, D]`` over 448, p's fp8 scale)."""
    b, h, tk, d = v.shape
    sv = (v.abs().amax(dim=2).float().clamp_min(1e-12) / FP8_MAX).reshape(b * h, d).contiguous()
    t_pad = cdiv(tk, block_n) * block_n
    vt = torch.empty(b * h, d, t_pad, dtype=torch.float8_e4m3fn, device=v.device)
    _attn_quant_v[(b * h, cdiv(t_pad, 64))](v, sv, vt, v.stride(0), v.stride(1), v.stride(2), h, tk, t_pad,
                                             BLOCK=64, D=d, num_warps=4)
    return vt, sv / FP8_MAX


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                   cfg: AttentionConfig | None = None, pv_fp8: bool = False) -> torch.Tensor:
    """``softmax(q k^T * sm_scale) v`` for ``[B, H, T, D]`` bf16/fp16 tensors (self- or cross-attention: k and v
    may have their own token count), q and k in int8 (``pv_fp8``: p and v in fp8 e4m3 too). The output has
    q's shape, v's dtype and the memory order of q (``[B, T, H, D]`` when q is a transposed view of it, so the
    caller's transpose back is free). ``cfg``: the tile (default: the fastest measured for the variant)."""
    b, h, t, d = q.shape
    tk = k.shape[2]
    if k.shape != (b, h, tk, d) or v.shape != (b, h, tk, d):
        raise ValueError(f"int8_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ")
    if d not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"int8_attention: head_dim {d} is not a power of two in 16..256")
    cfg = cfg or (ATTENTION_TILE_PV_FP8 if pv_fp8 else ATTENTION_TILE)
    qc, qsc, kc, ksc = quantize_qk(q, k, cfg, sm_scale)
    v = _last_dim_dense(v)
    if q.stride(1) == d and q.stride(2) == h * d:  # q is [B, T, H, D] in memory: write the output that way
        out = torch.empty(b, t, h, d, dtype=v.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(b, h, t, d, dtype=v.dtype, device=q.device)
    if pv_fp8:
        vt, sv = quantize_v_fp8(v, cfg.block_n)
        vargs = (vt, qsc, ksc, sv, out, vt.stride(0), 0, vt.stride(1))
    else:
        vargs = (v, qsc, ksc, qsc, out, v.stride(0), v.stride(1), v.stride(2))
    _attn_int8[(qsc.shape[1], b * h)](qc, kc, *vargs, out.stride(0), out.stride(1), out.stride(2), h, t, tk,
                                      tk // cfg.block_n * cfg.block_n, BLOCK_M=cfg.block_m,
                                      BLOCK_N=cfg.block_n, D=d, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages, PV_FP8=pv_fp8)
    return out
