"""Deterministic tile configurations for the Triton GEMMs: a pure function of (M, N, K, SM count), no autotuning.

Run-time autotuning picked its config from one noisy timing per candidate, so the same model could get a
different (sometimes 2x slower) tile shape from one process to the next; that is what made the Flux block's
speed swing between runs (docs/KERNEL_NOTES.md). Here each candidate tile is scored by how well its tiles fill
whole waves of the GPU (tile padding at the M/N edges and the last partial wave both count as idle SMs),
weighted by the measured relative throughput of that tile shape, and the best score wins (ties: list order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration; ``persistent`` (the Hopper W8A8 GEMM): 0 one program per tile, 1 one program
    per SM walking the tiles, 2 the same with the tile and K loops flattened into one pipeline, 3 the warp-
    specialized Gluon kernel (``gluon_gemm``: ``warps`` is its default partition's, one consumer warp group)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8
    persistent: int = 0
    split_k: int = 1  # the weight-only kernel: K cut into this many slices, one program each (see w8a16_config)


HOPPER_SMEM = 232448  # shared memory a block may take on sm_90 / sm_100 (227 KB, opt-in)
SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program there; the rest for layout conversions
SMEM_RESERVE = HOPPER_SMEM - SMEM_BUDGET
# Shared memory a block may take (opt-in) by compute capability where the driver is not asked (the CPU checks of
# ``tests/test_kernel_targets.py``): A100 163 KB; RTX 30 / 40 / 50 series (sm_86 / 89 / 120) 99 KB.
SMEM_BY_CC = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): HOPPER_SMEM,
              (10, 0): HOPPER_SMEM, (12, 0): 101376}
# Compute-capability majors whose Triton (3.6) pipelines keep stages - 1 tiles in shared memory (cp.async: the
# offline compiles of the W8A8, weight-only and one-launch kernels for sm_80 / 86 / 89 / 120 measured 2 / 3
# tiles at 3 / 4 stages); on sm_90 every stage's tiles are resident.
ASYNC_COPY_MAJORS = (8, 12)


# Large tiles for wgmma-class GEMMs; ``speed``: throughput of a full tile relative to 256x128 (H200, int8).
# Fitted on the H200 tune section of 2026-12-02 (run 9, GEMM alone under CUDA graphs, 10 tiles x 19 shapes of
# Flux / Wan / SDXL at M 256-16384; benchmarks/results/tune_run9_*): the median over shapes of each tile's
# time x wave efficiency against 256x128's. The 128x128 / 8-warp tile (0.85 before) measured 0.81, 4 warps
# 0.83; 64x128 measured 0.83 (0.7 before: it lost the 1280-wide SDXL shapes and Flux at M 256-1024, up to 1.36x
# slower than the best tile). Picked tile over the fastest: geometric mean 1.062 -> 1.004, worst 1.36 -> 1.05.
# Devices with less shared memory than HOPPER_SMEM (A100, RTX 30 / 40 / 50 series) take _AMPERE's.
_BIG = ((TileConfig(256, 128, 128, 8, 4), 1.0), (TileConfig(128, 256, 128, 8, 3), 1.0),
        (TileConfig(64, 128, 128, 4, 4), 0.83), (TileConfig(128, 128, 128, 4, 4), 0.83),
        (TileConfig(64, 256, 128, 4, 4), 0.82), (TileConfig(128, 64, 128, 4, 4), 0.76),
        (TileConfig(64, 64, 128, 4, 4), 0.5))
_AMPERE = ((TileConfig(128, 256, 64, 8, 3), 1.0), (TileConfig(256, 128, 64, 8, 3), 1.0),
           (TileConfig(128, 128, 64, 4, 4), 0.85), (TileConfig(64, 128, 64, 4, 4), 0.7),
           (TileConfig(128, 64, 64, 4, 4), 0.62), (TileConfig(64, 64, 64, 4, 4), 0.5))


# Where the table picks a full-size tile on Hopper, the int8 W8A8 GEMM runs this one on a persistent grid with
# flattened loops instead (H200, 2026-12-02, run 12's persist section, benchmarks/results/persist_run12_*: the
# GEMM alone on 9 Flux / Wan shapes at M 1024-16384, 5 tiles x 3 grid modes). Against the table's 256x128 tile
# timed in the same row: geometric mean 0.968 of its time (0.87-1.04) on the 21 rows where the table picks it.
# Flattened persistent loops beat the same tile on one program per tile in 22/27 rows (geometric mean 0.971).
# Read with the section's noise: one tile timed twice in a row differed by up to 24% (the first timing of a row).
PERSISTENT_W8A8 = TileConfig(128, 256, 128, 8, 3, 8, persistent=2)


# The warp-specialized Gluon GEMM (one producer warp, two consumer warp groups, TMA-store epilogue): GEMM alone
# on 9 Flux / Wan 14B shapes (H200, 2026-12-03, benchmarks/bench_gemm_ws.py, L2 cleared, median), bit-equal to the
# Triton kernels: 1.72-1.86x bf16 at M = 4608 and 1.78-2.00x at 16384 where today's Triton kernel ran 1.26-1.54x
# and 1.47-1.76x (cuBLAS fp8 1.50-1.84x / 1.57-2.04x); 128x128 with 5 stages was within 5% of the best of three
# tiles on all but 4 of 27 rows. At M = 1024 1.26-1.92x on all shapes but the 3072-wide proj (host-bound there).
WS_W8A8 = TileConfig(128, 128, 128, 4, 5, 8, persistent=3)
# 64-wide column tiles where 128x128 ones leave whole SMs idle below 1,024 rows (H200, 2026-12-03, run 31's
# gemm_ws_small_m sections, GPU time of CUDA-graph replays on 13 Flux / Wan / T5 / SDXL shapes x M 256-512,
# benchmarks/results/gemm_ws_small_m*_run31_*): at M = 256 128x64 with 8 stages beat 128x128 on every row with
# 48-64 or 144-192 tiles of 128x128 (Flux proj 1.29 vs 0.87x bf16, mlp2 1.93 vs 1.14x, T5 ffn2 2.31 vs 1.50x)
# and lost on the rows where both fill the same waves (Wan attn 80 tiles: 1.37 vs 1.61x).
WS_W8A8_N64 = TileConfig(128, 64, 128, 4, 8, 8, persistent=3)
WS_N64_SPEED = 0.9  # a 128x64 tile's throughput relative to 128x128 at equal wave fill (ties go to 128x128)
WS_MIN_M = 256  # rows from which the warp-specialized kernel runs (run 31: faster than the Triton kernel from 256;
# below, one 128-row tile is mostly padding and the weight-only / thin-M kernels take the layers)
# ... and output tiles (of its 128x128): narrower layers too (run 29, GPU time of CUDA-graph replays on 7 SDXL /
# CLIP / T5 shapes x M 1024-16384, benchmarks/results/gemm_ws_narrow_graph_run29_*): the Gluon kernel beat the
# Triton one on every row from 64 tiles on (SDXL ff2 M = 4096: 1.83 vs 1.43x bf16; attn 1280 M = 4096: 1.28 vs
# 1.11x; CLIP mlp2 M = 4096: 1.43 vs 1.26x) but at 1-2 tiles per SM it lost (SDXL attn 640 M = 1024, 40 tiles:
# 0.80 vs 0.99x; CLIP mlp2 M = 1024, 48 tiles: 0.88 vs 0.97x). Run 27's do_bench figures of these shapes timed
# the benchmark launcher's host time, not the kernel. Below 1,024 rows the count is of the picked tile's.
WS_MIN_TILES = 64
WS_MIN_K = 640  # the shortest K timed (SDXL attn 640); shorter layers (Flux img_in, K = 64) keep the Triton kernel
# A LoRA's low-rank term added in the Gluon kernel's epilogue (``h @ up``, R <= 64, 16-bit): LoRA'd layers keep
# the Gluon kernel's speed instead of falling back to the Triton GEMM with its own fused term.
WS_LOW_RANK = True
# fp8 operands (e4m3 / e5m2) on the Gluon kernel: each K step's wgmma sums promoted into float32 by the kernel
# itself once waited for, K steps in pairs, warp group 1 a step ahead (``gluon_gemm._mainloop_promoted``); the
# compiler's own promotion read sums still in flight and ptxas serialized every wgmma (run 27: 1.14-1.35x bf16,
# so fp8 layers stayed on cuBLAS ``_scaled_mm``). H200 run 52 (GEMM alone, 18 Flux / Wan rows at M 4096 /
# 16384, do_bench, same run): geometric mean 1.77x bf16 against cuBLAS fp8's 1.76x and the int8 kernel's 1.82x;
# pairs without the lead 1.69x. ``WS_FP8_SPEED``: its throughput relative to the int8 kernel's on the same tile
# (run 52: 0.97), for the cost model (``costs.gpu_us``'s ``triton_fp8`` path on the Gluon kernel's shapes).
WS_FP8 = True
WS_FP8_SPEED = 0.97


def ws_config(m: int, n: int, sms: int) -> TileConfig:
    """The Gluon kernel's tile for ``m`` rows and ``n`` columns: :data:`WS_W8A8`, or below 1,024 rows and two
    waves of it :data:`WS_W8A8_N64` where its waves are fuller by more than its lower per-tile speed."""
    if m < 1024 and cdiv(m, 128) * cdiv(n, 128) < 2 * sms:
        if wave_efficiency(m, n, 128, 64, sms) * WS_N64_SPEED > wave_efficiency(m, n, 128, 128, sms):
            return WS_W8A8_N64
    return WS_W8A8


def ws_shape(m: int, n: int, k: int, sms: int) -> bool:
    """Whether an ``[m, k] x [k, n]`` W8A8 GEMM is one the Gluon kernel takes on an sm_90 GPU of ``sms``
    multiprocessors: :data:`WS_MIN_M` rows, :data:`WS_MIN_K` columns and :data:`WS_MIN_TILES` tiles of
    :func:`ws_config`'s pick (of 128x128 from 1,024 rows)."""
    if m < WS_MIN_M or k < WS_MIN_K:
        return False
    cfg = ws_config(m, n, sms)
    return cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) >= WS_MIN_TILES


