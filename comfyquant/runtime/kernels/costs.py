"""The dispatch cost model: what each linear path costs on this device, host launch overhead included.

A path's time is ``max(host, gpu)`` in eager mode (the host enqueues while the GPU runs; whichever is slower
sets the pace) and ``gpu`` alone under CUDA graphs. ``gpu`` sums, per kernel of the path, a fixed launch
latency plus the larger of its arithmetic time (FLOPs over the path's measured rate, divided by how well its
tiles fill whole waves of SMs) and its memory time (bytes over measured bandwidth). The constants are a
:class:`DeviceCosts`: measured once per device by ``calibrate.measure`` (a few seconds), cached on disk, or
passed explicitly in a ``DispatchPolicy``; ``DEFAULT_COSTS`` (measured on an H200) is used where measuring is
impossible (inside a CUDA-graph capture). Pure functions; the decision is memoized per (shape, costs, mode).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

from comfyquant.runtime.kernels.configs import (
    WS_FP8,
    WS_FP8_SPEED,
    WS_N64_SPEED,
    WS_W8A8,
    ResidentConfig,
    column_splits,
    gemm_config,
    resident_config,
    resident_per_sm,
    resident_smem,
    rows_config,
    rows_shape,
    small_m_config,
    w8a16_config,
    wave_efficiency,
    ws_config,
    ws_shape,
)

# paths the model knows: eager-host cost and GPU kernels of each
PATHS = ("bf16", "triton", "triton_fp8", "triton_fused", "triton_w8a16", "dequant", "scaled_mm", "w4a8", "torch",
         "resident")
# a path missing from a table (measured before the path existed) takes its sibling's constants: the fp8 W8A8
# Triton GEMM is the int8 one's kernel and launch sequence on fp8 codes; the resident kernel's plan is one
# prepared launch, as the one-launch W8A8 kernel's
_SIBLING = {"triton_fp8": "triton", "resident": "triton_fused"}


@dataclass(frozen=True)
class DeviceCosts:
    """Measured constants of one device (µs, GB/s, TFLOP/s); ``host_us`` / ``tflops`` are (path, value) pairs;
    ``ws_speedup``: how much faster the int8 W8A8 GEMM runs on the shapes that take the warp-specialized Gluon
    kernel (``configs.hopper_w8a8_config``) than the Triton kernel's rate says (1.0 where it does not run);
    ``resident``: the device runs the resident one-launch kernel (sm_90 with Gluon), so the model prices it."""

    device: str
    sms: int
    bw_gbs: float
    launch_us: float
    host_us: tuple[tuple[str, float], ...]
    tflops: tuple[tuple[str, float], ...]
    measured: str = ""
    ws_speedup: float = 1.0
    resident: bool = False
    _host: dict = field(default=None, compare=False, hash=False, repr=False)
    _rate: dict = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        # sorted pairs: equal tables compare (and hash) equal whatever order they were given in
        object.__setattr__(self, "host_us", tuple(sorted((str(a), float(b)) for a, b in self.host_us)))
        object.__setattr__(self, "tflops", tuple(sorted((str(a), float(b)) for a, b in self.tflops)))
        object.__setattr__(self, "_host", dict(self.host_us))
        object.__setattr__(self, "_rate", dict(self.tflops))

    def host(self, path: str) -> float:
        if path not in self._host and path in _SIBLING:
            path = _SIBLING[path]
        return self._host.get(path, max(self._host.values(), default=50.0))

    def rate(self, path: str) -> float:
        if path not in self._rate and path in _SIBLING:
            path = _SIBLING[path]
        return self._rate.get(path, 100.0)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_host")
        d.pop("_rate")
        d["host_us"], d["tflops"] = dict(self.host_us), dict(self.tflops)
        return d

    @classmethod
    def from_json(cls, d: dict) -> DeviceCosts:
        return cls(device=d["device"], sms=int(d["sms"]), bw_gbs=float(d["bw_gbs"]),
                   launch_us=float(d["launch_us"]), host_us=tuple(d["host_us"].items()),
                   tflops=tuple(d["tflops"].items()), measured=d.get("measured", ""),
                   ws_speedup=float(d.get("ws_speedup", 1.0)), resident=bool(d.get("resident", False)))


# Measured on an NVIDIA H200 (torch 2.11+cu130, triton 3.6) by calibrate.measure, 2026-12-01 (run 3 of
# benchmarks/gpu_session.py; benchmarks/results/costs_run3_h200_2026-12-01.json). Used where measuring is
# impossible (a capture before anything was measured, off CUDA) and by the CPU tests.
DEFAULT_COSTS = DeviceCosts(
    device="NVIDIA H200 (default table)", sms=132, bw_gbs=4179.0, launch_us=2.5,
    host_us=(("bf16", 22.0), ("dequant", 76.0), ("scaled_mm", 134.0), ("torch", 370.0), ("triton", 90.0), ("triton_fused", 57.0), ("triton_w8a16", 52.0), ("w4a8", 116.0)),
    # rates re-fitted to the short-K / fused-prologue model (same measured times at the fit shapes; the weight-only
    # one again for its own short-K term, W8A16_OVERHEAD_ITERS)
    tflops=(("bf16", 819.0), ("scaled_mm", 1351.0), ("triton", 1546.0), ("triton_fused", 212.0), ("triton_w8a16", 367.0), ("w4a8", 487.0)),
    measured="calibrate.measure on an H200, 2026-12-01; replaced by this device's own measurement on first use",
    # the Gluon GEMM over the Triton one on its shapes, H200 run 23 (benchmarks/results/gemm_ws_run23_*): the
    # geometric mean of the Triton kernel's time over the picked Gluon tile's at M >= 1024, 1 / 0.80; times
    # 0.9 since the Gluon kernel's own short-K term (WS_OVERHEAD_ITERS), the same prediction at K = 4,096
    ws_speedup=1.25 * 0.9, resident=True)


def _kernel(flops: float, nbytes: float, rate: float, eff: float, c: DeviceCosts) -> float:
    compute = flops / (rate * 1e6 * max(eff, 1e-3))
    return c.launch_us + max(compute, nbytes / (c.bw_gbs * 1e3))


def _bf16_gemm(m: int, n: int, k: int, c: DeviceCosts) -> float:
    cfg = gemm_config(m, n, k, c.sms) if m >= 64 else small_m_config(m, n, k, c.sms)
    eff = wave_efficiency(m, n, cfg.block_m, cfg.block_n, c.sms)
    return _kernel(2.0 * m * n * k, 2.0 * (m * k + n * k + m * n), c.rate("bf16"), eff, c)


# The unrotated activation pass (the block kernel) moves its bytes at ~0.75 of the copy bandwidth beside its
# launch (H200, run 35, ``bench_act_quant.py``: 0.71-0.88 at M >= 1024); the rotating kernels at about half
# (run 10's rotation section: median 0.48 unrotated on the older kernels, 0.18 with convrot 256, i.e. 2.6x
# the unrotated time again).
QUANT_BW_FRACTION = 0.75
ROTATION_BW_FRACTION = 0.5


def _quant_kernel(m: int, k: int, c: DeviceCosts, group: int) -> float:
    if not group:
        return c.launch_us + 3.0 * m * k / (QUANT_BW_FRACTION * c.bw_gbs * 1e3)
    slow = 1.0 + 0.4 * math.log(group, 4)  # radix-4 rotation stages cost bandwidth
    return c.launch_us + 3.0 * m * k * slow / (ROTATION_BW_FRACTION * c.bw_gbs * 1e3)


# Fitted on the H200 per-layer sweeps of 2026-12-02 (runs 6, 7: benchmarks/results/sweep_run{6,7}_*), where the
# model's pick was up to 3.7x slower than the best backend of the same layer:
# - our Triton GEMMs pay a fixed per-tile cost (pipeline fill, epilogue) worth ~8 iterations of their K loop,
#   so short K loops run far below the rate measured at K = 4096 (K = 1280: 1.6-1.8x the plain model);
# - the fused W8A8 kernel computes each row's absmax over the whole of K before its GEMM loop, in every N tile:
#   a serial prologue of ~5.5 ns per K element (M <= 16: fused - W8A16 = 16 µs at K = 3072, 80 at 15360);
# - its 16-row tiles (M <= 16) twice that: on the GPU times of the H200 sweeps since they were recorded (runs
#   58-72, 228 rows at M = 1 / 16, CUDA-graph replays) their prologue took 10.8-11.1 ns per K element on every
#   run, and the 5.5 ns model put the kernel 1.3-1.9x under its time, so it won eager ties it loses on the GPU
#   (run 72: SDXL ff0 at M = 1 / 16 ran it at 0.64x bf16 where the weight-only kernel ran 1.18x). The 64-row tiles
#   keep 5.5 ns: the rate ``calibrate`` fits for the path is timed on them (M = 256), with this term subtracted.
TILE_OVERHEAD_ITERS = 8.0
# The warp-specialized Gluon kernel's per-tile cost in K steps (its epilogue's TMA store overlaps the next tile's
# main loop; the Triton kernel's runs after its own): fitted to the GEMM alone on 20 SDXL / CLIP / T5 shapes at
# 1,024-16,384 rows and K 640-10,240 (H100 run 94, gemm_ws_narrow_graph, 128 x 128 tiles): geometric-mean error of
# the model 1.109 with the Triton kernel's 8, 1.004 with 4 (rms of the log error 0.139 -> 0.060). Replayed on every
# recorded sweep with its own table (ws_speedup rescaled as a re-calibration at K = 4,096 would): the H200 sweeps'
# picks unchanged (runs 57-83), the H100's regret 1.0091 -> 1.0076, worst 1.19 -> 1.14 (CLIP fc1 at 16,384 rows:
# the W8A8 path, 1.11x bf16, in place of dequantize + cuBLAS, 0.93x).
WS_OVERHEAD_ITERS = 4.0
FUSED_PROLOGUE_US_PER_K = 5.5e-3
FUSED_PROLOGUE_THIN_US_PER_K = 1.09e-2
# The row-block one-launch kernel (``configs.rows_shape``): its quantization at the activation pass's bandwidth,
# a row block's wait, then the Triton GEMM's model on pointer loads (cp.async rather than TMA), at least a
# latency per K step and wave (of the programs an SM holds at once: shared memory allows 2-3). Fitted to H200 run
# 45 (``bench_fused_rows.py``, GPU time of the picked tile, 36 rows of 9 SDXL / CLIP / Flux / T5 shapes at M
# 64-4096): geometric-mean error 7%, within 15% on every row up to 1,024 rows but CLIP fc1 at 1,024 (+27%).
ROWS_SPEED = 0.96  # of the Triton rate (fitted as 1.2 times the 0.8 the W8A8 model gives tiles under 128x256)
ROWS_SYNC_US = 4.0
ROWS_STEP_US = 0.5
ROWS_SMEM = 228 * 1024  # shared memory per SM (H100 / H200) for the residency estimate


def _short_k(k: int, block_k: int, overhead: float = TILE_OVERHEAD_ITERS) -> float:
    """Fraction of a Triton GEMM tile's time spent in its K loop (see ``TILE_OVERHEAD_ITERS``)."""
    iters = max(1.0, k / block_k)
    return iters / (iters + overhead)


