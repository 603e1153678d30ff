"""Host side of the Triton linears: deterministic configs (``configs``), low-overhead launches (``launch``).

Paths (all return a fresh ``[..., N]`` tensor):
  ``int8_linear``   W8A8, two launches: (rotate +) per-token quant kernel, then the int8 GEMM (TMA on Hopper)
  ``fp8_linear``    FP8 W8A8, the same two launches with fp8 codes and the same GEMM kernels (fp32 accumulate)
  ``fused_linear``  W8A8, one launch: quantization folded into the GEMM (no rotation)
  ``w8a16_linear``  weight-only: int8/fp8 W converted in registers against bf16/fp16 x (small M)
  ``dequant_linear`` dequantize W to x's dtype (one kernel) + cuBLAS ``F.linear``: bf16 speed, quantized memory
  ``w4a8_linear``   int4_rot: rotate + per-token int8 (K-permuted) kernel, then the int4-weight GEMM
Imported lazily (GPU backends only).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from comfyquant.quant.fp8 import FP8_DTYPES
from comfyquant.runtime.kernels import scratch, triton_quant
from comfyquant.runtime.kernels import triton_gemm as kern
from comfyquant.runtime.kernels.acts import GATED_CODES, ModulatedNorm, Norm, norm_args, norm_rows, rms_norm
from comfyquant.runtime.kernels.configs import (
    ROWS_WIDE,
    WS_FP8,
    WS_LOW_RANK,
    TileConfig,
    cdiv,
    fit_stages,
    gemm_config,
    hopper_w8a8_config,
    next_power_of_2,
    rows_config,
    rows_quant_programs,
    rows_shape,
    small_m_config,
    w8a16_config,
)
from comfyquant.runtime.kernels.launch import FastKernel, device_facts, device_smem, hopper_class, stream_id

_W8A8 = FastKernel(kern.w8a8)
_W8A16 = FastKernel(kern.w8a16)
_TMA = FastKernel(kern.w8a8_tma)
_TMA_PERSISTENT = FastKernel(kern.w8a8_tma_persistent)
_FUSED = FastKernel(kern.fused)
_FUSED_ROWS = FastKernel(kern.fused_rows)
_W4A8 = FastKernel(kern.w4a8)
# the weight as the MMA's register operand (wgmma reads it from registers: no shared-memory round trip of the
# unpacked weight per K step): from SMALL_M rows (run 65: 1.0-1.35x the other order's GPU time on 6 layers at
# 256-16,384 rows, 0.68-0.74x of it on <= 3,072-wide layers at 1-16 rows); bit-equal to _W4A8
_W4A8_SWAPPED = FastKernel(kern.w4a8_swapped)
# the swapped order with both nibbles in one MMA per K step, on unpermuted activations (half the waits)
_W4A8_JOINED = FastKernel(kern.w4a8_joined)
W4A8_KERNELS = {"plain": _W4A8, "swapped": _W4A8_SWAPPED, "joined": _W4A8_JOINED}  # operand order -> kernel
_DEQUANT = FastKernel(kern.dequant)
SMALL_M = 64  # below this many rows the thin-M tiles are used


def _sb(w_scale: torch.Tensor) -> torch.Tensor:
    sb = w_scale.reshape(-1)
    return sb if sb.dtype == torch.float32 and sb.is_contiguous() else sb.float().contiguous()


def _al(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _contig_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


LowRank = tuple  # dispatch.LowRank (down [R, K], up [R, N], r): x's dtype, R a multiple of 16, rows >= r zero


def _low_rank_args(low_rank: LowRank | None, x2d: torch.Tensor, dummy: torch.Tensor) -> tuple[tuple, tuple]:
    """(kernel arguments, specialization key part) of the epilogue's low-rank term: ``h = x @ down^T`` by one
    cuBLAS GEMM (it reads x once; the epilogue then adds ``h @ up`` with no second pass over the output)."""
    if low_rank is None:
        return (dummy, dummy, 0, 0, 0, False, False), (False,)
    down, up = low_rank[0], low_rank[1]  # the padded operands; the zero rows past r cost nothing to add
    h = F.linear(x2d, down)
    ieee = h.dtype == torch.float32
    return ((h, up, up.shape[0], h.stride(0), up.stride(0), True, ieee),
            (True, ieee, h.dtype, up.dtype, _al(h), _al(up), up.stride(0) % 16 == 0))


def _no_act_with_low_rank(act: int, low_rank: LowRank | None, norm: Norm | None = None) -> None:
    if low_rank is None:
        return
    if act:
        raise ValueError("an input activation and a low-rank term in one call: the low-rank term reads x as "
                         "given; apply the activation first (runtime.kernels.dispatch does)")
    if norm is not None:
        raise ValueError("a folded RMSNorm and a low-rank term in one call: the low-rank term reads x as given; "
                         "apply the norm first (runtime.kernels.dispatch does)")


def _no_gated_act(act: int, what: str) -> None:
    """The GEMMs that apply the input activation on their A tiles take elementwise ones only."""
    if act in GATED_CODES:
        raise ValueError(f"{what} applies elementwise input activations only; apply gated ones first "
                         "(runtime.kernels.dispatch does for backends without fuses_gated_act)")


def use_tma(a: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA path: a Hopper-class GPU (``launch.hopper_class``), 16-byte aligned rows (K % 16 == 0) and base
    pointers."""
    return (a.device.type == "cuda" and hopper_class(a.device) and a.shape[1] % 16 == 0
            and a.data_ptr() % 16 == 0 and w_q.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0
            and w_q.stride(0) % 16 == 0)