def hopper_w8a8_config(cfg: TileConfig, m: int = 0, major: int = 9, n: int = 0, k: int = 0,
                       persistent: bool = True, sms: int = 132) -> TileConfig:
    """``gemm_config``'s pick for the Hopper W8A8 GEMM: :func:`ws_config`'s Gluon tile on sm_90 (its wgmma code
    is Hopper's own) on the shapes :func:`ws_shape` gives it, else (with ``persistent``: a call the persistent
    Triton kernel takes) :data:`PERSISTENT_W8A8` in place of a full-size tile."""
    if major == 9 and ws_shape(m, n, k, sms):
        return ws_config(m, n, sms)
    return PERSISTENT_W8A8 if persistent and cfg.block_m * cfg.block_n >= 128 * 256 else cfg


# The one-launch W8A8 path from 64 rows (``triton_gemm.fused_rows``): a row block's first programs quantize its
# rows between them and wait for each other, the block's other programs wait for them, then all multiply. The
# quantizing ones must be resident together: a launch holds at most ``ROWS_MAX_COL_TILES - 1`` of them waiting,
# so four launches on four streams at once still leave SMs free on an H200's 132; a GPU with fewer SMs takes at
# most a quarter of them (:func:`rows_quant_programs`: an RTX 4060's 24 would otherwise wait forever for programs
# of a 32-tile row block that cannot start).
ROWS_MIN_M = 64
ROWS_MAX_COL_TILES = 32
# Layers wider than ``ROWS_MAX_COL_TILES`` column tiles (``rows_shape``'s ``wide``): the programs past the
# quantizing ones wait only on lower tickets, so any width is safe (H100 run 127: bit-equal to two launches, four
# streams at once). Built for the eager floor rows where two launches' host time loses to bf16 on GPU time that
# ties (SDXL ff0 1,280 -> 10,240 at 256 rows: 0.85x, H100 run 125), but slower than two launches on every wide
# layer timed but SDXL's 640 -> 5,120 at 256 rows, a size no model runs (run 127, ``bench_fused_rows.py --wide``:
# SDXL ff0 at 256 rows 24.0 against 17.4 µs eager, 1.3-1.7x from 1,024 rows; the row-block GEMM's GPU time exceeds
# the second launch's host time): off.
ROWS_WIDE = False
ROWS_STREAMS = 4
H200_SMS = 132
ROWS_MAX_ROW_BLOCKS = 8191  # a counter each (the split-K workspace's 8,192, one for the tickets)


