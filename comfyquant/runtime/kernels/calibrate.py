"""Measure a device's :class:`DeviceCosts` once (a few seconds), cache it on disk, load it afterwards.

``measure`` times, on the device: each path's host time per call (a tight loop of calls on a tiny layer, so
the GPU is never the bottleneck: what the Python hops + launches cost), HBM bandwidth (a large copy), and each
GEMM path's arithmetic rate on one GPU-bound shape, backed out through the same model ``costs`` predicts with.
The file is ``~/.cache/comfyquant/dispatch-v<N>-<gpu>-<torch>-<triton>.json`` (``cache_path``); delete it to
re-measure, or pass your own ``DeviceCosts`` in a ``DispatchPolicy``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from comfyquant.io.writer import write_small_file
from comfyquant.runtime.kernels import costs as cm
from comfyquant.runtime.kernels.backends import device_cache_file
from comfyquant.runtime.kernels.costs import DEFAULT_COSTS, DeviceCosts

CACHE_VERSION = 13  # bumped when what is measured or modeled changes (2: plans' host time; 3: short-K model;
# 4: the Triton W8A8 rate timed on a shape the Gluon kernel does not take, its speed-up apart; 5: the Gluon
# kernel takes narrow layers too (configs.ws_shape), so the Triton rate is timed below its rows; 6: the Gluon
# kernel from 256 rows, the Triton rate timed below them; 7: the block activation kernel, modeled at 0.75 of the
# copy bandwidth; 8: fp8 on the Gluon kernel (configs.WS_FP8), so the fp8 Triton rate is timed below its rows too;
# 9: host times in interleaved rounds, the weight-only path's short-K term; 10: the W4A8 plan; 11: the W4A8 GEMM
# with the weight as the register operand on 64-weight-row tiles, 1.2-2x faster from 64 rows; 12: a 128 MiB
# bandwidth copy, operands made in row chunks: a smaller transient at the first quantized call; the Gluon
# kernel's own short-K term, costs.WS_OVERHEAD_ITERS, so its speed-up is re-fitted; 13: the resident kernel's
# host time and whether the device runs it, ``DeviceCosts.resident``)
HOST_SHAPE = (1, 256, 256)  # (M, N, K) of the host-time loop: microseconds of GPU work at most


def cache_path(device: torch.device, root: Path | None = None) -> Path:
    """Where ``device``'s measured costs are cached (one file per GPU model, torch and triton version)."""
    return device_cache_file("dispatch", CACHE_VERSION, device, root)


HOST_ROUNDS = 9  # rounds of the host-time table: every path's calls once per round, in turn
HOST_CALLS = 40  # calls of one path per round


def host_table(fns: dict[str, Callable[[], object]], rounds: int = HOST_ROUNDS, n: int = HOST_CALLS,
               clock: Callable[[], float] = time.perf_counter,
               sync: Callable[[], None] = torch.cuda.synchronize) -> dict[str, float]:
    """Host µs per call of each path: the median of :func:`host_rounds`' rounds."""
    return medians(host_rounds(fns, rounds, n, clock, sync))


def medians(per: dict[str, list[float]]) -> dict[str, float]:
    """Each path's median round of :func:`host_rounds`' (the table's figure)."""
    return {p: statistics.median(v) for p, v in per.items()}


def host_rounds(fns: dict[str, Callable[[], object]], rounds: int = HOST_ROUNDS, n: int = HOST_CALLS,
                clock: Callable[[], float] = time.perf_counter,
                sync: Callable[[], None] = torch.cuda.synchronize) -> dict[str, list[float]]:
    """Host µs per call of each path in each of ``rounds`` rounds of ``n`` calls of every path in turn (the
    table takes each path's median round). Timed one path after another (200 calls each, as before), a host
    phase that changed during the table moved the paths timed in it alone: between two H200 sweeps (runs 54 and
    56) the eager pick flipped from the weight-only to the one-launch W8A8 path on SDXL rows at M = 1 / 16,
    measured 1.4-1.65x slower there."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    sync()
    per: dict[str, list[float]] = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            t = clock()
            for _ in range(n):
                fn()
            per[p].append((clock() - t) / n * 1e6)
        sync()  # the queue drained between rounds: no round waits on the one before
    return per


def rounds_note(per: dict[str, list[float]], paths: tuple[str, ...] = ("bf16", "triton")) -> str:
    """``"host rounds bf16 13.1-25.0 µs, triton 13.4-25.9 µs"``: the range of :func:`host_rounds`' rounds for
    ``paths``, kept in the table's provenance (``DeviceCosts.measured``). The same H100 kind measured F.linear's
    host time at 13.8, 16.7 and 24.4 µs in three processes (runs 120, 124, 125) where a sweep later timed ~16.6:
    the range tells a transient inside the table's rounds from a slow phase that held through all of them."""
    return "host rounds " + ", ".join(f"{p} {min(per[p]):.1f}-{max(per[p]):.1f} µs" for p in paths if per.get(p))


