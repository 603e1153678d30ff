"""Pure-torch W8A8 / FP8 linear math: the CPU path, the fallback on any device, and the tests' oracle.

Every function here is exact about the integer part (int32 accumulation, identical to ``torch._int_mm``)
and does the float epilogue in float32, so it is the definition the fast GPU kernels must match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from comfyquant.quant.fp8 import fp8_max
from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.quant.int8 import quantize_rowwise


def quantize_rows_int8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of activations: the weight quantizer's math (``quant.int8.quantize_rowwise``).

    ``scale = rowmax|x| / 127`` in float32 (1 for an all-zero row), round-half-even; the same float32 scale
    quantizes and rescales. Returns ``(q int8 [M,K], scale fp32 [M,1])``.
    """
    return quantize_rowwise(x2d)


def _needs_int_mm_padding(m: int, k: int, n: int, device: torch.device) -> bool:
    # cuBLAS int8 GEMM behind torch._int_mm wants M > 16 and K, N multiples of 8; the CPU kernel takes any shape.
    return device.type == "cuda" and (m <= 16 or k % 8 or n % 8)


def _int_mm_sums_exactly() -> bool:
    """Whether ``torch._int_mm`` sums exactly on this CPU. oneDNN's int8 x int8 kernel without VNNI (AVX2 or
    AVX-512 without VNNI: AMD Zen 2-3, Intel Skylake) returns wrong sums: an AMX Xeon with oneDNN capped to AVX2
    got 99% of a 64 x 256 x 128 product wrong, off by up to 80,774, and the runtime's CPU layers with it. Tried on
    a product whose pairwise sums leave int16's range (codes spread over -127..127). False too where this
    torch has no CPU ``_int_mm`` kernel."""
    a = ((torch.arange(32 * 256) * 97) % 255 - 127).to(torch.int8).reshape(32, 256)
    b = ((torch.arange(256 * 32) * 89) % 255 - 127).to(torch.int8).reshape(256, 32)
    try:
        got = torch._int_mm(a, b)
    except NotImplementedError:
        # the dispatcher's "Could not run 'aten::_int_mm' with arguments from the 'CPU' backend": a build without
        # the CPU kernel takes the float64 product instead (any other error is a real fault and propagates)
        return False
    return torch.equal(got.long(), a.long() @ b.long())


# once a process, at import (oneDNN reads its ISA once; a constant is also what torch.compile can trace past)
CPU_INT_MM_EXACT = _int_mm_sums_exactly()


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b_t`` for int8 ``a [M,K]`` and int8 ``b_t [K,N]`` with int32 accumulation, any shape.

    Uses ``torch._int_mm``; on CUDA, shapes cuBLAS refuses are zero-padded (exact) rather than rejected; on a
    CPU where it does not sum exactly (:data:`CPU_INT_MM_EXACT`), a float64 product (exact: every partial sum
    is an integer below 2^53 for K < 2^39).
    """
    m, k = a.shape
    n = b_t.shape[1]
    if a.device.type == "cpu" and not CPU_INT_MM_EXACT:
        return (a.double() @ b_t.double()).to(torch.int32)
    if not _needs_int_mm_padding(m, k, n, a.device):
        return torch._int_mm(a.contiguous(), b_t)
    pm, pk, pn = max(17 - m, 0), -k % 8, -n % 8
    ap = F.pad(a, (0, pk, 0, pm))
    bp = F.pad(b_t.t(), (0, pk, 0, pn)).t()  # cuBLASLt int8 wants B column-major ("TN"): pad W [N,K] itself
    return torch._int_mm(ap, bp)[:m, :n]


def _epilogue(acc: torch.Tensor, s_x: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    s_w = w_scale.float().reshape(1, -1) if w_scale.numel() > 1 else w_scale.float().reshape(())
    out = acc.float() * s_x * s_w
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def rotate_activations(x2d: torch.Tensor, group: int) -> torch.Tensor:
    """``x_g @ H`` group-wise with the regular Hadamard (FORMAT.md ``convrot``), in float32."""
    return fast_hadamard(x2d.float(), group)


def int8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    convrot_group: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8: per-token dynamic activation quant, int32 GEMM, ``acc * s_x * s_w + bias`` in float32."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    if convrot_group is not None:
        x2d = rotate_activations(x2d, convrot_group)
    q, s_x = quantize_rows_int8(x2d)
    acc = int_mm(q, w_q.t())
    return _epilogue(acc, s_x, w_scale, bias, out_dtype).reshape(*lead, w_q.shape[0])


def int8_linear_kblock_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                           out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """W8A8 with activation scales per row *and* per ``block`` columns (the one-launch fused kernel's
    ``kblock`` mode): each block's codes at its own scale (``absmax / 127`` in float32, codes rounded half to
    even from ``x * (1 / scale)``, the kernel's reciprocal multiply), its exact int32 product scaled into a
    float32 sum."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k).float()
    out = torch.zeros(x2d.shape[0], w_q.shape[0], dtype=torch.float32, device=x.device)
    for k0 in range(0, k, block):
        xb = x2d[:, k0:k0 + block]
        amax = xb.abs().amax(dim=1, keepdim=True)
        s_x = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(xb * (1.0 / s_x)).clamp(-127, 127).to(torch.int8)
        out += int_mm(q, w_q[:, k0:k0 + block].t()).float() * s_x
    return _epilogue(out, torch.ones((), device=x.device), w_scale, bias, out_dtype).reshape(*lead, w_q.shape[0])