# Its GEMM tiles (H200 run 44, ``bench_fused_rows.py``: GPU time of CUDA-graph replays, 9 SDXL / CLIP / Flux /
# T5 shapes x M 256-4096, 2-5 tiles each): 64x64 from 256 to 1,024 rows where the layer is <= 2,048 wide (the best
# tile on all 10 such rows, up to 1.4x faster than 64x128: more programs share the row block's quantization), 64x128
# below 1,024 rows on wider layers, 128x128 on 8 warps from 1,024 rows (the best on all 13 rows there, up to
# 1.7x faster than the wave-scored table's pick, whose 256x128 / 64x128 tiles starve on pointer loads).
ROWS_SMALL = TileConfig(64, 64, 128, 4, 4, 8)
ROWS_MID = TileConfig(64, 128, 128, 4, 4, 8)
ROWS_LARGE = TileConfig(128, 128, 128, 8, 3, 8)


def rows_config(m: int, n: int) -> TileConfig:
    """The row-block kernel's GEMM tile for ``m`` rows of an ``n``-wide layer (see :data:`ROWS_SMALL`)."""
    if m <= 1024 and cdiv(n, ROWS_SMALL.block_n) <= ROWS_MAX_COL_TILES:
        return ROWS_SMALL
    return ROWS_MID if m < 1024 else ROWS_LARGE