def _gpu_us(fn: Callable[[], object], reps: int = 10) -> float:
    """GPU time per call: ``reps`` calls captured in one CUDA graph and replayed (no host launch cost in it)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / (3 * reps)


# fp32 bytes of the master weight's rows made at a time (see _operands)
CHUNK_BYTES = 32 << 20


def _operands(m: int, n: int, k: int, dev: torch.device, keys: frozenset[str] | None = None) -> dict:
    """The timed paths' operands for an ``m x k`` by ``n x k`` product: only ``keys`` (of ``x``, ``wb``, ``q``,
    ``s``, ``qf``, ``sf``, ``p``, ``ps``; None: all). Calibration runs at a model's first quantized call, next to
    its weights, so its transient is kept small: the float32 master weight is made :data:`CHUNK_BYTES` of rows at
    a time and each chunk's copies written into the outputs (the whole fp32 weight and the quantizers' fp32
    temporaries cost ~1 GiB above the outputs at 16,384 x 8,192: run 97's first int8 SDXL round peaked 0.96 GiB
    over its later ones), the int4 codes are drawn as int8 (int64 by default), and a shape builds only what its
    paths read (the 192 x 16,384 x 8,192 shape: x, q, s, qf, sf). Timing operands: fp8 codes take the first
    chunk's scale (the values only need the weight's distribution)."""
    from comfyquant.quant.fp8 import quantize_fp8
    from comfyquant.quant.int4 import pack_int4
    from comfyquant.quant.int8 import quantize_rowwise

    def want(key: str) -> bool:
        return keys is None or key in keys

    g = torch.Generator(device=dev).manual_seed(0)
    out: dict = {"x": torch.randn(m, k, device=dev, generator=g).bfloat16()}
    if want("q") or want("s") or want("ps"):
        out["q"] = torch.empty((n, k), dtype=torch.int8, device=dev)
        out["s"] = torch.empty((n, 1), dtype=torch.float32, device=dev)
    if want("qf") or want("sf"):
        out["qf"] = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=dev)
    if want("wb"):
        out["wb"] = torch.empty((n, k), dtype=torch.bfloat16, device=dev)
    if want("p"):
        out["p"] = torch.empty((n, k // 2), dtype=torch.int8, device=dev)
    rows = max(1, CHUNK_BYTES // (4 * k))
    for i in range(0, n, rows):
        j = min(n, i + rows)
        w = torch.randn(j - i, k, device=dev, generator=g) * 0.02
        if "q" in out:
            out["q"][i:j], out["s"][i:j] = quantize_rowwise(w)
        if "qf" in out:
            if "sf" not in out:
                out["sf"] = quantize_fp8(w)[1]
            out["qf"][i:j] = (w / out["sf"]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        if "wb" in out:
            out["wb"][i:j] = w
        del w
        if "p" in out:
            out["p"][i:j] = pack_int4(torch.randint(-7, 8, (j - i, k), device=dev, generator=g, dtype=torch.int8))
    if "s" in out:
        out["ps"] = out["s"].reshape(-1)
    return {key: v for key, v in out.items() if want(key) or key == "x"}


def _keys(paths: tuple[str, ...]) -> frozenset[str]:
    """The operand keys the cost-model ``paths`` read (``bf16`` reads the bf16 weight)."""
    keys = {"wb"} if "bf16" in paths else set()
    for p in paths:
        if p in PATH_BACKENDS:
            keys.update(k for k in PATH_BACKENDS[p][2] if k is not None)
    return frozenset(keys)


# cost-model path -> (kernel kind, backend, operand keys of _operands, opts)
PATH_BACKENDS: dict[str, tuple[str, str, tuple[str, ...], tuple[int, ...]]] = {
    **{b: ("int8", b, ("q", "s"), (0,)) for b in ("triton", "triton_fused", "triton_w8a16", "dequant", "torch")},
    "resident": ("int8", "triton_resident", ("q", "s"), (0,)),
    "scaled_mm": ("fp8", "scaled_mm", ("qf", "sf", None), ()),
    "triton_fp8": ("fp8", "triton", ("qf", "sf", None), ()),
    "w4a8": ("int4_rot", "triton", ("p", "ps"), (16,)),
}


def measurable_paths(device: torch.device) -> tuple[str, ...]:
    """The cost-model paths whose backend runs on ``device`` (bf16 always): an sm_86 GPU has no fp8 matmul,
    so its calibration must not call ``_scaled_mm`` or the fp8 Triton GEMM (it would fail on the first
    quantized layer); the table's missing entries are never chosen there (the kinds check capability first)."""
    from comfyquant.runtime.kernels.registry import kernel_kind

    return ("bf16", *(p for p, (kind, b, _, _) in PATH_BACKENDS.items()
                      if kernel_kind(kind).backends[b].requires(device) is None))


