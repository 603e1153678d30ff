"""Triton activation quantization, the host side: which kernel a call takes, its launch, the public functions.

The kernels (``act_kernels``): "rows", "tiles" (and its two-launch "split" form), "held", "grows" and "blocks".
"auto" (the default) picks per call by the H200 timings (``benchmarks/bench_act_quant.py``;
``benchmarks/gpu_session.py``, section ``rotation``; :func:`pick_kernel`). Modes: ``int8`` (absmax/127,
round-half-even), ``fp8`` (absmax/fp8_max, or a static scale), ``float`` (rotation only).
Imported lazily: only GPU backends import this module.
"""

from __future__ import annotations

import functools

import torch

from comfyquant.quant.hadamard import hadamard_matrix
from comfyquant.runtime.kernels import scratch
from comfyquant.runtime.kernels.act_kernels import (
    CHUNK,
    MODE_FLOAT,
    MODE_FP8,
    MODE_FP8_STATIC,
    MODE_INT8,
    _act_block_kernel,
    _act_group_rows_kernel,
    _act_held_kernel,
    _act_kernel,
    _act_tile_kernel,
)
from comfyquant.runtime.kernels.acts import (
    GATED_CODES,
    SINGLE_PASS_MAX,
    ModulatedNorm,
    Norm,
    norm_args,
    norm_rows,
)
from comfyquant.runtime.kernels.configs import cdiv, next_power_of_2
from comfyquant.runtime.kernels.launch import FastKernel, device_facts, stream_id
from comfyquant.runtime.kernels.scratch import row_scales

MAX_STAGES = 8  # act_kernels._rotate's radix-4 stages: groups up to 4**8 = 65536 (the format allows any power of 4)


def _stages(group: int | None) -> int:
    stages = 0 if group is None else (group.bit_length() - 1) // 2
    if stages > MAX_STAGES:
        raise ValueError(f"convrot group {group} is larger than the Triton rotation's {4 ** MAX_STAGES}")
    return stages


_ACT = FastKernel(_act_kernel)
_ACT_TILES = FastKernel(_act_tile_kernel)
_ACT_BLOCKS = FastKernel(_act_block_kernel)
_ACT_HELD = FastKernel(_act_held_kernel)
_ACT_GROWS = FastKernel(_act_group_rows_kernel)
KERNELS = ("rows", "tiles", "split", "held", "grows", "blocks", "auto")
DEFAULT_KERNEL = "auto"  # what the linears and their plans run: pick_kernel per call
DOT_GROUPS = (16, 64, 256)  # 256: four quarters times the 64-group's Hadamard (an 8 KB operand) + one H4 stage
DOT_ROWS = 64  # rows per program of the rotating tile kernel: one warpgroup's wgmma M
DOT_ROWS_MIN = 16  # tl.dot's least M: 4x the programs where 64-row ones would leave SMs idle
TILE_ELEMS = 4096  # elements per tile of the plain tile kernel (rows x columns)


