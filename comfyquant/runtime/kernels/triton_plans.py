"""Eager fast paths: a layer's Triton launches prepared once per input signature, then replayed.

In eager mode (how ComfyUI runs) a small layer costs host time, not GPU time: ~15 µs per bf16 ``nn.Linear``
call on the H200 host we measured, 27-60 µs per call for our paths through the generic host functions
(configs, checks, argument tuples, specialization keys, Triton's Python launcher). A plan fixes everything but
``x`` and the fresh outputs at the first call of a signature (tile config, grid, weight-side arguments, the
compiled kernel); each later call allocates its outputs and calls the compiled kernels' C launchers. Plans
cover dynamic LoRAs too: the side path's padded operands are fixed until it changes (the caller keys the
plan on them); only ``h = x @ down^T`` is computed per call.

A plan is valid only for inputs like the one it was made from: contiguous, 16-byte aligned, same shape,
dtype and device (:func:`usable` checks the per-call part; the caller's memo key the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from comfyquant.quant.fp8 import FP8_DTYPES
from comfyquant.runtime.kernels import scratch, triton_quant
from comfyquant.runtime.kernels import triton_int8 as ti
from comfyquant.runtime.kernels.acts import ModulatedNorm, Norm
from comfyquant.runtime.kernels.configs import ROWS_WIDE, TileConfig, rows_config, rows_shape
from comfyquant.runtime.versions import version

Plan = Callable[[torch.Tensor], torch.Tensor]
LowRank = tuple  # dispatch.LowRank: (down [R, K], up [R, N], r), x's dtype
_HALF = (torch.bfloat16, torch.float16)


def usable(x: torch.Tensor) -> bool:
    """Whether a plan made for ``x``'s signature may run ``x`` (its layout is what the plan assumed)."""
    return x.is_contiguous() and x.data_ptr() % 16 == 0


def _rows(x: torch.Tensor) -> tuple[tuple[int, ...], int, int] | None:
    if not usable(x) or x.dim() < 1:
        return None
    k = int(x.shape[-1])
    m = x.numel() // k if k else 0
    return (tuple(x.shape[:-1]), m, k) if m and k else None


def _scale(w_scale: torch.Tensor) -> torch.Tensor | None:
    """The kernels' fp32 scale vector when it is ``w_scale``'s own storage (so in-place updates of the
    weight are seen, as on the general path); None when it would be a copy (no plan then)."""
    sb = ti._sb(w_scale)
    return sb if sb.data_ptr() == w_scale.data_ptr() else None


def _common(x: torch.Tensor, w_q: torch.Tensor,
            w_scale: torch.Tensor) -> tuple[tuple[int, ...], int, int, int, torch.device, torch.Tensor] | None:
    """(lead dims, M, N, K, device, the kernels' scale vector) when a plan can be made for x and this weight:
    x contiguous and aligned, the weight's rows contiguous, its scale read in place; else None."""
    rows = _rows(x)
    sb = None if rows is None or w_q.stride(-1) != 1 else _scale(w_scale)
    if sb is None:
        return None
    lead, m, k = rows
    return lead, m, int(w_q.shape[0]), k, x.device, sb


def raw_stream(device: torch.device) -> Callable[[], int]:
    """``() -> the current stream's raw handle on device`` (0 off CUDA), with the device index resolved once."""
    if device.type != "cuda":
        return lambda: 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    get = torch._C._cuda_getCurrentRawStream
    return lambda: get(index)