# The weight-only kernel's per-tile cost in K steps: its model (rate fitted at K = 8,192) ran 1.12-1.33x under
# the measured time of every SDXL / CLIP layer with K <= 1,280 at M >= 1,024 (H200 run 54's sweep), and picked it
# at 4,096 rows of SDXL attn 640 / CLIP attn (measured 0.62 / 0.59x bf16, the one-launch W8A8 path 0.81 / 0.84x).
# Replayed on the recorded sweeps with each day's table, the picks' geometric-mean regret moves by 0.2 points at
# most on runs 9-54 (run 8, older kernels: +0.9) with 2 (1 - 3 tried); the mispicks above go.
W8A16_OVERHEAD_ITERS = 2.0


def gluon_path(path: str, m: int, n: int, k: int, sms: int) -> bool:
    """Whether the cost model's ``path`` runs on the warp-specialized Gluon GEMM for ``[m, k] x [k, n]``: the
    W8A8 GEMMs (int8, and fp8 with ``configs.WS_FP8``) on the shapes ``configs.ws_shape`` gives it."""
    return (path == "triton" or (path == "triton_fp8" and WS_FP8)) and ws_shape(m, n, k, sms)


def gluon_gemm_us(m: int, n: int, k: int, c: DeviceCosts, fp8: bool = False) -> float:
    """Modeled GPU time of the warp-specialized Gluon W8A8 GEMM alone (no activation pass) on ``[m, k] x [k, n]``:
    the int8 Triton rate times ``c.ws_speedup`` (fp8 operands: times :data:`WS_FP8_SPEED`), its tile's wave fill
    and its own short-K term (:data:`WS_OVERHEAD_ITERS`)."""
    cfg = ws_config(m, n, c.sms)
    speed = c.ws_speedup * (1.0 if cfg == WS_W8A8 else WS_N64_SPEED) * (WS_FP8_SPEED if fp8 else 1.0)
    eff = (wave_efficiency(m, n, cfg.block_m, cfg.block_n, c.sms) * speed
           * _short_k(k, cfg.block_k, WS_OVERHEAD_ITERS))
    return _kernel(2.0 * m * n * k, m * k + n * k + 2.0 * m * n, c.rate("triton"), eff, c)