@functools.lru_cache(maxsize=32)
def _hadamard(group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense normalized regular Hadamard in ``dtype`` (entries +-1/sqrt(group): exact for groups <= 2^16)."""
    return hadamard_matrix(group, torch.float64).to(device=device, dtype=dtype).contiguous()


def out_width(x: torch.Tensor, act: int) -> int:
    """Columns of the output (K): x's, or half of them for a gated activation (its rows hold both halves)."""
    k = int(x.shape[-1])
    if act in GATED_CODES:
        if k % 2:
            raise ValueError(f"a gated input activation needs an even input width, got {k}")
        return k // 2
    return k


def tiles_apply(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0) -> bool:
    """Whether the tile kernel (``kernel="tiles"``) handles this call: unrotated int8/fp8 codes of any rows, or
    the rotation (int8 codes or rotated values) of fp16/bf16 rows by a group of :data:`DOT_GROUPS` dividing K.
    Elsewhere (larger groups, fp32 rows to rotate, static fp8 scales) the row kernel runs."""
    if group is None:
        return mode in (MODE_INT8, MODE_FP8)
    return (group in DOT_GROUPS and x2d.dtype in (torch.float16, torch.bfloat16)
            and out_width(x2d, act) % group == 0 and mode in (MODE_INT8, MODE_FLOAT))


def dot_rows(m: int, sms: int) -> int:
    """Rows per program of the rotating tile kernel: ``DOT_ROWS`` where those programs cover every SM, else
    ``DOT_ROWS_MIN`` (H200, runs 8-9: at M = 4096 the 64-row programs, 64 of them, ran 1.4-2.2x slower than
    the row kernel, the 16-row ones 0.70-0.88x its time for K <= 5120; at M = 16384 64 rows were 2-5% faster)."""
    return DOT_ROWS if cdiv(m, DOT_ROWS) >= sms else DOT_ROWS_MIN


ROT_STAGES = 3  # pipeline depth of the rotating tile kernel (run 41: 1.13-1.25x faster than 2 on every shape)
ROT_UNROLL = 2  # its steps per loop iteration in 16-row programs (run 41: 1.05-1.10x over 1 at M = 4096)


def rot_tile_config(m: int, sms: int) -> tuple[int, int, int, int]:
    """(rows, warps, stages, unroll) of the rotating tile kernel at ``m`` rows (H200, run 41,
    ``bench_rotation.py``, convrot 256, 54 configurations x 12 shapes: the best on every shape at M = 4096 /
    16384, where it runs 1.2-1.6x faster than the run 8-9 configuration (16 or 64 rows, 2 stages, no unroll))."""
    rows = dot_rows(m, sms)
    return rows, 4, ROT_STAGES, ROT_UNROLL if rows == DOT_ROWS_MIN else 1


# Rotated int8 rows too few for the tile kernel take its split form from ROT_SPLIT_MIN_M rows where each row is
# long (ROT_SPLIT_MIN_K) or the pass is large (ROT_SPLIT_MIN_ELEMS); shorter ones stay on the row kernel (H200,
# run 42, ``bench_rotation.py --split``, convrot 256: the split form 1.0-1.8x the row kernel's speed there, and
# 0.4-0.7x on 64-1,024 rows of 3,072-5,120 columns, where the row kernel's one pass in registers is short)
ROT_SPLIT_MIN_M = 64
ROT_SPLIT_MIN_K = 12288
ROT_SPLIT_MIN_ELEMS = 4 << 20
ROT_SPLIT_PROGRAMS = 4  # programs per SM its chunks aim at (run 42: 1.0-1.2x faster than 2 from 1,024 rows)


def split_chunks(m: int, k: int, group: int, sms: int, programs: int = ROT_SPLIT_PROGRAMS) -> int:
    """Column chunks of the split rotating tile kernel (see :func:`_act_tile_kernel`) for ``m`` x ``k`` rows:
    enough 16-row programs for ``programs`` per SM, each chunk a whole number of its unrolled steps
    (``ROT_UNROLL`` groups of 256, or of ``group`` below)."""
    steps = cdiv(k, _rot_step(group) * ROT_UNROLL)
    want = cdiv(programs * sms, cdiv(m, DOT_ROWS_MIN))
    return cdiv(steps, cdiv(steps, max(1, min(want, steps))))


def _rot_step(group: int) -> int:
    return 256 if group == 256 else group


# The one-read rotating kernel's launch: 64 rows x one group of 256 per program, 4 warps (H200 run 55,
# ``bench_rotation.py --held``: the fastest of 6 configurations on 18 of the 20 shapes from 1,024 rows)
HELD_ROWS = 64
HELD_GROUPS = 1
# ... and where "auto" takes it: from 1,024 rows, 2-16 M elements, rows up to 12,288 wide (run 55: 1.06-1.46x
# faster than the kernel picked before on 8 shapes there, e.g. 4,096 x 3,072 25.9 vs 30.5 µs; it scales worse
# than the pipelined tile kernel beyond: 4,096 x 15,360 1.18x slower, 16,384 rows 1.2-1.8x slower)
HELD_MIN_M = 1024
HELD_MAX_K = 12288
HELD_ELEMS = (2 << 20, 16 << 20)


def held_parts(k: int, held: int = HELD_GROUPS) -> int:
    """Column chunks (programs per row block) of the one-read rotating kernel for rows ``k`` wide."""
    return cdiv(k, 256 * held)


def held_apply(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, rows: int = HELD_ROWS,
               held: int = HELD_GROUPS) -> bool:
    """Whether the one-read rotating kernel (:func:`_act_held_kernel`) takes this call: int8 codes of fp16/bf16
    rows rotated by groups of 256 (:func:`tiles_apply`), a counter per row block within the shared counters, and
    a row block's programs no more than the SMs (a waiting program needs its block's others resident)."""
    if group != 256 or mode != MODE_INT8 or not tiles_apply(x2d, group, mode, act):
        return False
    m, k = int(x2d.shape[0]), out_width(x2d, act)
    return 1 + cdiv(m, rows) <= scratch.SPLIT_COUNTERS and held_parts(k, held) <= device_facts(x2d.device)[0]


# The group-rows rotating kernel (a row per program, its groups of 256 the tile's rows, x read once): where "auto"
# takes it, from H200 run 126 (``bench_rotation.py --grows``, codes bit-equal to the tile kernel's on 20 shapes):
# rows of more than 32 groups (12,288-15,360 columns: Flux mlp2 / linear2, Wan ffn2), 256 .. 4,096 rows: 1.13-1.88x
# faster than the kernel picked before (split / held / tiles: 256 x 15,360 8.9 against 16.4 µs, 4,096 x 15,360
# 91.3 against 128.6). Not at 16,384 rows (the tile kernel's 64-row programs 0.82-0.98x its time), nor on rows of
# 3,072-5,120 columns (0.57-0.95x but for 256 x 5,120), where its masked quarters and a Hadamard load per row of
# 6-10 KB cost more than the tile kernel's second read.
GROWS_MIN_M = 256
GROWS_MIN_GROUPS = 33
GROWS_MAX_ELEMS = 64 << 20
GROWS_ONE_MAX = 64  # groups a program holds whole (16,384 columns); wider rows take steps of 64 (two passes)
GROWS_WARPS = 4  # run 126: 1.2-1.4x faster than 8 warps on every shape (168 registers, no spills, sm_90)
# ... launched as a few programs an SM walking the rows in strides, the next row's loads pipelined under this one's
# arithmetic and the Hadamard loaded once a program (H100 run 127, ``bench_rotation.py --grows``, the same 20
# shapes, codes bit-equal to the default's): rows of more than 32 groups from 1,024 rows, 2 programs an SM and 3
# stages, 1.12-1.30x the one-program-a-row default and at 16,384 rows 1.33-1.58x the tile kernel picked before
# (16,384 x 15,360: 276 against 437 µs). At 256 rows the strided form ties the default. (Shorter rows: below.)
GROWS_STRIDE_MIN_M = 1024
GROWS_PER_SM = 2
GROWS_STRIDE_STAGES = 3
GROWS_STRIDE_MAX_ELEMS = 256 << 20  # the largest timed: 16,384 x 15,360 (Wan 480p's 32,760 rows keep the tiles)
# Rows of 12-32 groups (3,072-8,192 columns: Flux's qkv / proj / mlp0 / linear1, Wan's attn): H200 runs 147-148
# (``bench_rotation.py --grows``, after the int8 codes' epilogue lost its float-to-int conversions), from 256 rows:
# two warps a program, eight programs an SM, three stages, one row a tile, the fastest of 12 configurations on 3,072
# and 5,120 columns at 256 / 1,024 / 4,096 / 16,384 rows (at 1,024 x 5,120 tied with two others at 11.1 µs),
# 1.06-1.34x the schedule before it (run 148's "auto": 4,096 x 3,072 16.8 against 19.1 µs, 16,384 x 3,072 51.3
# against 68.6), 1.06-1.41x the kernels picked without the group-rows kernel. The packed forms (64 // groups short
# rows to one 64-row tile, a pack per program or strided) ran 1.01-1.38x its time and were removed; the 4-warp
# one-row form H100 runs 127 / 141 picked ran 1.0-1.25x.
# Widths of 13-19 and 21-32 groups run the same kernels as 3,072 / 5,120 with fewer rows masked: untimed, taken alike.
GROWS_SHORT_GROUPS = (12, 32)
GROWS_SHORT_WARPS = 2
GROWS_SHORT_PER_SM = 8


def group_rows_apply(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0) -> bool:
    """Whether the group-rows rotating kernel (:func:`_act_group_rows_kernel`) takes this call: int8 codes or the
    rotated values of fp16/bf16 rows by groups of 256 (:func:`tiles_apply`)."""
    return group == 256 and tiles_apply(x2d, group, mode, act)


def group_rows_config(k: int) -> tuple[int, bool, int]:
    """(groups per step, one pass, warps) of the group-rows kernel for rows ``k`` wide: the row's groups rounded
    up to a power of two (16 at least: tl.dot's least M) in one pass while they are :data:`GROWS_ONE_MAX` or
    fewer, else steps of 64 groups; :data:`GROWS_WARPS` warps."""
    g = cdiv(k, 256)
    gb = max(16, next_power_of_2(g)) if g <= GROWS_ONE_MAX else GROWS_ONE_MAX
    return gb, g <= gb, GROWS_WARPS


@functools.lru_cache(maxsize=1024)
def group_rows_schedule(m: int, k: int, sms: int) -> tuple[tuple[int, bool, int], int | None, int] | None:
    """(configuration, programs or None for one a row, pipeline stages) the runtime launches the group-rows kernel
    with for ``m`` rows ``k`` wide on ``sms`` multiprocessors, or None where it does not take the call: rows of
    :data:`GROWS_SHORT_GROUPS` groups two warps a program, eight an SM (H200 runs 147-148); longer rows strided two
    an SM from :data:`GROWS_STRIDE_MIN_M` rows (H100 runs 127 / 141), else one program a row up to
    :data:`GROWS_MAX_ELEMS` (H200 run 126).
    Memoized: pure in (m, k, sms), asked by ``pick_kernel`` and ``launch_for`` on every call."""
    g = cdiv(k, 256)
    if m < GROWS_MIN_M:
        return None
    lo, hi = GROWS_SHORT_GROUPS
    if lo <= g <= hi and m * k <= GROWS_STRIDE_MAX_ELEMS:
        gb, one, _ = group_rows_config(k)
        return (gb, one, GROWS_SHORT_WARPS), GROWS_SHORT_PER_SM * sms, GROWS_STRIDE_STAGES
    if GROWS_MIN_GROUPS <= g <= GROWS_ONE_MAX and m >= GROWS_STRIDE_MIN_M and m * k <= GROWS_STRIDE_MAX_ELEMS:
        # (one-pass rows: the timed 48-60 groups; wider rows' two passes were not timed strided)
        return group_rows_config(k), GROWS_PER_SM * sms, GROWS_STRIDE_STAGES
    if g >= GROWS_MIN_GROUPS and m * k <= GROWS_MAX_ELEMS:
        return group_rows_config(k), None, 1
    return None


def group_rows_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, mode: int, qmax: float, perm: int,
                      act: int, cfg: tuple[int, bool, int] | None = None, programs: int | None = None) -> tuple:
    """(grid, args, key, num_warps) of the group-rows kernel: ``programs`` programs (None: one per row) walking the
    rows in strides; ``cfg`` (groups per step, one pass, warps; None: :func:`group_rows_config`). The 64-group's
    Hadamard at ``args[3]``."""
    m, k = x2d.shape[0], out_width(x2d, act)
    gb, one, warps = cfg or group_rows_config(k)
    if one and cdiv(k, 256) > gb:
        raise ValueError(f"one pass of {gb} groups does not cover K = {k}")
    nprog = m if programs is None else max(1, min(m, programs))
    h = _hadamard(64, x2d.dtype, x2d.device)
    return ((nprog,), (x2d, out, scale, h, m, k, x2d.stride(0), out.stride(0), qmax, nprog, gb, one, mode, perm, act),
            (gb, one, mode, perm, act, x2d.dtype, out.dtype, m == 1, k, x2d.stride(0), out.stride(0),
             x2d.data_ptr() % 16 == 0, nprog == m, nprog == 1), warps)