def plan_w8a16(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, act: int = 0, low_rank: LowRank | None = None,
               packed: bool = False, cfg: TileConfig | None = None) -> Plan | None:
    """``x -> w8a16_linear(x, w_q, w_scale, bias, None, out_dtype, low_rank=low_rank, act=act, packed=packed,
    cfg=cfg)`` for ``x``'s signature, or None (no rotation; x bf16/fp16; the kernel compiled by an earlier call
    with the same tile: ``cfg``, None for ``w8a16_config``'s)."""
    common = _common(x, w_q, w_scale) if x.dtype in _HALF else None
    if common is None:
        return None
    lead, m, n, k, dev, sb = common
    cfg = cfg or ti.w8a16_config_for(m, n, k, dev, w_q.dtype in FP8_DTYPES)
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    lr = ti._low_rank_args(low_rank, x.view(m, k), sb)
    bufs = ti.split_buffers(dev, raw_stream(dev)(), cfg, m, n)
    grid, args, key = ti._w8a16_launch(x.view(m, k), w_q, out, sb, bias, cfg, lr, act, bufs, packed)
    fire = ti._W8A16.prepared(grid, args, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    if bufs is None:
        return _one_launch(fire, args, (*lead, n), out_dtype, dev, _h_slot(args, lr, low_rank))
    return _split_launch(fire, args, (*lead, n), out_dtype, dev, _h_slot(args, lr, low_rank), cfg, m, n)


def plan_rotated(x: torch.Tensor, group: int, act: int, inner: Callable[[torch.Tensor], Plan | None],
                 norm: Norm | None = None) -> Plan | None:
    """The plan of a path that rotates x apart (weight-only and dequantize + cuBLAS on a convrot layer): the
    rotation pass (``act`` applied as it reads x, or ``norm``), as ``triton_quant.rotate_rows`` launches it, into
    the stream's scratch buffer, then ``inner``'s plan for the rotated input; None where either has none. No
    low-rank term: it reads the unrotated x (such calls take the general path)."""
    rows = _rows(x) if x.dtype in _HALF else None
    if rows is None:
        return None
    lead, m, kx = rows
    dev, dt, mode = x.device, x.dtype, triton_quant.MODE_FLOAT
    k = triton_quant.out_width(x, act)
    extra = triton_quant.scale_floats(x.view(m, kx), group, mode, act) - m
    pool = scratch.pool(dev)
    stream, pair = raw_stream(dev), pool.pair
    r0, s0 = pair(stream(), m, k, dt, extra)
    fire, rest = _act_plan(x.view(m, kx), r0, s0, group, mode, 1.0, act, norm=norm)
    p = None if fire is None else inner(r0.view(*lead, k))
    if p is None:
        return None
    per_stream: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    keep = m * k * x.element_size() <= pool.max_bytes  # what the pool shares; a larger pair is made per call

    def run(x: torch.Tensor) -> torch.Tensor:
        st = stream()
        got = per_stream.get(st)
        if got is None:  # the stream's pair, kept (with its [..., K] view) once looked up
            r, s = pair(st, m, k, dt, extra)
            got = (r, s, r.view(*lead, k))
            if keep:
                per_stream[st] = got
        fire(st, x, got[0], got[1], *rest(st, got[1]))
        return p(got[2])

    return run


def _split_launch(fire: Callable | None, args: tuple, shape: tuple[int, ...], out_dtype: torch.dtype,
                  dev: torch.device, h_slot: tuple[int, torch.Tensor] | None, cfg: TileConfig, m: int,
                  n: int) -> Plan | None:
    """:func:`_one_launch` for the split-K weight-only kernel: its partials and counters (``args[-5:-3]``) are
    the current stream's (a plan may run on any stream), looked up once per stream and kept (a workspace that
    grows later keeps the old buffers alive)."""
    if fire is None:
        return None
    stream, empty, linear = raw_stream(dev), torch.empty, torch.nn.functional.linear
    per_stream: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bufs(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = per_stream.get(s)
        if got is None:
            got = per_stream[s] = ti.split_buffers(dev, s, cfg, m, n)
        return got

    if h_slot is None:
        w_arg, mid, tail = args[1], args[3:-5], args[-3:]

        def run(x: torch.Tensor) -> torch.Tensor:
            s = stream()
            out = empty(*shape, dtype=out_dtype, device=dev)
            fire(s, x, w_arg, out, *mid, *bufs(s), *tail)
            return out

        return run
    hi, down = h_slot
    ws_i = len(args) - 5
    template = _without(list(args), (0, 2, ws_i, ws_i + 1, hi))

    def run_lr(x: torch.Tensor) -> torch.Tensor:
        s = stream()
        a = template.copy()
        a[0], a[2], a[hi] = x, empty(*shape, dtype=out_dtype, device=dev), linear(x, down)
        a[ws_i], a[ws_i + 1] = bufs(s)
        fire(s, *a)
        return a[2]

    return run_lr


def plan_fused(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, act: int = 0, low_rank: LowRank | None = None,
               kblock: bool = False, norm: Norm | None = None, wide: bool = ROWS_WIDE) -> Plan | None:
    """``x -> fused_linear(x, w_q, w_scale, bias, out_dtype, low_rank=low_rank, act=act, kblock=kblock,
    norm=norm, wide=wide)`` for ``x``'s signature, or None (the norm's weight is held: in-place updates are
    seen)."""
    ti._norm_alone(norm, act, kblock)
    common = _common(x, w_q, w_scale)
    if common is None:
        return None
    lead, m, n, k, dev, sb = common
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    lr = ti._low_rank_args(low_rank, x.view(m, k), sb)
    if not kblock and rows_shape(m, n, k, None, ti.device_facts(dev)[0], wide):
        return _rows_plan(x.view(m, k), w_q, out, sb, bias, lr, act, (*lead, n), low_rank, norm)
    if isinstance(norm, ModulatedNorm):  # (the general path applies it in torch on a GPU too small for the rows)
        return None
    cfg = ti.fused_config(m, n, k, dev)
    grid, args, key = ti._fused_launch(x.view(m, k), w_q, out, sb, bias, cfg, lr, act, kblock, norm)
    return _one_launch(ti._FUSED.prepared(grid, args, num_warps=cfg.warps, num_stages=cfg.stages, key=key),
                       args, (*lead, n), out_dtype, dev, _h_slot(args, lr, low_rank))


def _rows_plan(x2d: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, sb: torch.Tensor,
               bias: torch.Tensor | None, lr: tuple[tuple, tuple], act: int, shape: tuple[int, ...],
               low_rank: LowRank | None, norm: Norm | None = None) -> Plan | None:
    """The plan of the row-block one-launch kernel (``triton_int8.fused_rows``): per call, x, a fresh output, the
    stream's scratch codes / scales / counters (``rows_buffers``: a plan may run on any stream) and the low-rank
    term's ``h``; the rest fixed. Under the CPU interpreter its two phases fire one after the other, as the
    general path runs them."""
    dev = x2d.device
    (m, k), n = x2d.shape, w_q.shape[0]
    cfg = rows_config(m, n)
    bufs = ti.rows_buffers(dev, raw_stream(dev)(), m, k)
    fires = []
    for phase in triton_quant.sync_phases(dev):
        grid, args, key = ti._rows_launch(x2d, w_q, out, sb, bias, cfg, lr, act, bufs, phase, norm)
        fire = ti._FUSED_ROWS.prepared(grid, args, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
        if fire is None:
            return None
        fires.append((fire, phase))
    stream, empty, linear, out_dtype = raw_stream(dev), torch.empty, torch.nn.functional.linear, out.dtype
    hi, down = _h_slot(args, lr, low_rank) or (None, None)
    template = _without(list(args), (0, 2, 3, 4, 7, hi))
    ws = scratch.split_workspace(dev)

    def run(x: torch.Tensor) -> torch.Tensor:
        st = stream()
        a = template.copy()
        q, s = scratch.pool(dev).pair(st, m, k, torch.int8)
        a[0], a[2], a[3], a[4], a[7] = x, empty(*shape, dtype=out_dtype, device=dev), q, s, ws.counters(st)
        if hi is not None:
            a[hi] = linear(x, down)
        for fire, phase in fires:
            a[-1] = phase
            fire(st, *a)
        return a[2]

    return run


def _without(seq: list, slots: tuple[int | None, ...]) -> list:
    """``seq`` with the per-call slots emptied: a plan never keeps the buffers it was built with."""
    for i in slots:
        if i is not None:
            seq[i] = None
    return seq


def _h_slot(args: tuple, lr: tuple[tuple, tuple], low_rank: LowRank | None) -> tuple[int, torch.Tensor] | None:
    """(position of the low-rank term's ``h = x @ down^T`` in ``args``, ``down``), None without a term: ``h``
    is made per call, the rest of the term's arguments are fixed."""
    if low_rank is None:
        return None
    h = lr[0][0]  # passed as itself, or (the Gluon kernel) as a descriptor over it
    return next(i for i, a in enumerate(args) if a is h or getattr(a, "base", None) is h), low_rank[0]


def _one_launch(fire: Callable | None, args: tuple, shape: tuple[int, ...], out_dtype: torch.dtype,
                dev: torch.device, h_slot: tuple[int, torch.Tensor] | None) -> Plan | None:
    """The plan of a kernel that reads x at ``args[0]`` and writes its output at ``args[2]`` (and the low-rank
    term's ``h`` at ``h_slot``)."""
    if fire is None:
        return None
    stream, empty = raw_stream(dev), torch.empty
    if h_slot is None:
        w_arg, rest = args[1], args[3:]

        def run(x: torch.Tensor) -> torch.Tensor:
            out = empty(*shape, dtype=out_dtype, device=dev)  # [..., N] is [M, N] in memory: no views per call
            fire(stream(), x, w_arg, out, *rest)
            return out

        return run
    hi, down = h_slot
    linear = torch.nn.functional.linear
    template = _without(list(args), (0, 2, hi))

    def run_lr(x: torch.Tensor) -> torch.Tensor:
        a = template.copy()
        a[0], a[2], a[hi] = x, empty(*shape, dtype=out_dtype, device=dev), linear(x, down)
        fire(stream(), *a)
        return a[2]

    return run_lr


def plan_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              group: int | None, out_dtype: torch.dtype, act: int = 0,
              low_rank: LowRank | None = None, norm: Norm | None = None) -> Plan | None:
    """``x -> int8_linear(x, w_q, w_scale, bias, group, out_dtype, low_rank=low_rank, act=act, norm=norm)``
    (quantize kernel, then the GEMM, TMA where the general path takes it) for ``x``'s signature, or None."""
    return _plan_w8a8(x, w_q, w_scale, bias, group, out_dtype, act, low_rank, torch.int8,
                      triton_quant.MODE_INT8, 127.0, norm=norm)


def plan_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype, act: int = 0, low_rank: LowRank | None = None,
             input_scale: torch.Tensor | None = None, norm: Norm | None = None) -> Plan | None:
    """``x -> fp8_linear(x, w_q, w_scale, bias, input_scale, out_dtype, low_rank=low_rank, act=act)`` (per-row
    dynamic, or static ``input_scale``, fp8 activations in W's fp8 dtype, then the same W8A8 GEMM on fp8
    operands) for ``x``'s signature, or None. A static scale is read in place (updates are seen)."""
    if input_scale is not None and (input_scale.device != x.device or input_scale.dtype != torch.float32
                                    or input_scale.numel() != 1):
        return None  # the general path converts it per call
    static = None if input_scale is None else input_scale.reshape(1)  # a view: the same storage
    mode = triton_quant.MODE_FP8 if static is None else triton_quant.MODE_FP8_STATIC
    return _plan_w8a8(x, w_q, w_scale, bias, None, out_dtype, act, low_rank, w_q.dtype, mode,
                      float(torch.finfo(w_q.dtype).max), static, norm)


def _plan_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               group: int | None, out_dtype: torch.dtype, act: int, low_rank: LowRank | None,
               qdtype: torch.dtype, mode: int, qmax: float, static: torch.Tensor | None = None,
               norm: Norm | None = None) -> Plan | None:
    common = _common(x, w_q, w_scale)
    if common is None:
        return None
    lead, m, n, kx, dev, sb = common
    k = triton_quant.out_width(x, act)  # x's width kx, and the activated one the GEMM reads
    q = torch.empty((m, k), dtype=qdtype, device=dev)
    # the split rotation's absmax parts (a static scale: the row scales alone, as the general path sizes them)
    extra = 0 if static is not None else triton_quant.scale_floats(x.view(m, kx), group, mode, act) - m
    s = scratch.row_scales(m, extra, dev)
    quantize = _quantize_plan(x.view(m, kx), q, s, group, mode, qmax, act, extra, static=static, norm=norm)
    lr = ti._low_rank_args(low_rank, x.view(m, kx), sb)  # no LoRA: the weight scale stands in (held anyway)
    cfg, small = ti.pick_w8a8(m, n, k, dev, ti.persistent_eligible(qdtype, False, lr),
                              ti.ws_eligible(qdtype, False, lr))
    tma = ti.use_tma(q, w_q) and not small
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    fk, grid, args, key = ti._w8a8_launch(q, s, w_q, sb, bias, out, cfg, tma, False, lr)
    fire_g = fk.prepared(grid, args, num_warps=cfg.warps, num_stages=ti.launch_stages(cfg), key=key)
    if quantize is None or fire_g is None:
        return None
    shape, empty, linear = (*lead, n), torch.empty, torch.nn.functional.linear
    a_desc = desc_maker(args[0]) if tma else None
    # the output as the launch passes it: a tensor, or (the Gluon kernel, which stores through TMA) a descriptor
    c_desc = None if isinstance(args[2], torch.Tensor) else desc_maker(args[2])
    hi, down = _h_slot(args, lr, low_rank) or (None, None)
    h_desc = None if hi is None or isinstance(args[hi], torch.Tensor) else desc_maker(args[hi])
    template = _without(list(args), (0, 2, 3, hi))

    def run(x: torch.Tensor) -> torch.Tensor:
        st, q, s = quantize(x)
        a = template.copy()
        out = empty(*shape, dtype=out_dtype, device=dev)
        a[0], a[2], a[3] = q if a_desc is None else a_desc(q), out if c_desc is None else c_desc(out), s
        if hi is not None:
            h = linear(x, down)
            a[hi] = h if h_desc is None else h_desc(h)
        fire_g(st, *a)
        return out

    direct = fk.prepared_tma(grid, num_warps=cfg.warps, num_stages=ti.launch_stages(cfg), key=key) if tma else None
    if direct is None:
        return run
    fast = _tma_run(direct, quantize, {0: a_desc, 2: c_desc, hi: h_desc}, args, hi, down, out_dtype, shape)
    ok = fk.direct_agrees(key, lambda: fast(x), lambda: run(x), f"W8A8 plan for N={n} K={k}")
    return fast if ok else run


