"""Interpreter checks of the int8 attention kernel (``triton_attention``): its q / k quantizer bit-equal to
``reference.quantize_token_blocks`` (a code may move by one at a .5 tie), its output against the float64 math of
the same codes (``reference.int8_attention_ref``: what is left is p's 16-bit rounding and the online softmax) and
against exact float64 attention (the quantization error itself, which a kernel without k's mean subtraction
misses on keys with a per-channel offset). fp16 v only: bf16 ``tl.dot`` is wrong in Triton 3.6's interpreter
(``check_interpreter_limitations``); ``benchmarks/check_paths_gpu.py`` runs bf16."""

from __future__ import annotations

import math

import torch
from triton_interp import code_diff, interp_cast, record, rel

F16 = torch.float16


def _qkv(b: int, h: int, t: int, tk: int, d: int, seed: int, layout: str) -> tuple[torch.Tensor, ...]:
    """q, k, v as ``[B, H, T, D]`` (``layout="bthd"``: transposed views of ``[B, T, H, D]``, as models pass them);
    k with a per-channel offset (SageAttention's observation on diffusion models' keys)."""
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = ((b, t, h, d), (b, tk, h, d)) if layout == "bthd" else ((b, h, t, d), (b, h, tk, d))
    q = torch.randn(shape_q, generator=g) * 2
    k = torch.randn(shape_k, generator=g) + 3 * torch.randn(d, generator=g)
    v = torch.randn(shape_k, generator=g)
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return tuple(x.to(F16) for x in (q, k, v))


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v.double()


def check_attention_quantizer() -> None:
    from comfyquant.runtime.kernels import reference, triton_attention

    cfg = triton_attention.AttentionConfig(block_m=32, block_n=16)
    for i, (b, h, t, tk, d, layout) in enumerate([(1, 2, 70, 70, 64, "bhtd"), (2, 3, 33, 50, 32, "bthd")]):
        q, k, _ = _qkv(b, h, t, tk, d, 10 + i, layout)
        qc, qs, kc, ks = triton_attention.quantize_qk(q, k, cfg)
        rq, rqs = reference.quantize_token_blocks(q, 32, triton_attention.LOG2E / math.sqrt(d))
        rk, rks = reference.quantize_token_blocks(k, 16, 1.0, mean=k.float().mean(dim=2))
        dq, dk = code_diff(qc, rq), code_diff(kc, rk)
        record("codes", qc.shape == rq.shape and kc.shape == rk.shape and dq[2] and dk[2],
               shape=(b, h, t, tk, d), layout=layout, q=dq[:2], k=dk[:2])
        record("scales", rel(qs, rqs) <= 1e-6 and rel(ks, rks) <= 1e-6, q=rel(qs, rqs), k=rel(ks, rks))


def check_attention() -> None:
    from comfyquant.runtime.kernels import reference, triton_attention

    cases = [(1, 2, 64, 64, 64, "bhtd", 32, 16), (1, 3, 100, 100, 32, "bthd", 32, 32),  # ragged tail
             (2, 2, 40, 77, 64, "bthd", 16, 16), (1, 1, 17, 5, 16, "bhtd", 16, 16)]  # cross-attention, short
    for i, (b, h, t, tk, d, layout, bm, bn) in enumerate(cases):
        q, k, v = _qkv(b, h, t, tk, d, 20 + i, layout)
        cfg = triton_attention.AttentionConfig(block_m=bm, block_n=bn)
        y = triton_attention.int8_attention(q, k, v, cfg=cfg)
        scheme = reference.int8_attention_ref(q, k, v, bm, bn)
        exact = _exact(q, k, v)
        # the same scheme without the mean subtraction: k's offset sets its scale and costs precision
        unsmoothed = reference.int8_attention_ref(q, k, v, bm, bn, smooth_k=False)
        record("vs_scheme", y.shape == q.shape and y.dtype == F16 and rel(y, scheme) <= 4e-3,
               shape=(b, h, t, tk, d), layout=layout, rel=rel(y, scheme))
        record("vs_exact", rel(y, exact) <= 3e-2, rel=rel(y, exact), scheme_vs_exact=rel(scheme, exact))
        record("memory_order", layout != "bthd" or y.transpose(1, 2).is_contiguous(), strides=y.stride())
        record("smoothing_helps", rel(y, exact) < rel(unsmoothed, exact), ours=rel(y, exact),
               unsmoothed=rel(unsmoothed, exact))


def check_attention_pv_fp8() -> None:
    """p and v in fp8 e4m3 (v a scale per channel, stored transposed and padded): v's codes bit-equal to what
    the interpreter's fp8 cast gives for ``v / scale``; the output near exact attention. The interpreter's fp8
    converter loses the carry into odd exponents (``interp_cast``), which roughly doubles fp8's error here;
    the GPU probe (``gpu_session.py`` section ``attention``) measures the real one."""
    from comfyquant.runtime.kernels import triton_attention

    for i, (b, h, t, tk, d, layout, bm, bn) in enumerate([(1, 2, 64, 64, 64, "bhtd", 32, 16),
                                                           (2, 2, 40, 77, 32, "bthd", 16, 32)]):
        q, k, v = _qkv(b, h, t, tk, d, 40 + i, layout)
        cfg = triton_attention.AttentionConfig(block_m=bm, block_n=bn)
        y = triton_attention.int8_attention(q, k, v, cfg=cfg, pv_fp8=True)
        y16 = triton_attention.int8_attention(q, k, v, cfg=cfg)
        exact = _exact(q, k, v)
        record("vs_exact", y.shape == q.shape and rel(y, exact) <= 0.1, shape=(b, h, t, tk, d), layout=layout,
               rel=rel(y, exact), pv16_rel=rel(y16, exact))
        vt, sv = triton_attention.quantize_v_fp8(v, bn)
        scale = (v.float().abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / triton_attention.FP8_MAX)
        want = interp_cast((v.float() / scale).reshape(b * h, tk, d).transpose(1, 2), torch.float8_e4m3fn)
        record("v_codes", vt.shape[2] % bn == 0 and bool((vt.float()[:, :, tk:] == 0).all())
               and torch.equal(vt[:, :, :tk].view(torch.int8), want.contiguous().view(torch.int8))
               and rel(sv * triton_attention.FP8_MAX, scale.reshape(b * h, d)) <= 1e-6, pad=vt.shape[2] - tk)


GROUPS = {"attention_quantizer": check_attention_quantizer, "attention": check_attention,
          "attention_pv_fp8": check_attention_pv_fp8}