def scale_floats(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, kernel: str = DEFAULT_KERNEL) -> int:
    """Floats the row-scale buffer of this call needs: M, or ``(1 + chunks) M`` where the split or the one-read
    rotating kernel runs (its absmax parts follow the scales)."""
    m = int(x2d.shape[0])
    kernel = pick_kernel(x2d, group, mode, act) if kernel == "auto" else kernel
    if kernel == "held" and held_apply(x2d, group, mode, act):
        return m * (1 + held_parts(out_width(x2d, act)))
    if kernel != "split" or not _splits(x2d, group, mode, act):
        return m
    return m * (1 + split_chunks(m, out_width(x2d, act), group, device_facts(x2d.device)[0]))


def _splits(x2d: torch.Tensor, group: int | None, mode: int, act: int) -> bool:
    return group is not None and mode == MODE_INT8 and tiles_apply(x2d, group, mode, act)


def block_config(m: int, k: int) -> tuple[int, int | None, int]:
    """(rows per program, columns per step or None for one pass, warps) of the block kernel, from the H200's
    timings of its configurations (run 35, ``bench_act_quant.py``: within 3% of the best of 12-24 on every
    shape, 1.06-1.9x faster than the row / tile kernels). Rows up to 8,192 wide in one pass; wider ones too while
    M <= 256 (latency-bound) or K is close to a power of two, else two passes over 4,096- or 2,048-column chunks
    (less masked work than a padded row) unless the last chunk would be masked and the row pads by at most a fifth;
    rows under 2,048 wide four to a program from M = 1,024."""
    full = next_power_of_2(max(k, 16))
    if k < 2048:
        chunk = min(256, k & -k)
        return (4, chunk, 4) if m >= 1024 and chunk >= 128 else (1, None, 4)
    if full <= 8192:
        if m >= 8192 and 2 * full >= 3 * k:
            return 1, 2048, 4
        return 1, None, 8 if m <= 256 and full == 8192 else 4
    if m <= 256 or 10 * full <= 11 * k:
        return 1, None, 16 if m <= 1024 else 8
    if k % 2048 and 5 * full <= 6 * k:
        # a masked last chunk: Wan's 13,824 columns ran 1.25-1.30x faster in one pass of 8 warps than over
        # 2,048-column chunks at 4,096 / 16,384 rows (H100 run 130)
        return 1, None, 8
    return 1, 4096 if k % 4096 == 0 else 2048, 4


