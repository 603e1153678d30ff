"""Triton W8A8 GEMM (int8 x int8 -> int32, fused per-token x per-channel scale, bias, cast) and the small-M
weight-only kernel (int8/fp8 weights dequantized in registers against bf16/fp16 activations).

Autotune configs per GPU generation (Hopper: 128x256x128-class tiles for wgmma; Ampere/Ada: smaller K tiles),
keyed on a power-of-two M bucket, N and K. Imported lazily (GPU backends only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from comfyquant.runtime.kernels import triton_quant


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Hopper (sm_90): large int8 tiles (K=128 bytes per row is one swizzle atom), 3-4 stages, 8 warps (2 warpgroups).
HOPPER_CONFIGS = (
    _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 128, 8, 4),
    _cfg(128, 256, 64, 8, 4), _cfg(64, 256, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
)
# Ampere / Ada (sm_80/86/89): mma.sync int8; moderate tiles, shared memory <= ~100-164 KB.
AMPERE_CONFIGS = (
    _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(256, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
)
# Weight-only small-M kernel: weights dominate the bytes, so tiles are thin in M and wide in K.
W8A16_CONFIGS = tuple(
    triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((32, 256, 4, 4), (64, 256, 4, 4), (64, 128, 4, 5), (128, 128, 4, 4), (32, 512, 4, 3),
                         (16, 512, 4, 4))
)


def _gemm_configs() -> list[triton.Config]:
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
    return list(HOPPER_CONFIGS if major >= 9 else AMPERE_CONFIGS)


def _even_k(args: dict) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row-tiles share each column sweep, so B tiles stay in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SA: tl.constexpr, ROW_SB: tl.constexpr,
              HAS_BIAS: tl.constexpr, RAW: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if RAW:  # the int32 accumulator itself (exactness checks against torch._int_mm)
        tl.store(c_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        out = acc.to(tl.float32)
        if HAS_SA:
            out = out * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if ROW_SB:
            out = out * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            out = out * tl.load(sb_ptr)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, ACC_DTYPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              B_TO: tl.constexpr):
    # rows/cols past the edge are clamped (wrapped) instead of masked: their results are never stored
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            rem = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0)
            if B_TO:  # fp8 loads take no integer `other`: zero the tail after the conversion
                b = tl.load(b_ptrs, mask=offs_k[:, None] < rem)
                b = tl.where(offs_k[:, None] < rem, b.to(a.dtype), 0.0)
            else:
                b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0)
        if B_TO:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _w8a8_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET, stride_am, stride_bn,
                 stride_cm, ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, tl.int32,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False)
    _epilogue(acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
              BLOCK_M, BLOCK_N, True, ROW_SB, HAS_BIAS, RAW)


@triton.autotune(configs=list(W8A16_CONFIGS), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _w8a16_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET, stride_am, stride_bn,
                  stride_cm, ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  EVEN_K: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_bn, pid_m, pid_n, tl.float32,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, True)
    _epilogue(acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
              BLOCK_M, BLOCK_N, False, ROW_SB, HAS_BIAS, False)


def _tma_block_hook(nargs: dict) -> None:
    # descriptors are built before the config is known; each config sets its own TMA box shape
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


TMA_CONFIGS = tuple(
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st,
                  pre_hook=_tma_block_hook)
    for bm, bn, bk, w, st in ((128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3),
                              (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (64, 256, 128, 4, 4),
                              # small M buckets: more, smaller tiles so the grid fills 132 SMs
                              (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 64, 128, 4, 4))
)


@triton.autotune(configs=list(TMA_CONFIGS), key=["M_BUCKET", "N", "K"])
@triton.jit
def _w8a8_tma_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET, stride_cm,
                     ROW_SB: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Hopper path: A and B tiles through the bulk tensor copy engine (TMA zero-fills the edges), wgmma."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, kk * BLOCK_K])
        b = b_desc.load([off_n, kk * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    _epilogue(acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, stride_cm, pid_m, pid_n,
              BLOCK_M, BLOCK_N, True, ROW_SB, HAS_BIAS, RAW)


def use_tma(a: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA path: Hopper+, 16-byte aligned rows (K % 16 == 0) and base pointers."""
    k = a.shape[1]
    return (a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] >= 9 and k % 16 == 0
            and a.data_ptr() % 16 == 0 and w_q.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0
            and w_q.stride(0) % 16 == 0)