@functools.lru_cache(maxsize=4096)
def pick_w8a8(m: int, n: int, k: int, device: torch.device, persistent: bool = False,
              ws: bool | None = None) -> tuple[TileConfig, bool]:
    """(tile config, use small-M tiles) for the two-launch W8A8 GEMM; ``persistent``: the call may run the
    persistent-grid kernel (:func:`persistent_eligible`), which Hopper then takes for the full-size tiles;
    ``ws``: it may run the Gluon kernel (:func:`ws_eligible`; None: as ``persistent``), which sm_90 takes on
    the shapes ``configs.hopper_w8a8_config`` gives it. Other GPUs (A100, RTX 30 / 40 / 50 series) take the
    Ampere tiles, with the stages their shared memory holds."""
    sms, major = device_facts(device)
    smem, hopper = device_smem(device), hopper_class(device)
    if m < SMALL_M:
        return fit_stages(small_m_config(m, n, k, sms), 1, 1, smem, major), True
    cfg = gemm_config(m, n, k, sms, hopper=hopper)
    ws = persistent if ws is None else ws
    if (persistent or ws) and hopper:
        cfg = hopper_w8a8_config(cfg, m, major if ws and ws_available() else 0, n, k, persistent, sms)
    return fit_stages(cfg, 1, 1, smem, major), False


def ws_supported(triton_version: str) -> bool:
    """Whether a Triton of this version runs the Gluon kernel: 3.6 or later (Gluon's warp-specialization API,
    as the kernel is written and checked against; torch 2.8-2.10 bring Triton 3.4-3.5, whose Gluon differs)."""
    parts = []
    for p in triton_version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= (3, 6)


@functools.cache
def ws_available() -> bool:
    """:func:`ws_supported` for the installed Triton (else the Triton kernels take its layers)."""
    import triton

    return ws_supported(triton.__version__)


def persistent_eligible(qdtype: torch.dtype, raw: bool, lr: tuple[tuple, tuple]) -> bool:
    """Whether a W8A8 call may take the persistent-grid kernel (:func:`pick_w8a8`'s ``persistent``): int8
    operands, a scaled output and no low-rank term (``lr`` from :func:`_low_rank_args`), what run 12 measured
    and the GPU checks cover (the raw int32 variants of its tile do not fit shared memory when flattened)."""
    return qdtype == torch.int8 and not raw and not lr[0][5]


def ws_eligible(qdtype: torch.dtype, raw: bool, lr: tuple[tuple, tuple]) -> bool:
    """Whether a W8A8 call may take the Gluon kernel (:func:`pick_w8a8`'s ``ws``): int8 operands or
    (``configs.WS_FP8``) fp8 ones, a scaled output, and no low-rank term or (``configs.WS_LOW_RANK``) one its
    epilogue holds (:func:`ws_low_rank`)."""
    ops = qdtype == torch.int8 or (WS_FP8 and qdtype in FP8_DTYPES)
    return ops and not raw and _ws_takes_term(lr)


def _ws_takes_term(lr: tuple[tuple, tuple]) -> bool:
    """No low-rank term, or (``configs.WS_LOW_RANK``) one the Gluon epilogue adds (:func:`ws_low_rank`)."""
    return not lr[0][5] or (WS_LOW_RANK and ws_low_rank(lr) is not None)