# The resident one-launch kernel (``gluon_resident``, :func:`configs.resident_config`'s launch): fitted to its GPU
# time on an H100 (run 149, ``bench_resident.py``: 127 configurations of SDXL attn 640, CLIP attn and fc1 at
# 1,024-16,384 rows, CUDA-graph replay; geometric-mean error 1.10, worst 1.34; the run's six default launches
# within 6%). A program quantizes its block (both reads of x), then runs its column tiles, each K step waiting on
# a weight tile from L2 through the ring (the wait shrinks with the ring's depth), then its epilogue; programs
# sharing an SM slow each other (``ResidentModel.share``). Priced up to RESIDENT_PRICED_MAX_K: at K = 1,280 the
# kernel ran 0.58-0.94x bf16 eager in every launch timed (the default paths 0.82-1.15x), and at 3,072 0.22-0.41x,
# 1.9-2.3x this model's time, whose terms do not cover a program streaming the whole weight from L2 at 64 rows a
# pass.
@dataclass(frozen=True)
class ResidentModel:
    """The resident kernel's GPU-time constants (:func:`resident_us`): ``launch_us`` a launch; ``quant_ns`` per
    element of a row block's quantization; ``step_us`` a 64 x 128 x 128 K step, times ``1 + ring / stages`` for
    its wait on the ring; ``tile_ns`` per output element of a tile's epilogue; ``share`` the slowdown of each
    further program on an SM. ``benchmarks/fit_costs.py`` fits them to a ``bench_resident.py`` run."""

    launch_us: float = 4.4
    quant_ns: float = 0.066
    step_us: float = 0.375
    ring: float = 1.2
    tile_ns: float = 0.016
    share: float = 0.41