def _launch_tma(a: torch.Tensor, w_q: torch.Tensor, sa: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, raw: bool = False) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = w_q.shape[0]
    sb = w_scale.reshape(-1) if w_scale.dtype == torch.float32 else w_scale.float().reshape(-1)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    row_sb, has_bias = sb.numel() > 1, bias is not None
    key = ("tma", _m_bucket(m), n, k, a.dtype, out_dtype, row_sb, has_bias, raw, a.device.index)
    cfg = _BEST.get(key)
    box = [128, 128] if cfg is None else None
    a_desc = TensorDescriptor.from_tensor(a, box or [cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(w_q, box or [cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]])
    args = (a_desc, b_desc, out, sa, sb, bias if has_bias else sb, m, n, k, _m_bucket(m), out.stride(0))
    if cfg is None:
        _w8a8_tma_kernel[_grid(m, n)](*args, ROW_SB=row_sb, HAS_BIAS=has_bias, RAW=raw)
        _BEST[key] = _w8a8_tma_kernel.best_config
    else:
        kw = cfg.kwargs
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]),)
        _w8a8_tma_jit[grid](*args, ROW_SB=row_sb, HAS_BIAS=has_bias, RAW=raw, **kw,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _grid(m: int, n: int):
    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    return grid


# Memo of the autotuner's pick per launch key (like triton's own autotune cache): repeat calls skip the
# Autotuner/Heuristics wrappers, which cost tens of microseconds of host time per launch.
_BEST: dict[tuple, triton.Config] = {}
_w8a8_tma_jit = _w8a8_tma_kernel.fn
_JIT = {_w8a8_kernel: _w8a8_kernel.fn.fn, _w8a16_kernel: _w8a16_kernel.fn.fn}


def _m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 16))


def _launch(kernel, a: torch.Tensor, w_q: torch.Tensor, sa: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype, raw: bool = False) -> torch.Tensor:
    m, k = a.shape
    n = w_q.shape[0]
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    sb = w_scale.reshape(-1) if w_scale.dtype == torch.float32 else w_scale.float().reshape(-1)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    row_sb, has_bias = sb.numel() > 1, bias is not None
    args = (a, w_q, out, sa, sb, bias if has_bias else sb, m, n, k, _m_bucket(m), a.stride(0), w_q.stride(0),
            out.stride(0))
    key = (id(kernel), _m_bucket(m), n, k, a.dtype, w_q.dtype, out_dtype, row_sb, has_bias, raw,
           a.device.index)
    cfg = _BEST.get(key)
    if cfg is None:
        kernel[_grid(m, n)](*args, ROW_SB=row_sb, HAS_BIAS=has_bias, RAW=raw)
        _BEST[key] = kernel.best_config
    else:
        kw = cfg.kwargs
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]),)
        _JIT[kernel][grid](*args, ROW_SB=row_sb, HAS_BIAS=has_bias, RAW=raw, **kw,
                           EVEN_K=k % kw["BLOCK_K"] == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def int_mm(a: torch.Tensor, w_q: torch.Tensor, tma: bool | None = None) -> torch.Tensor:
    """Raw ``a [M,K] @ w_q[N,K]^T`` int32 from the W8A8 GEMM kernel (for exactness checks vs ``torch._int_mm``)."""
    a = a.contiguous()
    w_q = w_q.contiguous()
    one = torch.ones(1, dtype=torch.float32, device=a.device)
    if use_tma(a, w_q) if tma is None else tma:
        return _launch_tma(a, w_q, one, one, None, torch.int32, raw=True)
    return _launch(_w8a8_kernel, a, w_q, one, one, None, torch.int32, raw=True)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                group: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8: fused (rotate +) per-token int8 quant kernel, then the int8 GEMM with the fused epilogue."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, s_x = triton_quant.quantize_rows_int8(x.reshape(-1, k), group)
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    if use_tma(q, w_q):
        out = _launch_tma(q, w_q, s_x, w_scale, bias, out_dtype)
    else:
        out = _launch(_w8a8_kernel, q, w_q, s_x, w_scale, bias, out_dtype)
    return out.reshape(*lead, w_q.shape[0])


def w8a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 group: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only small-M GEMM: int8/fp8 weights converted to x's 16-bit dtype in registers, fp32 accumulate."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.dtype not in (torch.bfloat16, torch.float16):
        x2d = x2d.to(torch.bfloat16)
    if group is not None:
        x2d = triton_quant.rotate_rows(x2d, group)
    elif x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = _launch(_w8a16_kernel, x2d, w_q, x2d, w_scale, bias, out_dtype)
    return out.reshape(*lead, w_q.shape[0])