def plan_w4a8(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              group: int, out_dtype: torch.dtype, act: int = 0, low_rank: LowRank | None = None,
              norm: Norm | None = None) -> Plan | None:
    """``x -> w4a8_linear(x, w_packed, w_scale, bias, group, out_dtype, act=act, norm=norm)`` (rotate + quantize
    with K permuted per block into the stream's scratch pair, then the int4-weight GEMM) for ``x``'s signature,
    or None (a low-rank term takes the general path)."""
    common = None if low_rank is not None else _common(x, w_packed, w_scale)
    if common is None:
        return None
    lead, m, n, kx, dev, sb = common
    order = ti.w4a8_order(m)
    k, mode = triton_quant.out_width(x, act), triton_quant.MODE_INT8
    perm = ti.w4a8_perm(order, k)
    extra = triton_quant.scale_floats(x.view(m, kx), group, mode, act) - m
    q0, s0 = torch.empty((m, k), dtype=torch.int8, device=dev), scratch.row_scales(m, extra, dev)
    quantize = _quantize_plan(x.view(m, kx), q0, s0, group, mode, 127.0, act, extra, perm, norm=norm)
    cfg = ti.w4a8_config(m, n, k, dev)
    out0 = torch.empty((m, n), dtype=out_dtype, device=dev)
    grid, args, key = ti._w4a8_launch(q0, s0, w_packed, sb, bias, out0, cfg, ti._low_rank_args(None, x, sb))
    fire_g = ti.W4A8_KERNELS[order].prepared(grid, args, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    if quantize is None or fire_g is None:
        return None
    w_arg, rest, shape, empty = args[1], args[4:], (*lead, n), torch.empty

    def run(x: torch.Tensor) -> torch.Tensor:
        st, q, s = quantize(x)
        out = empty(*shape, dtype=out_dtype, device=dev)
        fire_g(st, q, w_arg, out, s, *rest)
        return out

    return run


def _quantize_plan(x2d: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int | None, mode: int, qmax: float,
                   act: int, extra: int, perm: int = 0, static: torch.Tensor | None = None,
                   norm: Norm | None = None) -> Callable[[torch.Tensor], tuple[int, torch.Tensor, torch.Tensor]] | None:
    """``x -> (stream, x's quantized copy [M, K], its row scales)`` for the W8A8 / W4A8 plans: the activation
    kernel's prepared launch (:func:`_act_plan`, built on ``q`` / ``s``) into the stream's scratch pair for this
    shape (``scratch``, with ``extra`` floats after the scales); None where the launch has no prepared form. The
    kernels read x [..., K] and write the output through pointers and fixed strides: a contiguous tensor's memory
    is its [M, K] view's, so no view is made per call."""
    fire, rest = _act_plan(x2d, q, s, group, mode, qmax, act, perm, static, norm)
    if fire is None:
        return None
    m, k, qdtype, stream, pair = q.shape[0], q.shape[1], q.dtype, raw_stream(x2d.device), \
        scratch.pool(x2d.device).pair

    def quantize(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        st = stream()
        q, s = pair(st, m, k, qdtype, extra)
        fire(st, x, q, s, *rest(st, s))
        return st, q, s

    return quantize


def _act_plan(x2d: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int | None, mode: int, qmax: float,
              act: int, perm: int = 0, static: torch.Tensor | None = None, norm: Norm | None = None
              ) -> tuple[Callable | None, Callable[[torch.Tensor], tuple]]:
    """(the activation kernel's prepared launch or None, ``(stream, s) -> the arguments after x, q, s``) for x's
    signature, with the kernel the general path takes (``triton_quant.DEFAULT_KERNEL``): the row kernel reads
    the call's own row scales at ``args[3]``, the tile kernel a fixed Hadamard. The split rotating kernel's two
    launches (absmax parts, then codes: ``s`` is a view of ``triton_quant.scale_floats`` floats) fire as one; the
    one-read rotating kernel takes the counters of the stream it runs on."""
    launches = triton_quant.launch_for(x2d, q, s, static, group, mode, qmax, perm, act, triton_quant.DEFAULT_KERNEL,
                                       norm)
    if len(launches) == 2:
        fires = [fk.prepared(grid, args, num_warps=warps, num_stages=stages, key=key)
                 for fk, grid, args, key, warps, stages in launches]
        if None in fires:
            return None, lambda st, s_call: ()
        (fire_a, fire_b), rest_a, rest_b = fires, launches[0][2][3:], launches[1][2][3:]

        def fire_split(st: int, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
            fire_a(st, x, q, s, *rest_a)
            fire_b(st, x, q, s, *rest_b)

        return fire_split, lambda st, s_call: ()
    fk, grid, args, key, warps, stages = launches[0]
    fire = fk.prepared(grid, args, num_warps=warps, num_stages=stages, key=key)
    rest = args[4:]
    if args[3] is s:
        return fire, lambda st, s_call: (s_call, *rest)
    if fk is triton_quant._ACT_HELD:  # the one-read rotating kernel: the stream's counters at args[4]
        h, tail, ws = args[3], args[5:], scratch.split_workspace(x2d.device)
        return fire, lambda st, s_call: (h, ws.counters(st), *tail)
    fixed = (args[3], *rest)
    return fire, lambda st, s_call: fixed


def plan_dequant(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, block: int = 0) -> Plan | None:
    """``x -> dequant_linear(x, w_q, w_scale, bias, None, out_dtype)`` (dequantize kernel + cuBLAS) for x
    bf16/fp16 of ``x``'s signature, or None; ``block`` > 0: ``dequant_block_linear`` (a scale per square tile,
    read in place when it is fp32 and contiguous)."""
    if x.dtype not in _HALF or out_dtype != x.dtype or w_q.stride(-1) != 1 or _rows(x) is None:
        return None
    if block:
        sb = w_scale if w_scale.dtype == torch.float32 and w_scale.is_contiguous() else None
    else:
        sb = _scale(w_scale)
    if sb is None:
        return None
    dev, dt = x.device, x.dtype
    wd = torch.empty(w_q.shape, dtype=dt, device=dev)
    grid, args, key = ti._dequant_launch(w_q, sb, wd, block)
    fire = ti._DEQUANT.prepared(grid, args, num_warps=4, num_stages=1, key=key)
    if fire is None or (bias is not None and bias.dtype != dt):  # the general path casts a bias per call
        return None
    head, rest, stream, empty, shape = args[:2], args[3:], raw_stream(dev), torch.empty, tuple(w_q.shape)
    linear = torch.nn.functional.linear

    def run(x: torch.Tensor) -> torch.Tensor:
        wd = empty(*shape, dtype=dt, device=dev)
        fire(stream(), *head, wd, *rest)
        return linear(x, wd, bias)

    return run


def plan_scaled_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, act: int = 0, norm: Norm | None = None) -> Plan | None:
    """``x -> fp8.fp8_linear_scaled_mm(x, w_q, w_scale, bias, None, out_dtype, act, norm)`` (per-row fp8
    activations, rowwise ``torch._scaled_mm``) for bf16 x and output of ``x``'s signature, or None. The
    weight scale's rowwise copy is remade when the scale is updated in place (its version counter moves)."""
    rows = _rows(x)
    if (rows is None or x.dtype != torch.bfloat16 or out_dtype != torch.bfloat16
            or (bias is not None and bias.dtype != torch.bfloat16)):
        return None
    lead, m, kx = rows
    k = triton_quant.out_width(x, act)  # x's width kx, and the activated one the GEMM reads
    n, dev, f8 = int(w_q.shape[0]), x.device, w_q.dtype
    q = torch.empty((m, k), dtype=f8, device=dev)
    s = torch.empty((m, 1), dtype=torch.float32, device=dev)
    fire_q, q_rest = _act_plan(x.view(m, kx), q, s, None, triton_quant.MODE_FP8, float(torch.finfo(f8).max), act,
                               norm=norm)
    if fire_q is None:
        return None
    shape, stream, wt = (*lead, n), raw_stream(dev), w_q.t()
    mm = torch._scaled_mm
    state: list = [None, None]  # (w_scale's version, -1 for an inference tensor; its rowwise [1, N] fp32 copy)

    def run(x: torch.Tensor) -> torch.Tensor:
        ver = version(w_scale)
        if state[0] != ver:
            state[:] = [ver, w_scale.float().reshape(1, -1).expand(1, n).contiguous()]
        st = stream()
        q, s = scratch.pool(dev).pair(st, m, k, f8)
        fire_q(st, x, q, s, *q_rest(st, s))
        return mm(q, wt, scale_a=s, scale_b=state[1], bias=bias, out_dtype=torch.bfloat16).view(shape)

    return run


def flat_cache(expand: Callable[[Any, int], list], make: Callable[[torch.Tensor], object],
                i: int) -> Callable[[torch.Tensor], list]:
    """``buf -> the launcher's flat form of descriptor argument i over buf``, kept per buffer address (the
    caching allocator hands a layer the same few blocks every step; a CUtensorMap depends only on the address,
    shape and strides, all fixed here)."""
    flats: dict[int, list] = {}

    def flat(buf: torch.Tensor) -> list:
        f = flats.get(buf.data_ptr())
        if f is None:
            f = expand(make(buf), i)
            if len(flats) >= 8:  # addresses keep changing (another allocator pattern): start over
                flats.clear()
            if not any(isinstance(v, torch.Tensor) for v in f):  # never keep a buffer alive
                flats[buf.data_ptr()] = f
        return f

    return flat


def _tma_run(direct: tuple, quantize: Callable, makers: dict, args: tuple, hi: int | None,
             down: torch.Tensor | None, out_dtype: torch.dtype, shape: tuple[int, ...]) -> Plan:
    """The W8A8 plan on a TMA kernel with the descriptors expanded by us instead of on every launch inside
    Triton's wrapper: the fixed ones (the weight's; a LoRA's ``up``) once, the per-call ones (the quantized
    activation's at ``args[0]``; for the Gluon kernel, which stores through TMA, the output's at ``args[2]`` and
    the low-rank ``h``'s at ``hi``; ``makers`` maps their slots to descriptor makers, None where the slot is a
    plain tensor) once per buffer address. ``args[3]`` is the row scales'."""
    fire, expand = direct

    def flat(i: int) -> Callable[[torch.Tensor], Any]:
        make = makers.get(i)
        return flat_cache(expand, make, i) if make is not None else (lambda buf: (buf,))

    def fixed(lo: int, hi_: int) -> list:  # args[lo:hi_] in the launcher's flat form
        out: list = []
        for i in range(lo, hi_):
            a = args[i]
            out.extend(expand(a, i) if isinstance(getattr(a, "base", None), torch.Tensor) else (a,))
        return out

    a_flat, c_flat = flat(0), flat(2)
    b_flat = fixed(1, 2)
    empty, linear, dev = torch.empty, torch.nn.functional.linear, args[3].device
    if hi is None:
        tail = fixed(4, len(args))

        def run(x: torch.Tensor) -> torch.Tensor:
            st, q, s = quantize(x)
            out = empty(*shape, dtype=out_dtype, device=dev)
            fire(st, *a_flat(q), *b_flat, *c_flat(out), s, *tail)
            return out

        return run
    mid, h_flat, tail = fixed(4, hi), flat(hi), fixed(hi + 1, len(args))

    def run_lr(x: torch.Tensor) -> torch.Tensor:
        st, q, s = quantize(x)
        out = empty(*shape, dtype=out_dtype, device=dev)
        fire(st, *a_flat(q), *b_flat, *c_flat(out), s, *mid, *h_flat(linear(x, down)), *tail)
        return out

    return run_lr


def desc_maker(template: object) -> Callable[[torch.Tensor], object]:
    """``q -> a host tensor descriptor like template over q``: the template's checks (alignment, strides) were
    made on a tensor of the same shape and dtype, so the copies skip them (several µs per call)."""
    cls, fields = type(template), dict(vars(template))
    fields.pop("base", None)  # the sample buffer it was checked on is not kept

    def make(base: torch.Tensor) -> object:
        d = cls.__new__(cls)
        d.__dict__.update(fields)
        d.base = base
        return d

    return make


__all__ = ["Plan", "plan_dequant", "plan_fp8", "plan_fused", "plan_int8", "plan_scaled_mm", "plan_w8a16", "usable"]