def _paths(o: dict, paths: tuple[str, ...]) -> dict[str, Callable[[], object]]:
    """Each path's call, straight to its backend in the kernel table (the host cost of picking a backend is
    the same for every quantized path, so it is left out of the comparison)."""
    from comfyquant.runtime.kernels.registry import kernel_kind

    x, bf = o["x"], torch.bfloat16

    def call(kind: str, backend: str, w: torch.Tensor, scales: tuple, opts: tuple) -> Callable[[], object]:
        """The backend's eager steady state: its plan (``triton_plans``) where it has one, made after a first
        call compiled the kernels, as a bound layer runs from its second call on; else the general path."""
        b = kernel_kind(kind).backends[backend]
        general = lambda: b.impl(x, w, scales, None, opts, bf)  # noqa: E731
        if b.plan is None:
            return general
        general()
        plan = b.plan(x, w, scales, None, opts, bf, 0)
        return general if plan is None else (lambda: plan(x))

    out: dict[str, Callable[[], object]] = {"bf16": lambda: F.linear(x, o["wb"])}
    for p in paths:
        if p in PATH_BACKENDS:
            kind, backend, keys, opts = PATH_BACKENDS[p]
            out[p] = call(kind, backend, o[keys[0]], tuple(None if key is None else o[key] for key in keys[1:]),
                          opts)
    return out


class TimedCalls(NamedTuple):
    """The calibration's call of each cost-model path on one shape, and the operands those calls read."""

    calls: dict[str, Callable[[], object]]  # path -> its call (``bf16``: ``F.linear`` on the bf16 weight)
    operands: dict[str, torch.Tensor]  # ``x`` and what ``calls`` read (keys as in :func:`_operands`)


def timed_calls(shape: tuple[int, int, int], device: torch.device, paths: tuple[str, ...]) -> TimedCalls:
    """The calls :func:`measure` times for ``paths`` on ``shape`` (M, N, K), built as it builds them: one seam
    for the calibration and for probes that time the same calls (``benchmarks/probe_host_floor.py``)."""
    o = _operands(*shape, device, _keys(paths))
    return TimedCalls(_paths(o, paths), o)


def _bandwidth_gbs(dev: torch.device) -> float:
    """HBM copy bandwidth: 128 MiB copied (a 256 MiB working set, past the L2 of every GPU of today: H100 / H200
    50-60 MB, B200 126 MB; 512 MiB before cache version 12, the calibration's largest transient then)."""
    src = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _gpu_us(lambda: dst.copy_(src), reps=4) / 1e3


def measure(device: torch.device) -> DeviceCosts:
    """Time this device (needs CUDA and triton); returns the measured :class:`DeviceCosts`."""
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = _bandwidth_gbs(dev)
    paths = measurable_paths(dev)
    per = host_rounds(timed_calls(HOST_SHAPE, dev, paths).calls)
    host = medians(per)
    base = DeviceCosts(device=torch.cuda.get_device_name(dev), sms=sms, bw_gbs=bw, launch_us=2.5,
                       host_us=tuple(host.items()), tflops=DEFAULT_COSTS.tflops, resident="resident" in paths)
    rates = {}
    for shape, group in RATE_SHAPES:
        timed = tuple(p for p in group if p in paths)
        fns = timed_calls(shape, dev, timed).calls
        for p in group:
            if p in fns:
                rates[p] = fit_rate(p, *shape, _gpu_us(fns[p]), base)
        del fns
    fitted = dataclasses.replace(base, tflops=tuple(rates.items()),
                                 measured=f"calibrate.measure {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
                                          f"UTC, torch {torch.__version__}; {rounds_note(per)}")
    ws = _ws_speedup(dev, paths, fitted)
    torch.cuda.empty_cache()  # hand the transient back: ComfyUI sizes its loads from the driver's free memory
    return dataclasses.replace(fitted, ws_speedup=ws)