def rows_shape(m: int, n: int, k: int, cfg: TileConfig | None = None, sms: int = H200_SMS,
               wide: bool = ROWS_WIDE) -> bool:
    """Whether the one-launch W8A8 path runs the row-block kernel for ``[m, k] x [k, n]`` on tile ``cfg``
    (None: :func:`rows_config`'s) on a GPU of ``sms`` multiprocessors: from :data:`ROWS_MIN_M` rows, at most
    :data:`ROWS_MAX_ROW_BLOCKS` row blocks, and (unless ``wide``) at most :data:`rows_quant_programs` column
    tiles: every program of such a block quantizes a share of it."""
    if m < ROWS_MIN_M or sms < ROWS_STREAMS:
        return False
    cfg = cfg or rows_config(m, n)
    tiles = cdiv(n, cfg.block_n)
    return (wide or tiles <= rows_quant_programs(tiles, sms)) and cdiv(m, cfg.block_m) <= ROWS_MAX_ROW_BLOCKS


def rows_quant_programs(col_tiles: int, sms: int = H200_SMS) -> int:
    """How many programs of a row block of ``col_tiles`` programs quantize its rows (the kernel's ``QP``): all of
    them up to :data:`ROWS_MAX_COL_TILES` and a :data:`ROWS_STREAMS`-th of the SMs (they wait for each other, so
    they must be resident at once)."""
    return max(1, min(col_tiles, ROWS_MAX_COL_TILES, sms // ROWS_STREAMS))


# The resident one-launch W8A8 kernel (``gluon_resident``, sm_90): a program holds a row block's int8 codes (all
# of K) in shared memory and runs its share of the column tiles against them, the weight's tiles by TMA through a
# ring. Shared memory per SM: 228 KB, 1 KB of it reserved per block.
RESIDENT_MAX_K = 3072  # the widest row block whose codes fit beside a ring (64 rows x 3,072 bytes = 192 KB)
RESIDENT_SMEM_SLACK = 256  # the ring's barriers (8 bytes a stage) and alignment beside the buffers
SM_SMEM = 233472
BLOCK_RESERVE = 1024
RESIDENT_DEEP_STAGES = 8


@dataclass(frozen=True)
class ResidentConfig:
    """One launch shape of the resident kernel: ``block_m`` rows a program (64: one warp group; 128: two),
    ``block_n`` x ``block_k`` weight tiles through ``stages`` ring slots, ``splits`` programs per row block (each
    a contiguous share of the column tiles, each quantizing the block again: those reads hit L2)."""

    block_m: int
    block_n: int
    block_k: int
    stages: int
    splits: int

    @property
    def warps(self) -> int:
        return self.block_m // 16


def resident_smem(block_m: int, block_n: int, block_k: int, stages: int, k: int, out_bytes: int = 2) -> int:
    """Shared memory a resident launch takes: the codes (``block_m x`` K rounded up to ``block_k``), the weight
    ring and the epilogue's layout change, which the compiler runs through a ``block_m x min(block_n, block_m)``
    buffer (sm_90 compiles: 64 x 64 for 64-row blocks whatever the tile width)."""
    return (block_m * cdiv(k, block_k) * block_k + stages * block_n * block_k
            + block_m * min(block_n, block_m) * out_bytes + RESIDENT_SMEM_SLACK)


def column_splits(tiles: int, splits: int) -> int:
    """The column splits a resident launch runs for ``tiles`` column tiles when ``splits`` are asked: as many as
    leave every split a column tile (each takes ``cdiv(tiles, splits)`` contiguous tiles)."""
    return cdiv(tiles, cdiv(tiles, splits))


def resident_per_sm(smem: int) -> int:
    """Resident kernel programs one SM holds at once with ``smem`` bytes of shared memory each."""
    return max(1, SM_SMEM // (smem + BLOCK_RESERVE))


def resident_config(m: int, n: int, k: int, sms: int) -> ResidentConfig | None:
    """The resident launch for ``[m, k] x [k, n]``, or None where the codes do not fit (K over
    :data:`RESIDENT_MAX_K`, or not a multiple of 16; N not a multiple of 8). Measured on an H100 (run 149, 160
    configurations of five SDXL / CLIP shapes at 1,024-16,384 rows, GPU time):

    - 64-row blocks: 128-row ones halve the weight tiles read again from L2, but a program then fills an SM from
      K = 640, so its serial phases (the block's quantization, then its MMAs) no longer overlap another's:
      slower on every shape timed (SDXL attn 640 at 16,384 rows: 29.9 against 27.8 µs);
    - column splits until the programs are about one per SM (at 1,024 rows five splits ran 9.7 µs, two 14.5);
    - a deep ring (:data:`RESIDENT_DEEP_STAGES`) where the programs are one wave at one per SM (13.7 against
      15.3 µs at 4,096 rows), else three stages, so that two programs share an SM where their codes allow.
    """
    if k > RESIDENT_MAX_K or k % 16 or n % 8:
        return None
    block_k = 128 if k % 128 == 0 or k > 256 else 64
    rows = max(1, cdiv(m, 64))
    for block_n in (128, 64):
        tiles = cdiv(n, block_n)
        splits = max(1, min(tiles, round(sms / rows)))
        splits = column_splits(tiles, splits)
        deep = rows * splits <= sms
        for stages in (range(RESIDENT_DEEP_STAGES, 2, -1) if deep else (3,)):
            if resident_smem(64, block_n, block_k, stages, k) <= HOPPER_SMEM:
                return ResidentConfig(64, block_n, block_k, stages, splits)
        if resident_smem(64, block_n, block_k, 2, k) <= HOPPER_SMEM:
            return ResidentConfig(64, block_n, block_k, 2, splits)
    return None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code: ``triton.cdiv`` is a constexpr function in Triton 3.6 whose wrapper costs
    ~2-5 µs per call, paid several times per launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``); host-side, see :func:`cdiv`."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def wave_efficiency(m: int, n: int, bm: int, bn: int, sms: int) -> float:
    """Useful fraction of the SM-time a grid of ``bm x bn`` tiles occupies (edge padding + last partial wave)."""
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    waves = math.ceil(tiles / sms)
    return (m * n) / (waves * sms * bm * bn)


@functools.lru_cache(maxsize=4096)
def gemm_config(m: int, n: int, k: int, sms: int, *, hopper: bool = True) -> TileConfig:
    """The W8A8 GEMM tile for an ``[m, k] x [k, n]`` problem on a GPU with ``sms`` multiprocessors."""
    best, best_score = None, -1.0
    for cfg, speed in (_BIG if hopper else _AMPERE):
        score = wave_efficiency(m, n, cfg.block_m, cfg.block_n, sms) * speed
        if score > best_score + 1e-9:
            best, best_score = cfg, score
    assert best is not None
    return best


@functools.lru_cache(maxsize=4096)
def small_m_config(m: int, n: int, k: int, sms: int, *, block_k: int = 128) -> TileConfig:
    """Thin-M tiles (weight-only, fused-quant and W4A8 kernels at small M): enough column tiles to cover the
    SMs, since at small M the weights' bytes are the cost and every SM must stream them."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    m_tiles = math.ceil(m / bm)
    bn = 32
    for cand in (128, 64):
        if m_tiles * math.ceil(n / cand) >= sms:
            bn = cand
            break
    bk = block_k if k % block_k == 0 or k > block_k else max(16, 1 << (k - 1).bit_length())
    return TileConfig(bm, bn, bk, 4, 4, group_m=1)


@functools.lru_cache(maxsize=4096)
def w8a16_config(m: int, n: int, k: int, sms: int, fp8: bool = False, smem: int = HOPPER_SMEM,
                 major: int = 9) -> TileConfig:
    """Weight-only kernel (bf16 x, int8/fp8 W): thin M; wide K (256) at M <= 16 so each load moves 16+ bytes
    per thread; pipeline depth bounded by shared memory (A bf16 + B int8 per stage; run 1 overflowed at 4 stages
    of 64x128x256 tiles: 288 KB).

    At M <= 16: 128 columns for N >= 8192 (2026-12-01 H200 tune data: 1.31-1.54x bf16); narrower layers (the
    down projections, N 3,072-5,120 under K up to 15,360) left SMs idle with one program per 32 columns
    (0.81-0.93x bf16), so K is cut in :func:`w8a16_split` slices over 64 columns (M = 1) or 32 (run 37,
    ``bench_w8a16_split.py``, GPU time with weights past L2: 1.08-1.64x bf16, within 8% of the best of 8
    configurations on 14 shapes). ``fp8`` weights on N >= 8192 take two K slices over 64 columns (M = 1) or 32
    (H200 run 54, ``--fp8 --wide``, 6 shapes: geometric mean 0.83 -> 0.99x bf16 at M = 1, 0.88 -> 1.18x at 16,
    within 6% of the best of 12 configurations on every row): converting fp8 to 16 bits costs more registers
    and issue slots than int8's, which the 128-column tiles' 72-168 programs could not hide; int8 weights there
    take 32 columns unsplit from M = 2 (timed at 16, run 55: 1.31 -> 1.39x bf16, within 6% of the best on every
    row; at M = 1 the 128-column tiles stay the best of the 12)."""
    if m <= 16:
        bk = 256 if k % 256 == 0 else 128
        if n >= 8192 and fp8:
            cfg = TileConfig(16, 64 if m == 1 else 32, bk, 4, 4 if m == 1 else 3, 1, split_k=min(2, cdiv(k, bk)))
        elif n >= 8192 and m > 1:
            cfg = TileConfig(16, 32, bk, 4, 3, 1)
        elif n >= 8192:
            cfg = TileConfig(16, 128, bk, 4, 4 if m == 1 else 3, 1)
        else:
            cfg = TileConfig(16, 64 if m == 1 else 32, bk, 4, 4 if m == 1 else 3, 1,
                             split_k=w8a16_split(cdiv(k, bk)))
    else:
        cfg = small_m_config(m, n, k, sms, block_k=128)
    return fit_stages(cfg, a_bytes=2, b_bytes=1, smem=smem, major=major)


SPLIT_K = 4  # K slices of the weight-only kernel at M <= 16 below 8,192 columns
SPLIT_MIN_ITERS = 3  # K steps per slice at least (its pipeline fills over the first few)


def w8a16_split(iters: int) -> int:
    """K slices of a thin-M weight-only launch with ``iters`` K steps: :data:`SPLIT_K`, fewer where a slice
    would get under :data:`SPLIT_MIN_ITERS` steps, and no empty slice."""
    split = max(1, min(SPLIT_K, iters // SPLIT_MIN_ITERS))
    return cdiv(iters, cdiv(iters, split))


@functools.lru_cache(maxsize=4096)
def fit_stages(cfg: TileConfig, a_bytes: int, b_bytes: int, smem: int = HOPPER_SMEM, major: int = 9) -> TileConfig:
    """``cfg`` with ``stages`` cut so the pipelined A/B tiles fit a device's ``smem`` bytes a block less
    :data:`SMEM_RESERVE` (:data:`SMEM_BUDGET` on Hopper), counting the tiles a pipeline of compute-capability
    ``major`` keeps resident (:data:`ASYNC_COPY_MAJORS`: one fewer than its stages). An RTX 4090's 99 KB took 4
    stages of the weight-only kernel's 16 x 128 x 256 tile (120 KB): Triton refuses such a launch."""
    per_stage = cfg.block_m * cfg.block_k * a_bytes + cfg.block_k * cfg.block_n * b_bytes
    tiles = max(0, smem - SMEM_RESERVE) // per_stage
    stages = max(1, min(cfg.stages, tiles + 1 if major in ASYNC_COPY_MAJORS else tiles))
    return cfg if stages == cfg.stages else dataclasses.replace(cfg, stages=stages)


@dataclass(frozen=True)
class AttentionConfig:
    """Tile of the int8 attention kernel (``triton_attention``): query rows per program (and per q scale), key
    columns per step (and per k scale), warps, pipeline depth."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


# the fastest tiles of each variant on the H200 at Wan 480p's 32,760 tokens (gpu_session.py section attention)
ATTENTION_TILE = AttentionConfig()
ATTENTION_TILE_PV_FP8 = AttentionConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # head sizes the attention kernel takes