def pick_kernel(x2d: torch.Tensor, group: int | None, mode: int, act: int = 0, held: bool = True,
                grows: bool = True) -> str:
    """The faster activation kernel for this call on the H200: unrotated, always the block kernel (run 35:
    1.06-1.9x the faster of the row and tile kernels on every shape from 256 x 768 to 16,384 x 15,360);
    rotated (runs 8-9, ``rotation`` section), "tiles" where :func:`tiles_apply` and its programs
    (:func:`dot_rows`) cover every SM at least once (below that the tile kernel ran 1.9-27x slower than the row
    kernel; at M = 16384 it was 1.6-2.3x faster); below that its split form (two launches over column chunks)
    for int8 codes of long rows (:data:`ROT_SPLIT_MIN_K`, :data:`ROT_SPLIT_MIN_ELEMS`), else "rows"; int8 codes
    by groups of 256 on mid-sized calls (:data:`HELD_MIN_M`, :data:`HELD_MAX_K`, :data:`HELD_ELEMS`): "held"
    (``held=False``: the choice among the others, which the timings recorded before that kernel judge); groups of
    256 where :func:`group_rows_schedule` takes them: "grows" for int8 codes (the mode runs 126-127 timed; the
    rotation alone keeps its earlier pick) (``grows=False``: the choice without it, as ``held``)."""
    if group is None and mode in (MODE_INT8, MODE_FP8, MODE_FP8_STATIC):
        return "blocks"
    if not tiles_apply(x2d, group, mode, act):
        return "rows"
    m, k = int(x2d.shape[0]), out_width(x2d, act)
    if (grows and mode == MODE_INT8 and group_rows_schedule(m, k, device_facts(x2d.device)[0]) is not None
            and group_rows_apply(x2d, group, mode, act)):
        return "grows"
    if (held and m >= HELD_MIN_M and k <= HELD_MAX_K and HELD_ELEMS[0] <= m * k <= HELD_ELEMS[1]
            and held_apply(x2d, group, mode, act)):
        return "held"
    if cdiv(m, DOT_ROWS_MIN) >= device_facts(x2d.device)[0]:
        return "tiles"
    long_rows = k >= ROT_SPLIT_MIN_K or m * k >= ROT_SPLIT_MIN_ELEMS
    return "split" if m >= ROT_SPLIT_MIN_M and long_rows and mode == MODE_INT8 else "rows"