RESIDENT_MODEL = ResidentModel()  # fitted to H100 run 149 (above)
RESIDENT_PRICED_MAX_K = 768


def resident_us(m: int, n: int, k: int, c: DeviceCosts, cfg: ResidentConfig | None = None,
                model: ResidentModel = RESIDENT_MODEL) -> float:
    """Modeled GPU time of the resident kernel on ``[m, k] x [k, n]`` in launch ``cfg`` (default: the one
    ``configs.resident_config`` picks) with ``model``'s constants; inf where the model does not price it: a device
    that does not run it, K over :data:`RESIDENT_PRICED_MAX_K`, a shape it does not take."""
    if not c.resident or k > RESIDENT_PRICED_MAX_K:
        return math.inf
    cfg = cfg or resident_config(m, n, k, c.sms)
    if cfg is None:
        return math.inf
    tiles = math.ceil(n / cfg.block_n)
    per = math.ceil(tiles / cfg.splits)
    programs = math.ceil(m / cfg.block_m) * column_splits(tiles, cfg.splits)
    per_sm = resident_per_sm(resident_smem(cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, k))
    waves = math.ceil(programs / (c.sms * per_sm))
    sharing = min(per_sm, math.ceil(programs / c.sms))
    step = model.step_us * cfg.block_n / 128 * (cfg.block_m / 64) ** 0.5 * (1 + model.ring / cfg.stages)
    program = (model.quant_ns * cfg.block_m * k
               + per * (math.ceil(k / cfg.block_k) * step * 1e3 + model.tile_ns * cfg.block_m * cfg.block_n)) / 1e3
    return model.launch_us + waves * program * (1 + model.share * (sharing - 1))