def ws_low_rank(lr: tuple[tuple, tuple]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(h, up)`` of a low-rank term (:func:`_low_rank_args`) the Gluon epilogue can add: 16-bit ``h [M, R]``
    and ``up [R, N]`` of one dtype, R <= 64, rows TMA can read (16-byte aligned); None otherwise."""
    h, up, r, h_stride, up_stride, has, _ieee = lr[0]
    if not has or r > 64 or h.dtype != up.dtype or h.dtype not in (torch.bfloat16, torch.float16):
        return None
    if h.stride(1) != 1 or up.stride(1) != 1 or (h_stride * 2) % 16 or (up_stride * 2) % 16:
        return None
    return (h, up) if h.data_ptr() % 16 == 0 and up.data_ptr() % 16 == 0 else None


def _w8a8_launch(q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, sb: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, cfg: TileConfig, use_tma_path: bool, raw: bool,
                 lr: tuple[tuple, tuple]) -> tuple[FastKernel, tuple, tuple, tuple]:
    """(kernel, grid, args, key) of the W8A8 GEMM launch; on the TMA path ``args[0]`` and ``args[1]`` are the
    host tensor descriptors of ``q`` and ``w_q``."""
    m, k = q.shape
    n = w_q.shape[0]
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    has_bias = bias is not None
    b_arg = bias if has_bias else sb
    lr_args, lr_key = lr
    if use_tma_path and on_ws(cfg, out, lr):
        return _ws_launch(q, s_x, w_q, sb, bias, out, cfg, lr)
    if use_tma_path:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(q, [cfg.block_m, cfg.block_k])
        b_desc = TensorDescriptor.from_tensor(w_q, [cfg.block_n, cfg.block_k])
        fk, tail = _TMA, ()
        sms = device_facts(q.device)[0]
        if cfg.persistent and grid[0] > sms:  # one program per SM walking the tiles (one compile per device:
            # with no more tiles than SMs each program would take one tile, as the per-tile kernel does)
            fk, grid, tail = _TMA_PERSISTENT, (sms,), (sms, cfg.persistent == 2)
        return fk, grid, (a_desc, b_desc, out, s_x, sb, b_arg, m, n, k, out.stride(0), sb.numel() > 1, has_bias,
                          raw, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, *lr_args, *tail), \
            (cfg, q.dtype, out.dtype, n, k, out.stride(0), sb.numel() > 1, has_bias, raw, _al(sb), _al(b_arg),
             lr_key, *tail)
    return _W8A8, grid, (q, w_q, out, s_x, sb, b_arg, m, n, k, q.stride(0), w_q.stride(0), out.stride(0),
                         sb.numel() > 1, has_bias, raw, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,
                         k % cfg.block_k == 0, *lr_args), \
        (cfg, q.dtype, out.dtype, n, k, q.stride(0), w_q.stride(0), out.stride(0), sb.numel() > 1, has_bias, raw,
         _al(q), _al(w_q), _al(sb), _al(b_arg), lr_key)


def launch_stages(cfg: TileConfig) -> int:
    """``num_stages`` of a W8A8 GEMM launch of ``cfg``: a Gluon tile's ring depth sizes the Gluon kernel's own
    ring (its ``STAGES`` argument); where the Triton kernel runs that tile instead (:func:`on_ws` false), its
    pipeline is held to 5 stages, which fit shared memory beside its epilogue for every Gluon tile."""
    return min(cfg.stages, 5) if cfg.persistent == 3 else cfg.stages


def on_ws(cfg: TileConfig, out: torch.Tensor, lr: tuple[tuple, tuple] | None = None) -> bool:
    """Whether a TMA-path W8A8 launch of ``cfg`` runs the warp-specialized Gluon kernel: its config, a 16-bit
    output (its TMA-store epilogue is laid out for bf16 / fp16; ComfyUI's text encoders run float32 activations)
    whose rows TMA can store (16-byte aligned row stride), and no low-rank term or one its epilogue adds
    (:func:`ws_low_rank`, ``configs.WS_LOW_RANK``). Otherwise the Triton kernel runs the same tile."""
    if lr is not None and not _ws_takes_term(lr):
        return False
    return (cfg.persistent == 3 and out.dtype in (torch.bfloat16, torch.float16)
            and (out.stride(0) * out.element_size()) % 16 == 0 and out.data_ptr() % 16 == 0)


@functools.cache
def _ws_kernel() -> FastKernel:
    from comfyquant.runtime.kernels.gluon_gemm import w8a8_ws  # Gluon: imported where a Hopper GPU runs it

    return FastKernel(w8a8_ws)


def _ws_launch(q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor, cfg: TileConfig,
               lr: tuple[tuple, tuple] | None = None) -> tuple[FastKernel, tuple, tuple, tuple]:
    """:func:`_w8a8_launch` for the warp-specialized Gluon kernel: ``args[0:3]`` are the Gluon descriptors of q,
    w_q and out (its epilogue stores through TMA), one program per SM; with a low-rank term (``lr``, one
    :func:`ws_low_rank` takes) ``args[16:18]`` are the descriptors of its ``h`` and ``up``, and the ring is cut
    to leave shared memory for their tiles."""
    from comfyquant.runtime.kernels import gluon_gemm as gg

    m, k = q.shape
    n = w_q.shape[0]
    a_d, b_d, c_d = gg.descriptors(q, w_q, out, cfg.block_m, cfg.block_n, cfg.block_k)
    has_bias = bias is not None
    b_arg = bias if has_bias else sb
    grid = (min(device_facts(q.device)[0], cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)),)
    term = None if lr is None or not lr[0][5] else ws_low_rank(lr)
    h_d, u_d, stages, lr_key = None, None, cfg.stages, None
    if term is not None:
        h_d, u_d = gg.lr_descriptors(*term, c_d.block_shape[0], cfg.block_n)
        stages = gg.fit_stages(cfg.stages, cfg.block_n, cfg.block_k, low_rank=True, out_bytes=out.element_size())
        lr_key = term[0].dtype
    args = (a_d, b_d, c_d, s_x, sb, b_arg, m, n, k, sb.numel() > 1, has_bias, cfg.group_m, stages,
            gg.CONSUMER_REGS, gg.PRODUCER_REGS, False, h_d, u_d, term is not None)
    # the operands' dtype keys the compile: an int8 kernel run on fp8 codes (or the reverse) is garbage
    return _ws_kernel(), grid, args, (cfg, q.dtype, out.dtype, n, k, sb.numel() > 1, has_bias, _al(sb), _al(b_arg),
                                      grid, lr_key)


def gemm_w8a8(q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, *, raw: bool = False,
              cfg: TileConfig | None = None, tma: bool | None = None,
              lr: tuple[tuple, tuple] | None = None) -> torch.Tensor:
    """``q [M,K] int8 @ w_q[N,K]^T`` (or fp8 x fp8 of one dtype, fp32 accumulate) with the fused epilogue
    (``raw``: the int32 accumulator; ``lr``: the low-rank term's arguments from :func:`_low_rank_args`)."""
    m, k = q.shape
    n = w_q.shape[0]
    sb = _sb(w_scale)
    out = torch.empty((m, n), dtype=torch.int32 if raw else out_dtype, device=q.device)
    if m == 0 or n == 0:
        return out
    small = False
    lr = lr if lr is not None else _low_rank_args(None, q, sb)
    if cfg is None:
        cfg, small = pick_w8a8(m, n, k, q.device, persistent_eligible(q.dtype, raw, lr), ws_eligible(q.dtype, raw, lr))
    on_tma = (use_tma(q, w_q) if tma is None else tma) and not small
    fk, grid, args, key = _w8a8_launch(q, s_x, w_q, sb, bias, out, cfg, on_tma, raw, lr)
    fk(grid, args, q.device, num_warps=cfg.warps, num_stages=launch_stages(cfg), key=key)
    return out


def int_mm(a: torch.Tensor, w_q: torch.Tensor, tma: bool | None = None,
           cfg: TileConfig | None = None) -> torch.Tensor:
    """Raw ``a [M,K] @ w_q[N,K]^T`` int32 from the W8A8 GEMM kernel (for exactness checks vs ``torch._int_mm``)."""
    one = torch.ones(1, dtype=torch.float32, device=a.device)
    return gemm_w8a8(a.contiguous(), one, w_q.contiguous(), one, None, torch.int32, raw=True, cfg=cfg, tma=tma)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                group: int | None, out_dtype: torch.dtype, cfg: TileConfig | None = None,
                low_rank: LowRank | None = None, act: int = 0, norm: Norm | None = None) -> torch.Tensor:
    """W8A8: fused (activate +) (rotate +) per-token int8 quant kernel, then the int8 GEMM with the fused
    epilogue (``low_rank``: plus ``(x @ down^T) @ up`` of unrotated x, added in the epilogue; ``act``: an
    ``acts.INPUT_ACTS`` code, never together with ``low_rank``, whose ``h`` reads x as given; ``norm``: an
    RMSNorm of x folded into the quantizer (rotated or not), without ``act`` or ``low_rank``)."""
    _no_act_with_low_rank(act, low_rank, norm)
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    q, s_x = triton_quant.quantize_rows_int8(x2d, group, act=act, norm=norm)
    lr = None if low_rank is None else _low_rank_args(low_rank, x2d, s_x)
    out = gemm_w8a8(q, s_x, _contig_rows(w_q), w_scale, bias, out_dtype, cfg=cfg, lr=lr)
    return out.reshape(*lead, w_q.shape[0])


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor | None, out_dtype: torch.dtype, cfg: TileConfig | None = None,
               low_rank: LowRank | None = None, act: int = 0, norm: Norm | None = None) -> torch.Tensor:
    """FP8 W8A8 (sm_89+): (activate +) per-row dynamic or static-``input_scale`` fp8 quant kernel in W's fp8
    dtype, then the W8A8 GEMM on the fp8 operands (fp32 accumulate) with the same fused epilogue as
    :func:`int8_linear` (``low_rank``, ``act``, ``norm`` as there, ``norm`` with dynamic scales): the fp8 path
    that can fuse a LoRA, unlike _scaled_mm."""
    _no_act_with_low_rank(act, low_rank, norm)
    if w_q.dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn or float8_e5m2, got {w_q.dtype}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    q, s_x = triton_quant.quantize_rows_fp8(x2d, w_q.dtype, input_scale, act=act, norm=norm)
    lr = None if low_rank is None else _low_rank_args(low_rank, x2d, s_x)
    out = gemm_w8a8(q, s_x, _contig_rows(w_q), w_scale, bias, out_dtype, cfg=cfg, lr=lr)
    return out.reshape(*lead, w_q.shape[0])


def fused_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, cfg: TileConfig | None = None,
                 low_rank: LowRank | None = None, act: int = 0, kblock: bool = False,
                 norm: Norm | None = None, wide: bool = ROWS_WIDE) -> torch.Tensor:
    """W8A8 in one launch: per-token quantization of x inside the GEMM (x bf16/fp16/fp32, no rotation);
    ``kblock``: one activation scale per row and K block of the tile config (``BLOCK_K``, 128 from K = 128 on:
    ``reference.int8_linear_kblock_ref``) instead of one per row, so no absmax pass over K comes first. From
    ``configs.ROWS_MIN_M`` rows (``configs.rows_shape``; ``wide``: also on layers of more column tiles than
    quantizing programs) the row-block kernel (``fused_rows``) runs it.
    ``norm``: an RMSNorm of x folded into the quantization (not with ``act``, ``low_rank`` or ``kblock``)."""
    _no_act_with_low_rank(act, low_rank, norm)
    _no_gated_act(act, "fused_linear")
    _norm_alone(norm, act, kblock)
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = _contig_rows(x.reshape(-1, k))
    w_q = _contig_rows(w_q)
    m, n = x2d.shape[0], w_q.shape[0]
    sb = _sb(w_scale)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        lr = _low_rank_args(low_rank, x2d, sb)
        if not kblock and rows_shape(m, n, k, cfg, device_facts(x.device)[0], wide):
            cfg = cfg or rows_config(m, n)
            _fused_rows(x2d, w_q, out, sb, bias, cfg, lr, act, norm)
            return out.reshape(*lead, n)
        if isinstance(norm, ModulatedNorm):
            if kblock or not rows_shape(m, n, k, cfg, wide=wide):
                raise ValueError("a modulated LayerNorm folds into the row-block one-launch kernel only "
                                 "(configs.rows_shape), not the per-tile one")
            x2d, norm = rms_norm(x2d, norm), None  # a GPU too small for the row block's programs at once
        cfg = cfg or fused_config(m, n, k, x.device)
        grid, args, key = _fused_launch(x2d, w_q, out, sb, bias, cfg, lr, act, kblock, norm)
        _FUSED(grid, args, x.device, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    return out.reshape(*lead, n)


def fused_config(m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """The per-tile one-launch kernel's tile (x 16-bit, W int8), with the stages ``device``'s shared memory holds."""
    sms, major = device_facts(device)
    return fit_stages(small_m_config(m, n, k, sms), a_bytes=2, b_bytes=1, smem=device_smem(device), major=major)


def _fused_launch(x2d: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, sb: torch.Tensor,
                  bias: torch.Tensor | None, cfg: TileConfig, lr: tuple[tuple, tuple], act: int,
                  kblock: bool = False, norm: Norm | None = None) -> tuple:
    """(grid, args, key) of the one-launch W8A8 kernel (x at ``args[0]``, the output at ``args[2]``, a folded
    norm's weight at ``args[-3]``)."""
    (m, k), n = x2d.shape, w_q.shape[0]
    chunk = min(8192 // cfg.block_m, next_power_of_2(k))  # absmax pass: <= 8K elements in registers
    lr_args, lr_key = lr
    nw, eps, code = norm_args(norm, sb)
    return ((cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
            (x2d, w_q, out, sb, bias if bias is not None else sb, m, n, k, x2d.stride(0), w_q.stride(0),
             out.stride(0), sb.numel() > 1, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,
             k % cfg.block_k == 0, chunk, *lr_args, act, kblock, nw, eps, code),
            (cfg, chunk, x2d.dtype, out.dtype, n, k, x2d.stride(0), w_q.stride(0), sb.numel() > 1, bias is not None,
             _al(x2d), _al(w_q), _al(sb), bias is None or _al(bias), lr_key, act, kblock, code, nw.dtype, _al(nw)))


def _norm_alone(norm: Norm | None, act: int, kblock: bool = False) -> None:
    """A folded norm takes the quantizer to itself: no input activation, no per-block scales."""
    if norm is not None and (act or kblock):
        raise ValueError("a folded RMSNorm and an input activation (or per-block activation scales) in one call: "
                         "apply one of them first")


ROWS_QUANT_PER_THREAD = 64  # fp32 values of x per thread in the quantization share (16K on 8 warps)


def rows_quant_config(k: int, cfg: TileConfig, qp: int) -> tuple[int, int, int]:
    """(rows per step, columns per step, chunks) of the row-block kernel's quantization share: rows up to 8,192
    wide in registers, longer ones in two passes over 4,096- or 2,048-column chunks (as the activation kernel's
    block configurations); as many rows per step as give each of the row block's ``qp`` quantizing programs
    (``configs.rows_quant_programs``) one step, within :data:`ROWS_QUANT_PER_THREAD` values a thread (H200 run 46:
    5-13% less GPU time than 4 rows a step on rows up to 2,048 wide, the same from 4,096); chunked rows one at a
    time (4 rows of 3 chunks unrolled twice ran 1.5-1.7x slower: Flux mlp2, K = 12,288)."""
    full = next_power_of_2(max(k, 16))
    if full > 8192:
        bk = 4096 if k % 4096 == 0 else 2048
        return 1, bk, cdiv(k, bk)
    fits = max(1, ROWS_QUANT_PER_THREAD * 32 * cfg.warps // full)
    want = next_power_of_2(cdiv(cfg.block_m, qp))
    return max(1, min(fits, want, cfg.block_m)), full, 1


def rows_buffers(device: torch.device, stream: int, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(int8 codes [m, k], row scales [m, 1], counters) of a row-block launch on ``stream``: the stream's
    scratch pair of the two-launch path and the split-K workspace's counters (kernels on one stream run in
    order, and every launch leaves the counters zeroed)."""
    q, s = scratch.pool(device).pair(stream, m, k, torch.int8)
    return q, s, scratch.split_workspace(device).counters(stream)


def _rows_launch(x2d: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, sb: torch.Tensor,
                 bias: torch.Tensor | None, cfg: TileConfig, lr: tuple[tuple, tuple], act: int,
                 bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], phase: int = 0,
                 norm: Norm | None = None) -> tuple:
    """(grid, args, key) of the row-block kernel: x, w, out, then the codes, scales and counters ``bufs`` at
    ``args[0:6]`` and ``args[7]``, a folded norm's tensor at ``args[-5]``, ``phase`` last (1 / 2: quantization /
    GEMM alone, for the CPU interpreter)."""
    (m, k), n = x2d.shape, w_q.shape[0]
    q, s, sync = bufs
    qp = rows_quant_programs(cdiv(n, cfg.block_n), device_facts(x2d.device)[0])
    qr, bk, nch = rows_quant_config(k, cfg, qp)
    lr_args, lr_key = lr
    nw, eps, code = norm_args(norm, sb)
    if isinstance(norm, ModulatedNorm) and nch != 1:
        raise ValueError(f"a modulated LayerNorm needs rows in registers: K = {k} is over 8,192")
    return ((cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
            (x2d, w_q, out, q, s, sb, bias if bias is not None else sb, sync, m, n, k, x2d.stride(0),
             w_q.stride(0), out.stride(0), sb.numel() > 1, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k,
             k % cfg.block_k == 0, *lr_args, act, qr, bk, nch, nw, eps, norm_rows(norm), qp, code, phase),
            (cfg, x2d.dtype, out.dtype, n, k, x2d.stride(0), w_q.stride(0), sb.numel() > 1, bias is not None,
             _al(x2d), _al(w_q), _al(q), _al(sb), bias is None or _al(bias), lr_key, act, phase, code, nw.dtype,
             _al(nw)))


def _fused_rows(x2d: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, sb: torch.Tensor,
                bias: torch.Tensor | None, cfg: TileConfig, lr: tuple[tuple, tuple], act: int,
                norm: Norm | None = None) -> None:
    """Launch the row-block kernel (``triton_quant.sync_phases``: its quantization, then its GEMM, apart off a
    GPU)."""
    dev = x2d.device
    m, k = x2d.shape
    bufs = rows_buffers(dev, stream_id(dev), m, k)
    for phase in triton_quant.sync_phases(dev):
        grid, args, key = _rows_launch(x2d, w_q, out, sb, bias, cfg, lr, act, bufs, phase, norm)
        _FUSED_ROWS(grid, args, dev, num_warps=cfg.warps, num_stages=cfg.stages, key=key)


def w8a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 group: int | None, out_dtype: torch.dtype, cfg: TileConfig | None = None,
                 low_rank: LowRank | None = None, act: int = 0, packed: bool = False,
                 norm: Norm | None = None) -> torch.Tensor:
    """Weight-only small-M GEMM: int8/fp8 weights converted to x's 16-bit dtype in registers, fp32 accumulate
    (``act``: the input activation, in the rotation pass or on each A tile as it is loaded); ``packed``: ``w_q``
    is int4 two per byte along K (``int4_rot``'s int8 ``[N, K/2]``), unpacked in registers as well; ``norm``
    (rotated weights, without ``act`` or ``low_rank``): an RMSNorm of x applied in the rotation pass, which then
    reads x in its own dtype and writes bf16 (an fp32 x is not rounded before the norm)."""
    _no_act_with_low_rank(act, low_rank, norm)
    _no_gated_act(act, "w8a16_linear")
    if norm is not None and group is None:
        raise ValueError("w8a16_linear folds a norm into the rotation pass: an unrotated weight has none")
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    x_lr = x2d  # the side path sees x as given (unrotated, its own dtype)
    half = x2d.dtype in (torch.bfloat16, torch.float16)
    if not half and norm is None:
        x2d = x2d.to(torch.bfloat16)
    a_act = act
    if group is not None:
        x2d = triton_quant.rotate_rows(x2d, group, act=act, norm=norm, out_dtype=None if half else torch.bfloat16)
        a_act = 0
    else:
        x2d = _contig_rows(x2d)
    w_q = _contig_rows(w_q)
    m, n = x2d.shape[0], w_q.shape[0]
    sb = _sb(w_scale)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        cfg = cfg or w8a16_config_for(m, n, k, x.device, w_q.dtype in FP8_DTYPES)
        bufs = split_buffers(x.device, None, cfg, m, n)
        grid, args, key = _w8a16_launch(x2d, w_q, out, sb, bias, cfg, _low_rank_args(low_rank, x_lr, sb), a_act,
                                        bufs, packed)
        _W8A16(grid, args, x.device, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    return out.reshape(*lead, n)


def w8a16_config_for(m: int, n: int, k: int, device: torch.device, fp8: bool) -> TileConfig:
    """``configs.w8a16_config`` for ``device``: its multiprocessors, shared memory and pipeline kind."""
    sms, major = device_facts(device)
    return w8a16_config(m, n, k, sms, fp8=fp8, smem=device_smem(device), major=major)


def split_buffers(device: torch.device, stream: int | None, cfg: TileConfig, m: int, n: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split-K launch's (partials, counters) on ``stream`` (None: the current one), or None for an unsplit
    config."""
    if cfg.split_k == 1:
        return None
    if stream is None:
        stream = stream_id(device)
    if cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) > scratch.SPLIT_COUNTERS:
        raise ValueError(f"split-K weight-only GEMM: {m}x{n} has more tiles than {scratch.SPLIT_COUNTERS}")
    return scratch.split_workspace(device).buffers(stream, cfg.split_k * m * n)


def _w8a16_launch(x2d: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, sb: torch.Tensor,
                  bias: torch.Tensor | None, cfg: TileConfig, lr: tuple[tuple, tuple], act: int,
                  bufs: tuple[torch.Tensor, torch.Tensor] | None = None, packed: bool = False) -> tuple:
    """(grid, args, key) of the weight-only kernel (x at ``args[0]``, the output at ``args[2]``, with
    ``cfg.split_k`` > 1 the partials and counters ``bufs`` at ``args[-5]`` and ``args[-4]``); ``packed``: int4
    weights ``[N, K/2]``."""
    (m, k), n = x2d.shape, w_q.shape[0]
    if w_q.shape[1] * (2 if packed else 1) != k or (packed and (w_q.dtype != torch.int8 or cfg.block_k % 32)):
        raise ValueError(f"weight-only GEMM: weight {tuple(w_q.shape)} {w_q.dtype} does not hold {k} columns"
                         + (" packed two per byte (int8, BLOCK_K a multiple of 32)" if packed else ""))
    lr_args, lr_key = lr
    split = cfg.split_k
    if split > 1 and bufs is None:
        raise ValueError("a split-K config needs its workspace (split_buffers)")
    ws, cnt = bufs if bufs is not None else (sb, sb)
    k_per = cdiv(cdiv(k, cfg.block_k), split) * cfg.block_k
    return ((cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), split),
            (x2d, w_q, out, sb, bias if bias is not None else sb, m, n, k, x2d.stride(0), w_q.stride(0),
             out.stride(0), sb.numel() > 1, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,
             k % cfg.block_k == 0, *lr_args, act, ws, cnt, k_per, split, packed),
            (cfg, x2d.dtype, w_q.dtype, out.dtype, n, k, x2d.stride(0), w_q.stride(0), sb.numel() > 1,
             bias is not None, _al(x2d), _al(w_q), _al(sb), bias is None or _al(bias), lr_key, act, packed))


def w4a8_order(m: int) -> str:
    """The W4A8 GEMM's operand order for ``m`` rows (a key of :data:`W4A8_KERNELS`): the weight as wgmma's
    register operand from ``SMALL_M`` rows (run 65: the swapped order 1.0-1.35x the plain one's GPU time on 6
    layers at 256-16,384 rows, 0.68-0.74x of it on <= 3,072-wide layers at 1-16 rows), both nibbles per MMA."""
    return "joined" if m >= SMALL_M else "plain"


def w4a8_block_k(k: int) -> int:
    """The W4A8 GEMM's K step for an activated width ``k``: ``PERM_BLOCK`` (128) where it divides K, else 64 (the
    format allows any multiple of 64: Flux's 64-wide ``img_in``, SD 1.5's 320 / 960)."""
    return kern.PERM_BLOCK if k % kern.PERM_BLOCK == 0 else kern.PERM_BLOCK // 2


def w4a8_perm(order: str, k: int) -> int:
    """The K permutation block the activations are quantized with for ``order`` at width ``k`` (0: natural
    order: the orders that take both nibbles in one MMA)."""
    return w4a8_block_k(k) if order in ("plain", "swapped") else 0


def w4a8_config(m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """The W4A8 GEMM's tile for ``[m, k] x [k, n]`` (k: the activated width), K steps of one permutation block
    (:func:`w4a8_block_k` columns). Below ``SMALL_M`` rows the W8A8 thin-M tiles. From there (the register-operand
    order) 64 weight rows on 4 warps: the accumulator stays at 64 registers a thread, so several programs share an
    SM and one's unpacking overlaps another's MMA (Triton waits on every wgmma whose operand is in registers);
    the most activation rows (256, 128, 64, at most M's next power of two) that still give half the SMs a program
    each. Run 67 (GPU time, 12 tiles on 6 layers at 256-16,384 rows): 256 x 64 best on 21 of 24 rows, 128 x 64 on
    Flux proj / mlp2 at 256 (48 programs of 256), 64 x 64 on SDXL's 1,280 at 256; the W8A8 rule's tiles 0.76x of
    the best (geometric mean)."""
    sms, major = device_facts(device)
    smem = device_smem(device)
    if w4a8_order(m) == "plain":
        cfg = (small_m_config(m, n, k, sms) if m < SMALL_M
               else gemm_config(m, n, k, sms, hopper=hopper_class(device)))
        return fit_stages(TileConfig(cfg.block_m, cfg.block_n, w4a8_block_k(k), cfg.warps, cfg.stages, cfg.group_m),
                          1, 1, smem, major)
    cap = max(64, next_power_of_2(m))
    bm = next((b for b in (256, 128) if b <= cap and cdiv(m, b) * cdiv(n, 64) >= sms // 2), 64)
    return fit_stages(TileConfig(bm, 64, w4a8_block_k(k), 4, 3 if bm == 256 else 4, 8), 1, 1, smem, major)


def _w4a8_launch(q: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, sb: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, cfg: TileConfig, lr: tuple[tuple, tuple]) -> tuple:
    """(grid, args, key) of the W4A8 GEMM (the quantized x at ``args[0]``, the output at ``args[2]``, x's row
    scales at ``args[3]``)."""
    (m, k), n = q.shape, w_packed.shape[0]
    lr_args, lr_key = lr
    return ((cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
            (q, w_packed, out, s_x, sb, bias if bias is not None else sb, m, n, k, q.stride(0), w_packed.stride(0),
             out.stride(0), sb.numel() > 1, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,
             *lr_args),
            (cfg, out.dtype, n, k, w_packed.stride(0), sb.numel() > 1, bias is not None, _al(w_packed), _al(sb),
             bias is None or _al(bias), lr_key))


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype, block: int = 0) -> torch.Tensor:
    """``w_q * w_scale`` as a fresh ``dtype`` tensor in one kernel (int8 or fp8 storage); ``block`` > 0: a scale
    per ``block`` square tile (``w_scale [ceil(N/b), ceil(K/b)]``)."""
    w_q = _contig_rows(w_q)
    sb = w_scale.float().contiguous() if block else _sb(w_scale)
    out = torch.empty(w_q.shape, dtype=dtype, device=w_q.device)
    grid, args, key = _dequant_launch(w_q, sb, out, block)
    _DEQUANT(grid, args, w_q.device, num_warps=4, num_stages=1, key=key)
    return out


def _dequant_launch(w_q: torch.Tensor, sb: torch.Tensor, out: torch.Tensor, block: int = 0) -> tuple:
    """(grid, args, key) of the dequantize kernel (its output at ``args[2]``); ``block`` > 0: ``sb`` holds one
    scale per ``block`` x ``block`` tile (``[ceil(N/b), ceil(K/b)]``, rows contiguous)."""
    n, k = w_q.shape
    bn, bk = 32, 256
    return ((cdiv(n, bn), cdiv(k, bk)),
            (w_q, sb, out, n, k, w_q.stride(0), out.stride(0), sb.numel() > 1, bn, bk, block,
             sb.stride(0) if block else 0),
            (w_q.dtype, out.dtype, n, k, w_q.stride(0), sb.numel() > 1, _al(w_q), _al(sb), block,
             sb.stride(0) if block else 0))


def dequant_block_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: int,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Block-wise int8 (``int8_block``): W dequantized in one kernel (a scale per ``block`` square tile), then
    cuBLAS in x's 16-bit dtype (bf16 for others): weight-only, as the row-scaled dequantize path."""
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = F.linear(x.to(dt), dequantize_weight(w_q, w_scale, dt, block), None if bias is None else bias.to(dt))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def dequant_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   group: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize W (one kernel) and run cuBLAS: bf16 GEMM speed with the weight stored quantized."""
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    xx = x.to(dt)
    if group is not None:
        k = x.shape[-1]
        xx = triton_quant.rotate_rows(xx.reshape(-1, k), group).reshape(x.shape)
    out = F.linear(xx, dequantize_weight(w_q, w_scale, dt), None if bias is None else bias.to(dt))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def w4a8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                group: int, out_dtype: torch.dtype, cfg: TileConfig | None = None,
                low_rank: LowRank | None = None, act: int = 0, order: str | None = None,
                norm: Norm | None = None) -> torch.Tensor:
    """int4_rot W4A8: (activate or RMSNorm +) rotate + per-token int8 quant (K permuted per 128 block for the
    orders that split nibbles), then the int4-weight GEMM in ``order`` (a key of :data:`W4A8_KERNELS`; all
    bit-equal; None: :func:`w4a8_order`'s rule); ``norm`` as :func:`int8_linear` takes it."""
    _no_act_with_low_rank(act, low_rank, norm)
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    order = order or w4a8_order(x2d.shape[0])
    q, s_x = triton_quant.quantize_rows_int8(x2d, group, perm=w4a8_perm(order, triton_quant.out_width(x2d, act)),
                                             act=act, norm=norm)
    w_packed = _contig_rows(w_packed)
    m, n = q.shape[0], w_packed.shape[0]
    sb = _sb(w_scale)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        cfg = cfg or w4a8_config(m, n, q.shape[1], x.device)
        grid, args, key = _w4a8_launch(q, s_x, w_packed, sb, bias, out, cfg, _low_rank_args(low_rank, x2d, sb))
        W4A8_KERNELS[order](grid, args, x.device, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    return out.reshape(*lead, n)