def int8_block_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: int,
                          bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 with block-wise weight scales ``[ceil(N/b), ceil(K/b)]``: one int32 GEMM per K block, scaled per tile."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w_q.shape[0]
    q, s_x = quantize_rows_int8(x.reshape(-1, k))
    s_w = w_scale.float().repeat_interleave(block, 0)[:n]  # [N, gk]
    out = torch.zeros(q.shape[0], n, dtype=torch.float32, device=x.device)
    for j, k0 in enumerate(range(0, k, block)):
        k1 = min(k0 + block, k)
        acc = int_mm(q[:, k0:k1], w_q[:, k0:k1].t())
        out += acc.float() * s_w[:, j]
    out *= s_x
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype).reshape(*lead, n)


def dequant_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   convrot_group: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only path: ``x @ (q * s_w)^T`` in x's dtype (the small-batch path; activations not quantized)."""
    dt = x.dtype if x.dtype.is_floating_point and x.dtype != torch.float64 else torch.float32
    w = w_q.to(dt) * w_scale.to(dt).reshape(-1, 1) if w_scale.numel() > 1 else w_q.to(dt) * w_scale.to(dt)
    if convrot_group is not None:
        x = fast_hadamard(x.to(dt), convrot_group)
    return F.linear(x.to(dt), w, None if bias is None else bias.to(dt)).to(out_dtype)


def quantize_rows_fp8(x2d: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8: ``scale = rowmax / fp8_max`` (1 for zero rows); returns ``(q [M,K], scale fp32 [M,1])``."""
    xf = x2d.float()
    fmax = fp8_max(dtype)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    return (xf / scale).clamp_(-fmax, fmax).to(dtype), scale


def quantize_static_fp8(x2d: torch.Tensor, input_scale: torch.Tensor, dtype: torch.dtype
                        ) -> torch.Tensor:
    """fp8 with a static scalar activation scale, saturating at the format's range (ComfyUI's behaviour)."""
    fmax = fp8_max(dtype)
    return (x2d.float() / input_scale.float()).clamp_(-fmax, fmax).to(dtype)


def fp8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 W8A8 in float32: activations per-row dynamic (or static ``input_scale``), weight scalar/per-row scale."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    if input_scale is not None:
        qx, s_x = quantize_static_fp8(x2d, input_scale, w_q.dtype), input_scale.float().reshape(())
    else:
        qx, s_x = quantize_rows_fp8(x2d, w_q.dtype)
    acc = qx.float() @ w_q.float().t()
    return _epilogue(acc, s_x, w_scale, bias, out_dtype).reshape(*lead, w_q.shape[0])


def quantize_token_blocks(x: torch.Tensor, block: int, scale_mul: float = 1.0,
                          mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x - mean`` (``[B, H, T, D]``; ``mean`` ``[B, H, D]``) with one scale per block of
    ``block`` tokens (absmax / 127, round-half-even), as ``[B*H, T, D]`` codes and ``[B*H, ceil(T/block)]``
    scales times ``scale_mul``: the attention kernel's quantizer, in float32 like the kernel."""
    b, h, t, d = x.shape
    x = x.float().reshape(b * h, t, d)
    if mean is not None:
        x = x - mean.float().reshape(b * h, 1, d)
    nblk = -(-t // block)
    pad = torch.zeros(b * h, nblk * block - t, d, device=x.device)
    blocks = torch.cat([x, pad], dim=1).reshape(b * h, nblk, block * d)
    scale = blocks.abs().amax(dim=2).clamp_min(1e-12) / 127.0
    codes = torch.round(blocks / scale[:, :, None]).reshape(b * h, nblk * block, d)[:, :t]
    return codes.to(torch.int8), scale * scale_mul


def int8_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                       sm_scale: float | None = None, smooth_k: bool = True) -> torch.Tensor:
    """The int8 attention scheme in float64 from the kernel's own codes and scales (``[B, H, T, D]`` in and
    out): q per block of ``block_m`` tokens, ``k - mean_tokens(k)`` per block of ``block_n`` (``smooth_k=False``:
    k itself, to show what the mean subtraction buys), exact softmax."""
    b, h, t, d = q.shape
    tk = k.shape[2]
    log2_scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * math.log2(math.e)
    qc, qs = quantize_token_blocks(q, block_m, log2_scale)
    kc, ks = quantize_token_blocks(k, block_n, 1.0, mean=k.float().mean(dim=2) if smooth_k else None)
    qd = qc.double() * qs.double().repeat_interleave(block_m, dim=1)[:, :t, None]
    kd = kc.double() * ks.double().repeat_interleave(block_n, dim=1)[:, :tk, None]
    p = torch.softmax((qd @ kd.transpose(1, 2)) * math.log(2.0), dim=-1)
    return (p @ v.double().reshape(b * h, tk, d)).reshape(b, h, t, d)