def gpu_us(path: str, m: int, n: int, k: int, c: DeviceCosts, group: int = 0) -> float:
    """Modeled GPU time of one call of ``path`` for ``[m, k] @ [k, n]``; inf for a path the model can't run."""
    if m <= 0:
        return 0.0
    flops = 2.0 * m * n * k
    out_b = 2.0 * m * n
    if path == "bf16":
        return _bf16_gemm(m, n, k, c)
    if path in ("triton", "triton_fp8", "w4a8", "scaled_mm"):
        if gluon_path(path, m, n, k, c.sms):  # the Gluon kernel's shapes: its own tiles and short-K term
            return _quant_kernel(m, k, c, group) + gluon_gemm_us(m, n, k, c, fp8=path == "triton_fp8")
        wbytes = n * k * (0.5 if path == "w4a8" else 1.0)
        if m < 64:
            cfg = small_m_config(m, n, k, c.sms)
            speed = 0.35
        else:
            cfg = gemm_config(m, n, k, c.sms)
            speed = 1.0 if cfg.block_m * cfg.block_n >= 128 * 256 else 0.8
        eff = wave_efficiency(m, n, cfg.block_m, cfg.block_n, c.sms) * speed
        if path != "scaled_mm":  # cuBLAS does not show the short-K loss of our tiles
            eff *= _short_k(k, cfg.block_k)
        return _quant_kernel(m, k, c, group) + _kernel(flops, m * k + wbytes + out_b, c.rate(path), eff, c)
    if path == "triton_fused":
        if group:
            return math.inf
        if rows_shape(m, n, k, None, c.sms):  # the row-block kernel: the activation pass and the GEMM in one launch
            cfg = rows_config(m, n)
            eff = wave_efficiency(m, n, cfg.block_m, cfg.block_n, c.sms) * ROWS_SPEED * _short_k(k, cfg.block_k)
            quant = 3.0 * m * k / (QUANT_BW_FRACTION * c.bw_gbs * 1e3)
            resident = max(1, min(4, ROWS_SMEM // (cfg.stages * cfg.block_k * (cfg.block_m + cfg.block_n))))
            waves = math.ceil(math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n) / (c.sms * resident))
            loop = waves * math.ceil(k / cfg.block_k) * ROWS_STEP_US
            return ROWS_SYNC_US + quant + max(_kernel(flops, m * k + n * k + out_b, c.rate("triton"), eff, c), loop)
        cfg = small_m_config(m, n, k, c.sms)
        eff = wave_efficiency(m, n, cfg.block_m, cfg.block_n, c.sms)
        prologue = FUSED_PROLOGUE_THIN_US_PER_K if cfg.block_m <= 16 else FUSED_PROLOGUE_US_PER_K
        return k * prologue + _kernel(flops, 2.0 * m * k + n * k + out_b, c.rate(path), eff, c)
    if path == "triton_w8a16":
        cfg = w8a16_config(m, n, k, c.sms)
        m_tiles = math.ceil(m / cfg.block_m)
        eff = wave_efficiency(m, n * cfg.split_k, cfg.block_m, cfg.block_n, c.sms)  # K slices: more programs
        extra = _quant_kernel(m, k, c, group) if group else 0.0  # the rotation pass
        eff *= _short_k(k / cfg.split_k, cfg.block_k, W8A16_OVERHEAD_ITERS)
        reads = n * k * (1.0 + 0.25 * (m_tiles - 1))  # later M tiles mostly hit L2
        return extra + _kernel(flops, 2.0 * m * k + reads + out_b, c.rate(path), eff, c)
    if path == "dequant":
        extra = _quant_kernel(m, k, c, group) if group else 0.0
        return extra + c.launch_us + 3.0 * n * k / (c.bw_gbs * 1e3) + _bf16_gemm(m, n, k, c)
    if path == "resident":
        return math.inf if group else resident_us(m, n, k, c)
    if path == "torch":
        return 4 * c.launch_us + flops / (c.rate("torch") * 1e6) + 12.0 * m * k / (c.bw_gbs * 1e3)
    return math.inf


def low_rank_us(m: int, n: int, k: int, rank: int, c: DeviceCosts, fused: bool) -> float:
    """Modeled GPU time a rank-``rank`` low-rank term (dynamic LoRAs) adds to a call: ``h = x @ down^T`` (one
    small cuBLAS GEMM that reads x) either way, then ``h @ up`` in the GEMM's epilogue (``fused``: its FLOPs at
    a quarter of the bf16 rate: unpipelined 16-wide dots per tile) or ``dispatch.add_low_rank``'s addmm, which
    reads and rewrites the whole output: modeled as 12 bytes per output element, fitted to the H200's
    measured unfused cost at M=4096 (run 6, graph replay: Flux qkv +114 µs, mlp0 +146 µs, proj +41 µs; two
    bare passes would be 36 / 48 / 12 µs: cuBLAS runs the K=r addmm far below bandwidth)."""
    if m <= 0 or rank <= 0:
        return 0.0
    h = _kernel(2.0 * m * k * rank, 2.0 * (m * k + rank * k + m * rank), c.rate("bf16"), 1.0, c)
    if fused:
        return h + 2.0 * m * n * rank / (0.25 * c.rate("bf16") * 1e6)
    return h + _kernel(2.0 * m * n * rank, 12.0 * m * n + 2.0 * (m * rank + rank * n), c.rate("bf16"), 1.0, c)


def path_us(path: str, m: int, n: int, k: int, c: DeviceCosts, mode: str, group: int = 0, rank: int = 0,
            fused: bool = False) -> float:
    """Modeled wall time per call: ``max(host, gpu)`` in eager mode, ``gpu`` under CUDA graphs; ``rank`` > 0:
    with a low-rank term, ``fused`` in the path's epilogue or added after (two more torch calls' host time)."""
    g = gpu_us(path, m, n, k, c, group) + low_rank_us(m, n, k, rank, c, fused)
    host = c.host(path) + (0 if not rank else (1 if fused else 2) * c.host("bf16"))
    if group and path in ROTATES_APART:
        host += rotation_launch_host(c)
    if mode == "graph":
        return g
    return host + g if path in SERIAL_EAGER else max(host, g)


# Paths that rotate a convrot layer's input in a launch of its own before their GEMM (the W8A8 paths rotate in
# their activation pass): their plan fires the rotation pass, then the unrotated path's launches.
ROTATES_APART = frozenset({"triton_w8a16", "dequant"})


def rotation_launch_host(c: DeviceCosts) -> float:
    """Host time of one more prepared launch: the two-launch W8A8 plan's over the one-launch weight-only plan's
    (both measured; 6.8-7.7 µs on the H200's host, runs 57-60). Without the rotated plans (before 2026-12-04)
    these paths ran the general path: 80-220 µs a call where the model said 13 (H200 run 59)."""
    return max(c.launch_us, c.host("triton") - c.host("triton_w8a16"))


# Paths whose eager wall time is host + GPU rather than the larger of the two: dequantize + cuBLAS ran 10-22 µs
# over ``max(host, gpu)`` on every SDXL / CLIP row the model gave it (H200 sweep of run 36: CLIP fc1 at M = 4096
# 53 µs against 31 modeled, the W8A8 path beside it 31 µs as modeled) and never beat W8A8 by 5% in runs 33-36.
SERIAL_EAGER = frozenset({"dequant"})


# Eager near-ties: paths modeled within this fraction of the cheapest are told apart by their GPU time, the
# lower first. Where host time sets the pace for two paths (both ~16 µs of host a call on the H200's), the model's
# max(host, gpu) calls them equal, but back-to-back calls overlap host and GPU only in part, so the one with more
# GPU slack runs ahead. Replayed on the recorded H200 sweeps with each day's measured table (runs 45, 51, 53, 54;
# the weight-only short-K term in): geometric-mean regret against the fastest measured path 1.019 / 1.016 / 1.025
# / 1.017 -> 1.016 / 1.008 / 1.010 / 1.013, rows over 1.15x 20 -> 11; runs 8, 9, 33, 36 unchanged or better
# (tests/test_dispatch_costs.py).
NEAR_TIE = 0.03


@functools.lru_cache(maxsize=4096)
def decide(candidates: tuple[str, ...], m: int, n: int, k: int, c: DeviceCosts, mode: str,
           group: int = 0, rank: int = 0, fusing: tuple[str, ...] = ()) -> tuple[str, str]:
    """(cheapest candidate, reason) by the model; memoized (ComfyUI reuses a handful of shapes per run).
    ``rank`` > 0: the calls add a low-rank term, which the ``fusing`` paths add in their epilogue. Candidates
    within :data:`NEAR_TIE` of the cheapest go to the one with the least GPU time."""
    times = sorted((path_us(p, m, n, k, c, mode, group, rank, p in fusing), p) for p in candidates)
    t, best = times[0]
    near = [p for u, p in times if u <= t * (1.0 + NEAR_TIE)]
    tie = ""
    if len(near) > 1:
        gpu = {p: path_us(p, m, n, k, c, "graph", group, rank, p in fusing) for p in near}
        pick = min(near, key=lambda p: gpu[p])  # stable: the cheaper eager time among equal GPU times
        if pick != best:
            tie = f" (within {NEAR_TIE:.0%} of {best}: less GPU time, {gpu[pick]:.0f} vs {gpu[best]:.0f} µs)"
            best, t = pick, next(u for u, p in times if p == pick)
    others = ", ".join(f"{p} {u:.0f}" for u, p in [x for x in times if x[1] != best][:2])
    bf16 = path_us("bf16", m, n, k, c, mode, 0, rank)
    lr = f", rank-{rank} low-rank term" if rank else ""
    return best, f"cost model ({mode}, M={m}{lr}): {best} {t:.0f} µs{tie} vs bf16 {bf16:.0f} µs; next: {others}"