# (M, N, K) -> the cost-model paths whose rate is fitted there. The W8A8 paths' Triton kernels (int8, fp8) on a
# shape the Gluon kernel does not take (M < WS_MIN_M), so their rates stay the Triton kernels'; the Gluon kernel's
# speed-up is timed apart (:func:`_ws_speedup`). H200 run 51 fitted the fp8 rate at 4096^3, on the Gluon kernel
# since configs.WS_FP8: 2002 TFLOP/s, which the model then sped up by ws_speedup again.
RATE_SHAPES: tuple[tuple[tuple[int, int, int], tuple[str, ...]], ...] = (
    ((4096, 4096, 4096), ("bf16", "scaled_mm", "w4a8")),
    ((192, 16384, 8192), ("triton", "triton_fp8")),
    ((256, 8192, 8192), ("triton_fused", "triton_w8a16")))
WS_SHAPE = (4096, 4096, 4096)  # a shape the Gluon kernel takes, where the speed-up over the Triton rate is timed


def _ws_speedup(dev: torch.device, paths: tuple[str, ...], c: DeviceCosts) -> float:
    """The int8 W8A8 path's time on :data:`WS_SHAPE` as the Triton rate predicts it, over its measured time there
    (the Gluon kernel runs it on this device); 1.0 where the Gluon kernel does not run (not sm_90, older Triton)."""
    from comfyquant.runtime.kernels import triton_int8

    if "triton" not in paths or torch.cuda.get_device_capability(dev)[0] != 9 or not triton_int8.ws_available():
        return 1.0
    fns = timed_calls(WS_SHAPE, dev, ("triton",)).calls
    return ws_ratio(cm.gpu_us("triton", *WS_SHAPE, c), _gpu_us(fns["triton"]))


def ws_ratio(predicted_us: float, measured_us: float) -> float:
    """The speed-up the model applies on the Gluon kernel's shapes: predicted over measured, kept within 0.5-3
    (a timing gone wrong must not send every large layer to one path)."""
    return min(3.0, max(0.5, predicted_us / measured_us))


def fit_rate(path: str, m: int, n: int, k: int, t_us: float, base: DeviceCosts) -> float:
    """The arithmetic rate (TFLOP/s) at which the model's ``gpu_us`` of ``path`` equals the measured ``t_us``
    (bisection in log space; the model is monotone in the rate). Memory-bound results give the upper bound."""
    lo, hi = 1.0, 1e5
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if cm.gpu_us(path, m, n, k, _with_rate(base, path, mid)) > t_us:
            lo = mid
        else:
            hi = mid
    return hi


def _with_rate(c: DeviceCosts, path: str, rate: float) -> DeviceCosts:
    r = dict(c.tflops)
    r[path] = rate
    return dataclasses.replace(c, tflops=tuple(r.items()))


def load_or_measure(device: torch.device, root: Path | None = None) -> DeviceCosts:
    """The cached costs of ``device``, measuring and writing them first if there is no cache file."""
    path = cache_path(device, root)
    if path.is_file():
        return DeviceCosts.from_json(json.loads(path.read_text()))
    c = measure(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_small_file(path, json.dumps(c.to_json(), indent=1))  # renamed when complete, removed if it fails
    return c


_LOADED: dict[int, DeviceCosts] = {}  # memo of a measured hardware fact (like an lru_cache), per device index


def device_costs(device: torch.device) -> DeviceCosts:
    """This process's costs for ``device``: cached file or a fresh measurement; the built-in H200 table off CUDA
    or while a CUDA graph is being captured before anything was measured (no timing is possible then)."""
    if device.type != "cuda":
        return DEFAULT_COSTS
    index = device.index if device.index is not None else torch.cuda.current_device()
    c = _LOADED.get(index)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            return DEFAULT_COSTS
        c = _LOADED[index] = load_or_measure(torch.device("cuda", index))
    return c