def _tile_width(k: int) -> int:
    """Columns per tile of the plain kernel: the largest power of two <= 1024 dividing K (no masked lanes), or
    K's next power of two up to 1024 (masked tail) when that would be below 64."""
    c = min(1024, k & -k)
    return c if c >= 64 else min(1024, next_power_of_2(max(k, 16)))


def _launch(x2d: torch.Tensor, group: int | None, mode: int, out_dtype: torch.dtype, qmax: float,
            static_scale: torch.Tensor | None = None, perm: int = 0, act: int = 0,
            kernel: str = DEFAULT_KERNEL, norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape[0], out_width(x2d, act)
    out = torch.empty((m, k), dtype=out_dtype, device=x2d.device)
    if kernel == "auto":  # picked once for the scales' size and the launches
        kernel = pick_kernel(x2d, group, mode, act)
    floats = scale_floats(x2d, group, mode, act, kernel) if static_scale is None else m
    scale = row_scales(m, floats - m, x2d.device)
    for fk, grid, args, key, warps, stages in launch_for(x2d, out, scale, static_scale, group, mode, qmax, perm,
                                                         act, kernel, norm):
        fk(grid, args, x2d.device, num_warps=warps, num_stages=stages, key=key)
    return out, scale


def launch_for(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
               group: int | None, mode: int, qmax: float, perm: int, act: int,
               kernel: str = DEFAULT_KERNEL, norm: Norm | None = None) -> list[tuple]:
    """The launches, in order, of the activation kernel ``kernel`` picks for this call, each (FastKernel, grid,
    args, key, num_warps, num_stages) (:data:`KERNELS`; "blocks" without a rotation, "tiles" and "split" where
    :func:`tiles_apply`, else "rows"; "auto": :func:`pick_kernel`). ``args[0:3]`` are x, the output and the row
    scales (for "split" a view of a buffer of :func:`scale_floats` floats); ``args[3]`` what the kernel reads
    beside them: the static scale, or the row scales again (row and block kernels), or the group's Hadamard
    (tile kernel, fixed per device and dtype). One launch, or two for "split" (absmax parts, then codes).
    ``norm``: an RMSNorm folded into the block kernel, or with a rotation into the row kernel
    (:func:`norm_applies`; ValueError elsewhere)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown activation kernel {kernel!r}; expected one of {KERNELS}")
    if norm is not None:
        if not norm_applies(group, mode, act, static_scale, norm, out_width(x2d, act)):
            raise ValueError("an RMSNorm folds into dynamic int8 / fp8 codes (int8 rotated too) or a rotation "
                             "without an input activation only, a modulated LayerNorm into those of rows up to "
                             f"{SINGLE_PASS_MAX} wide (group {group}, mode {mode}, act {act}, static scale "
                             f"{static_scale is not None}, {type(norm).__name__})")
        kernel = "blocks" if group is None else "rows"
    if kernel == "auto":
        kernel = pick_kernel(x2d, group, mode, act)
    if kernel == "blocks" and group is None and mode != MODE_FLOAT:
        rows, chunk, warps = block_config(int(x2d.shape[0]), out_width(x2d, act))
        if isinstance(norm, ModulatedNorm):  # rows in registers whatever the chunk: <= 32 values a thread
            warps = min(16, max(warps, rows * next_power_of_2(max(out_width(x2d, act), 16)) // 1024))
        return [(_ACT_BLOCKS, *block_launch(x2d, out, scale, static_scale, mode, qmax, perm, act, rows, chunk,
                                            warps, norm), 1)]
    if kernel == "held" and static_scale is None and held_apply(x2d, group, mode, act):
        sync = scratch.split_workspace(x2d.device).counters(stream_id(x2d.device))
        return [(_ACT_HELD, *held_launch(x2d, out, scale, sync, qmax, perm, act, phase=phase), 1)
                for phase in sync_phases(x2d.device)]
    if kernel == "grows" and static_scale is None and group_rows_apply(x2d, group, mode, act):
        m, k = int(x2d.shape[0]), out_width(x2d, act)
        cfg, programs, stages = (group_rows_schedule(m, k, device_facts(x2d.device)[0])
                                 or (group_rows_config(k), None, 1))
        return [(_ACT_GROWS, *group_rows_launch(x2d, out, scale, mode, qmax, perm, act, cfg, programs), stages)]
    if kernel == "split" and static_scale is None and _splits(x2d, group, mode, act):
        assert group is not None
        m, sms = int(x2d.shape[0]), device_facts(x2d.device)[0]
        chunks = split_chunks(m, out_width(x2d, act), group, sms)
        return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act, DOT_ROWS_MIN, 4,
                                          ROT_UNROLL, chunks, phase), ROT_STAGES) for phase in (1, 2)]
    if kernel in ("tiles", "split") and static_scale is None and tiles_apply(x2d, group, mode, act):
        if group is None:
            return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act), 2)]
        rows, warps, stages, unroll = rot_tile_config(int(x2d.shape[0]), device_facts(x2d.device)[0])
        return [(_ACT_TILES, *tile_launch(x2d, out, scale, group, mode, qmax, perm, act, rows, warps, unroll),
                 stages)]
    return [(_ACT, *act_launch(x2d, out, scale, static_scale, group, mode, qmax, perm, act, norm), 3)]


def tile_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, group: int | None, mode: int,
                qmax: float, perm: int, act: int, rows: int | None = None, warps: int = 4,
                unroll: int = 1, chunks: int = 1, phase: int = 0, back: bool | None = None) -> tuple:
    """(grid, args, key, num_warps) of the tile kernel (see :func:`tiles_apply`): with a group, ``rows`` rows
    per program (16 or more, a power of two; None: :func:`dot_rows`) and the group's Hadamard (groups 16 and 64)
    or the 64-group's applied to each quarter (group 256) as the product's operand; without, ``TILE_ELEMS`` per
    tile; ``unroll`` steps per loop iteration; ``phase`` 1 / 2 (``chunks`` > 1): one launch of the split form,
    ``chunks`` column chunks of whole unrolled steps (the scales' buffer holds ``(1 + chunks) M`` floats);
    ``back``: the codes pass from the row's end (the kernel's ``BACK``: the same codes; None: with a group, where
    run 109 timed it 1.01-1.03x faster on 8 of 8 Flux / Wan rows at 4,096 and 16,384 rows)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    back = group is not None if back is None else back
    if group is None:
        c, h, rot = _tile_width(k), scale, 0  # h: never read
        bm = max(1, min(64, TILE_ELEMS // c))
    else:
        bm = rows or dot_rows(m, device_facts(x2d.device)[0])
        c, rot = (64, 2) if group == 256 else (group, 1)
        h = _hadamard(c, x2d.dtype, x2d.device)
    step = 4 * c if rot == 2 else c
    kc, parts = k, 1
    if phase:
        kc = cdiv(cdiv(k, step * unroll), chunks) * step * unroll
        parts = cdiv(k, kc)
        if parts != chunks:
            raise ValueError(f"{chunks} chunks of whole {step * unroll}-column steps do not cover K = {k}")
    grid = (cdiv(m, bm), parts) if phase else (cdiv(m, bm),)
    return (grid, (x2d, out, scale, h, m, k, x2d.stride(0), out.stride(0), qmax, c, step, bm, rot, mode, perm, act,
                   unroll, kc, parts, phase, back),
            (c, bm, rot, mode, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, unroll, kc % 16 == 0, parts == 1, parts % 16 == 0, phase, back), warps)


def sync_phases(device: torch.device) -> tuple[int, ...]:
    """The launches of a kernel whose programs wait for each other (the one-read rotation, the row-block W8A8
    kernel): one synchronized (phase 0) on a GPU; under Triton's CPU interpreter, which runs programs one after
    another (a wait would never end), its first half, then its second (phases 1, 2)."""
    return (0,) if device.type == "cuda" else (1, 2)


def held_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, sync: torch.Tensor, qmax: float,
                perm: int, act: int, rows: int = HELD_ROWS, held: int = HELD_GROUPS, warps: int = 4,
                phase: int = 0) -> tuple:
    """(grid, args, key, num_warps) of the one-read rotating kernel (group 256, int8; see :func:`held_apply`):
    x, the codes, the scales (a view of ``(1 + held_parts) M`` floats) and the 64-group's Hadamard at
    ``args[0:4]``, the shared counters ``sync`` (zeroed; the launch leaves them so) at ``args[4]``."""
    m, k = x2d.shape[0], out_width(x2d, act)
    parts = held_parts(k, held)
    h = _hadamard(64, x2d.dtype, x2d.device)
    return ((cdiv(m, rows) * parts,),
            (x2d, out, scale, h, sync, m, k, x2d.stride(0), out.stride(0), qmax, parts, rows, held, MODE_INT8, perm,
             act, phase),
            (rows, held, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, parts, phase), warps)


def block_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
                 mode: int, qmax: float, perm: int, act: int, rows: int = 1, chunk: int | None = None,
                 warps: int = 4, norm: Norm | None = None) -> tuple:
    """(grid, args, key, num_warps) of the block kernel: ``rows`` rows per program, ``chunk`` columns per step
    (a power of two; None: K's next power of two, one pass with the rows in registers); ``norm``: a folded
    RMSNorm or modulated LayerNorm (its tensor at ``args[15]``; a modulated one takes one pass, whatever
    ``chunk`` says)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    bk = next_power_of_2(max(k, 16)) if chunk is None or isinstance(norm, ModulatedNorm) else chunk
    nch = cdiv(k, bk)
    static = static_scale if static_scale is not None else scale
    nw, eps, code = norm_args(norm, _no_norm(x2d.device))
    return ((cdiv(m, rows),), (x2d, out, scale, static, m, k, x2d.stride(0), out.stride(0), qmax, rows, bk, nch,
                               mode, perm, act, nw, eps, norm_rows(norm), code),
            (rows, bk, nch, mode, perm, act, x2d.dtype, out.dtype, m == 1, m % 16 == 0, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, static_scale is not None, code, nw.dtype, nw.data_ptr() % 16 == 0), warps)


@functools.cache
def _no_norm(device: torch.device) -> torch.Tensor:
    """The block kernel's norm-weight argument without a norm (never read): one float per device, so a plan holds
    no per-call buffer through it."""
    return torch.zeros(1, device=device)


def norm_applies(group: int | None, mode: int, act: int, static_scale: torch.Tensor | None = None,
                 norm: Norm | None = None, k: int = 0) -> bool:
    """Whether a norm folds into this quantization: unrotated dynamic int8 / fp8 codes (the block kernel),
    rotated int8 codes or the rotation alone (the row kernel); no static scale (it would need the norm's factor
    before the codes), no input activation. The other rotating kernels (tile, split, one-read) have no norm: a
    call with one takes the row kernel. A modulated LayerNorm (``norm`` a ``ModulatedNorm``, rows ``k`` wide): the
    same, on rows a kernel holds whole (``k <= SINGLE_PASS_MAX``)."""
    if act != 0 or static_scale is not None:
        return False
    if mode not in ((MODE_INT8, MODE_FP8) if group is None else (MODE_INT8, MODE_FLOAT)):
        return False
    return not isinstance(norm, ModulatedNorm) or 0 < k <= SINGLE_PASS_MAX


def act_launch(x2d: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, static_scale: torch.Tensor | None,
               group: int | None, mode: int, qmax: float, perm: int, act: int, norm: Norm | None = None) -> tuple:
    """(grid, args, key, num_warps) of the activation kernel: x, output, scale and the scale it reads at
    ``args[0:4]`` (the dynamic scale itself when there is no static one); ``norm``: a folded RMSNorm or modulated
    LayerNorm (its tensor at ``args[-4]``). Warps: 8 from 4,096-wide blocks, 4 below; a modulated norm's 4,096-wide
    block keeps 4 (8 spilled 4 bytes in the rotation-only mode at Flux's 3,072, sm_90 compile)."""
    m, k = x2d.shape[0], out_width(x2d, act)
    full = next_power_of_2(max(k, 16))
    block = full if full <= SINGLE_PASS_MAX else max(CHUNK, group or 0)
    static = static_scale if static_scale is not None else scale
    nw, eps, code = norm_args(norm, _no_norm(x2d.device))
    wide = block > 4096 if isinstance(norm, ModulatedNorm) else block >= 4096
    return ((m,), (x2d, out, scale, static, k, x2d.stride(0), out.stride(0), qmax, block, cdiv(k, block),
                   _stages(group), mode, perm, act, nw, eps, norm_rows(norm), code),
            (block, cdiv(k, block), _stages(group), mode, perm, act, x2d.dtype, out.dtype, k, x2d.stride(0),
             x2d.data_ptr() % 16 == 0, static_scale is not None, code, nw.dtype, nw.data_ptr() % 16 == 0),
            8 if wide else 4)


def quantize_rows_int8(x2d: torch.Tensor, group: int | None = None, perm: int = 0, act: int = 0,
                       kernel: str = DEFAULT_KERNEL, norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Activate +) (rotate +) per-row int8: ``(q int8 [M,K], scale fp32 [M,1])``; ``perm`` > 0 stores each
    ``perm``-column block as its even columns then its odd ones (the W4A8 GEMM's order; K must be a multiple of
    ``perm``); ``act``: an ``acts.INPUT_ACTS`` code applied to x first (in fp32); ``kernel``: "rows" (a row
    per program, the rotation as an in-register butterfly) or "tiles" (row tiles, the rotation a tensor-core
    product, where :func:`tiles_apply`; else "rows"; "split", "held" and "grows" its other forms, where they
    apply) or "blocks" (unrotated: rows or chunks per program with a cheaper exact division; else "rows") or
    "auto" (:func:`pick_kernel`); ``norm``: an RMSNorm applied first,
    folded into the block kernel, or with a rotation into the row kernel (no ``act``: :func:`norm_applies`)."""
    if perm and out_width(x2d, act) % perm:
        raise ValueError(f"K={out_width(x2d, act)} is not a multiple of the permutation block {perm}")
    return _launch(x2d, group, MODE_INT8, torch.int8, 127.0, perm=perm, act=act, kernel=kernel, norm=norm)


def quantize_rows_fp8(x2d: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                      static_scale: torch.Tensor | None = None, act: int = 0,
                      kernel: str = DEFAULT_KERNEL, norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 (dynamic) or saturating static-scale fp8: ``(q [M,K], scale fp32 [M,1])`` (static: the
    scalar written to every row, so GEMM epilogues read the same per-row layout either way); ``kernel`` as
    for :func:`quantize_rows_int8` (static scales always take "rows"); ``norm`` as there (dynamic scales only)."""
    qmax = float(torch.finfo(dtype).max)
    if static_scale is not None:
        return _launch(x2d, None, MODE_FP8_STATIC, dtype, qmax, static_scale.float().reshape(1), act=act,
                       kernel=kernel, norm=norm)
    return _launch(x2d, None, MODE_FP8, dtype, qmax, act=act, kernel=kernel, norm=norm)


def rotate_rows(x2d: torch.Tensor, group: int, act: int = 0, kernel: str = DEFAULT_KERNEL,
                norm: Norm | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(Activate or RMSNorm +) group-wise regular-Hadamard rotation only, output in ``out_dtype`` (None: x's;
    the small-batch convrot path); ``kernel`` as for :func:`quantize_rows_int8`; ``norm`` (not with ``act``): the
    norm applied first, in the row kernel's pass (:func:`norm_applies`)."""
    return _launch(x2d, group, MODE_FLOAT, out_dtype or x2d.dtype, 1.0, act=act, kernel=kernel, norm=norm)[0]
