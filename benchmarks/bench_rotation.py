"""The rotating activation quantizer alone (convrot group 256 on bf16 rows, int8 codes: what every convrot W8A8
layer runs first): the tile kernel's launch configurations (rows per program, warps, pipeline stages, steps
unrolled per loop iteration) against the row kernel, today's pick ("auto") and the unrotated block kernel,
GPU time of CUDA-graph replays with the inputs cycled past L2. Every configuration's codes and scales are
compared with the default configuration's before it is timed. ``--split``: the split form on rows too few for
the tile kernel; ``--held``: the one-read kernel (programs hold their chunk rotated in registers and share their
rows' absmax parts) in its configurations, M 64 .. 16,384, its codes compared with the tile kernel's; ``--back``:
the tile kernel's default configuration with its codes pass walking each row from the end (``BACK``: its first
re-reads are the lines the absmax pass read last, which may still be in L2) against the same forward, M 4,096 /
16,384 (run 106: the rotating pass at 12,288-15,360 columns costs 2x the unrotated one, its re-read from HBM);
``--grows``: the group-rows kernel (the row's groups the tile's rows: x read once on rows up to 16,384 wide) in
five configurations (a row per program, or programs striding over the rows, pipelined or not) against the tile
kernel, the one-read kernel, "auto" and the block kernel, M 256 .. 16,384 on Flux / Wan widths, its codes
compared with the tile kernel's.

    python benchmarks/bench_rotation.py --out results/      # a CUDA GPU
    python benchmarks/bench_rotation.py --out results/ --held
    python benchmarks/bench_rotation.py --out results/ --grows
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

M_VALUES = (1024, 4096, 16384)
K_VALUES = (3072, 5120, 12288, 15360)
ROWS, WARPS, STAGES, UNROLL = (16, 32, 64), (4, 8), (1, 2, 3), (1, 2, 4)
L2_PAST = 160 << 20  # bytes of input cycled per timing: past the H200's 50 MB L2


def run_tiles(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int, cfg: tuple[int, int, int, int],
              back: bool | None = None) -> None:
    """One launch of the rotating tile kernel with ``cfg`` = (rows, warps, stages, unroll) (``back``: its codes
    pass from the row's end; None: the launch's default, which is that)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    rows, warps, stages, unroll = cfg
    grid, args, key, w = tq.tile_launch(x, q, s, group, tq.MODE_INT8, 127.0, 0, 0, rows=rows, warps=warps,
                                        unroll=unroll, back=back)
    tq._ACT_TILES(grid, args, x.device, num_warps=w, num_stages=stages, key=key)


def configs(m: int) -> list[tuple[int, int, int, int]]:
    """Configurations timed at ``m`` rows (programs of more rows than a third of M are left out)."""
    return [c for c in itertools.product(ROWS, WARPS, STAGES, UNROLL) if 3 * c[0] <= m]


SPLIT_M = (64, 256, 1024, 2048)
SPLIT_PROGRAMS = (1, 2, 4, 8)  # programs per SM the split form's chunks aim at


def run_split(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int, chunks: int) -> None:
    """The split form's two launches with ``chunks`` column chunks (``s`` a view of (1 + chunks) M floats)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    for phase in (1, 2):
        grid, args, key, w = tq.tile_launch(x, q, s, group, tq.MODE_INT8, 127.0, 0, 0, tq.DOT_ROWS_MIN, 4,
                                            tq.ROT_UNROLL, chunks, phase)
        tq._ACT_TILES(grid, args, x.device, num_warps=w, num_stages=tq.ROT_STAGES, key=key)


def _pairs(m: int, k: int, extra: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(bf16 rows, int8 codes, row scales with ``extra`` floats after them) sets cycled past L2; the first rows
    10x larger (outliers against the others' scale)."""
    from comfyquant.runtime.kernels.scratch import row_scales

    n = max(2, min(64, L2_PAST // (m * k * 2)))
    return [(torch.randn(m, k, device="cuda").bfloat16() * (1 + 10 * (i == 0)),
             torch.empty((m, k), dtype=torch.int8, device="cuda"), row_scales(m, extra, "cuda")) for i in range(n)]


def _baselines(pairs: list, g: int) -> dict[str, float]:
    """GPU µs of the unrotated block kernel, the row kernel and today's pick ("auto") on ``pairs``."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq

    return {name: graph_time_us(lambda x, q, s, grp=grp, kern=kern: tq.quantize_rows_int8(x, grp, kernel=kern),
                                pairs)
            for name, grp, kern in (("plain_blocks", None, "blocks"), ("rows", g, "rows"), ("auto", g, "auto"))}


def split_rows(ms: list[int], ks: list[int], g: int) -> tuple[list[dict], dict]:
    """Rows too few for the tile kernel: the row kernel, "auto" and the split form at several chunk counts
    (codes and scales compared with the tile kernel's), GPU time."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.scratch import row_scales

    out, mismatches = [], {}
    for k in ks:
        for m in ms:
            chunk_set = sorted({tq.split_chunks(m, k, g, 132, p) for p in SPLIT_PROGRAMS})
            pairs = _pairs(m, k, m * max(chunk_set))
            want_q, want_s = tq.quantize_rows_int8(pairs[0][0], g, kernel="tiles")
            row: dict = {"m": m, "k": k, "group": g, "pick": tq.pick_kernel(pairs[0][0], g, tq.MODE_INT8),
                         "chunks": tq.split_chunks(m, k, g, 132), "us": _baselines(pairs, g)}
            for c in chunk_set:
                q, s = torch.empty_like(want_q), row_scales(m, m * c, "cuda")
                run_split(pairs[0][0], q, s, g, c)
                off = int((q != want_q).sum()) + int((s != want_s).sum())
                if off:
                    mismatches[f"{m}x{k} split {c}"] = off
                row["us"][f"split{c}"] = graph_time_us(lambda x, q, s, c=c: run_split(x, q, s, g, c), pairs)
            out.append(row)
            best = min((v, c) for c, v in row["us"].items() if c.startswith("split"))
            print(f"M={m:5} K={k:5} plain {row['us']['plain_blocks']:6.1f} rows {row['us']['rows']:7.1f} auto "
                  f"{row['us']['auto']:7.1f} ({row['pick']}, {row['chunks']} chunks) best {best[1]} {best[0]:7.1f} us "
                  f"= {row['us']['rows'] / best[0]:.2f}x rows, {best[0] / row['us']['plain_blocks']:.2f}x plain",
                  flush=True)
            del pairs
            torch.cuda.empty_cache()
    return out, mismatches


HELD_M = (64, 256, 1024, 2048, 4096, 16384)
HELD_K = (1280, 3072, 5120, 12288, 15360)
HELD_CONFIGS = ((16, 1, 4), (16, 2, 4), (16, 2, 8), (64, 1, 4), (64, 1, 8), (64, 2, 8))  # (rows, groups, warps)


def run_held(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cfg: tuple[int, int, int]) -> None:
    """One launch of the one-read rotating kernel (group 256) with ``cfg`` = (rows, groups held, warps)."""
    from comfyquant.runtime.kernels import scratch
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.launch import stream_id

    rows, held, warps = cfg
    sync = scratch.split_workspace(x.device).counters(stream_id(x.device))
    grid, args, key, w = tq.held_launch(x, q, s, sync, 127.0, 0, 0, rows, held, warps)
    tq._ACT_HELD(grid, args, x.device, num_warps=w, num_stages=1, key=key)


def held_rows(ms: list[int], ks: list[int]) -> tuple[list[dict], dict]:
    """The one-read kernel's configurations against the baselines and the tile kernel at 16 / 64 rows per
    program (codes and scales compared with the tile kernel's), GPU time."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.scratch import row_scales

    out, mismatches = [], {}
    for k in ks:
        for m in ms:
            pairs = _pairs(m, k, m * tq.held_parts(k, 1))
            want_q, want_s = tq.quantize_rows_int8(pairs[0][0], 256, kernel="tiles")
            row: dict = {"m": m, "k": k, "group": 256, "pick": tq.pick_kernel(pairs[0][0], 256, tq.MODE_INT8),
                         "us": _baselines(pairs, 256)}
            for rows in (16, 64):
                if 2 * rows <= m:
                    row["us"][f"tiles{rows}"] = graph_time_us(
                        lambda x, q, s, r=rows: run_tiles(x, q, s, 256, (r, 4, tq.ROT_STAGES, tq.ROT_UNROLL)), pairs)
            for cfg in HELD_CONFIGS:
                if cfg[0] > 2 * m:
                    continue
                q, s = torch.empty_like(want_q), row_scales(m, m * tq.held_parts(k, cfg[1]), "cuda")
                run_held(pairs[0][0], q, s, cfg)
                off = int((q != want_q).sum()) + int((s != want_s).sum())
                if off:
                    mismatches[f"{m}x{k} held {cfg}"] = off
                row["us"][f"held{cfg}"] = graph_time_us(lambda x, q, s, cfg=cfg: run_held(x, q, s, cfg), pairs)
            out.append(row)
            best = min((v, c) for c, v in row["us"].items() if c.startswith("held"))
            print(f"M={m:5} K={k:5} plain {row['us']['plain_blocks']:6.1f} auto {row['us']['auto']:7.1f} "
                  f"({row['pick']}) tiles16 {row['us'].get('tiles16', 0):7.1f} tiles64 {row['us'].get('tiles64', 0):7.1f}"
                  f" best {best[1]} {best[0]:7.1f} us = {row['us']['auto'] / best[0]:.2f}x auto, "
                  f"{best[0] / row['us']['plain_blocks']:.2f}x plain", flush=True)
            del pairs
            torch.cuda.empty_cache()
    return out, mismatches


def tile_rows(ms: list[int], ks: list[int], g: int) -> tuple[list[dict], dict]:
    """The unsplit tile kernel's launch configurations (:func:`configs`) against the baselines (codes and
    scales compared with the default configuration's), GPU time."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq

    out, mismatches = [], {}
    for k in ks:
        for m in ms:
            pairs = _pairs(m, k, 0)
            want_q, want_s = tq.quantize_rows_int8(pairs[0][0], g, kernel="tiles")
            row: dict = {"m": m, "k": k, "group": g, "us": _baselines(pairs, g),
                         "default": str((tq.dot_rows(m, 132), 4, 2, 1))}
            for cfg in configs(m):
                q, s = torch.empty_like(want_q), torch.empty_like(want_s)
                try:
                    run_tiles(pairs[0][0], q, s, g, cfg)
                except Exception as e:  # recorded: a configuration that does not compile (shared memory)
                    row["us"][str(cfg)] = None
                    print(f"M={m} K={k} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                off = int((q != want_q).sum()) + int((s != want_s).sum())
                if off:
                    mismatches[f"{m}x{k} {cfg}"] = off
                row["us"][str(cfg)] = graph_time_us(lambda x, q, s, cfg=cfg: run_tiles(x, q, s, g, cfg), pairs)
            timed = [(v, c) for c, v in row["us"].items() if c.startswith("(") and v is not None]
            best = min(timed, default=(float("nan"), ""))
            row["best"], row["best_us"] = best[1], best[0]
            row["tb_s"] = {c: m * k * 3 / v / 1e6 for c, v in row["us"].items() if v}
            out.append(row)
            print(f"M={m:5} K={k:5} plain {row['us']['plain_blocks']:7.1f} rows {row['us']['rows']:7.1f} auto "
                  f"{row['us']['auto']:7.1f} best {best[1]} {best[0]:7.1f} us ({row['tb_s'].get(best[1], 0):.2f} "
                  f"TB/s) = {row['us']['auto'] / best[0]:.2f}x auto, {best[0] / row['us']['plain_blocks']:.2f}x plain",
                  flush=True)
            del pairs
            torch.cuda.empty_cache()
    return out, mismatches


GROWS_M = (4096, 16384, 1024, 256)  # the sweep's rows first (a step cut short keeps them)
GROWS_K = (3072, 5120, 12288, 13824, 15360)


def grows_configs(k: int) -> list[tuple[int, bool, int, int, int, int]]:
    """The group-rows kernel's configurations timed on rows ``k`` wide, each (groups per step, one pass, warps,
    programs per SM (0: a row per program), pipeline stages, rows per tile): its default (a row per program), the
    same with 8 warps, and programs striding over the rows (the Hadamard loaded once a program) unpipelined and
    with the next row's loads pipelined 2 / 3 deep (77 / 110 KB of shared memory at 64 groups: two programs an
    SM); rows of 32 groups or fewer also with more programs an SM (6, 8; 8 at 2 warps) or a deeper pipeline (4 at
    four an SM): the 3,072-column pass was still 1.7x the plain one at 4,096 rows (run 146), and the configurations
    tried before it left it latency-bound (24 KB of shared memory a program at 3 stages). Rows per tile is always
    1: the packed forms (``64 // groups`` short rows to one 64-row tile, striding / a pack a program) ran
    1.01-1.38x / 1.22-1.78x the time of the two-warp one-row form the schedule takes in H200 runs 147-148 and were
    removed; the element stays so the configurations read as the recorded runs' do."""
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.configs import cdiv

    gb, one, warps = tq.group_rows_config(k)
    per_sm = 2 if gb >= 64 else 4
    out = [(gb, one, warps, 0, 1, 1), (gb, one, 8, 0, 1, 1), (gb, one, warps, per_sm + 1, 1, 1),
           (gb, one, warps, per_sm, 2, 1), (gb, one, warps, per_sm, 3, 1)]
    if 2 * cdiv(k, 256) <= tq.GROWS_ONE_MAX:
        out += [(gb, one, warps, 6, 3, 1), (gb, one, warps, 8, 3, 1), (gb, one, warps, 4, 4, 1),
                (gb, one, 2, 8, 3, 1)]
    return out


def run_grows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cfg: tuple[int, bool, int, int, int, int]) -> None:
    """One launch of the group-rows rotating kernel (group 256, int8) with ``cfg`` (:func:`grows_configs`; rows per
    tile other than 1 refused: the packed forms were removed)."""
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.launch import device_facts

    gb, one, warps, per_sm, stages, rp = cfg
    if rp != 1:
        raise ValueError(f"rows per tile {rp}: the group-rows kernel takes one row a tile (packed forms removed)")
    programs = per_sm * device_facts(x.device)[0] if per_sm else None
    grid, args, key, w = tq.group_rows_launch(x, q, s, tq.MODE_INT8, 127.0, 0, 0, (gb, one, warps), programs)
    tq._ACT_GROWS(grid, args, x.device, num_warps=w, num_stages=stages, key=key)


def grows_rows(ms: list[int], ks: list[int], save=None) -> tuple[list[dict], dict]:
    """The group-rows kernel's configurations against the block kernel, "auto", the tile kernel's launch (its
    codes are the reference) and the one-read kernel where it applies, GPU time; ``save(rows, mismatches)`` after
    each shape (a step cut short by its time limit keeps what it timed)."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.scratch import row_scales

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out, mismatches = [], {}
    for m in ms:  # row counts in the order given (the sweep's first), every width at each
        for k in ks:
            pairs = _pairs(m, k, m * tq.held_parts(k, 1))
            want_q, want_s = tq.quantize_rows_int8(pairs[0][0], 256, kernel="tiles")
            tile_cfg = tq.rot_tile_config(m, sms)
            us = {"plain_blocks": graph_time_us(lambda x, q, s: tq.quantize_rows_int8(x, kernel="blocks"), pairs),
                  "auto": graph_time_us(lambda x, q, s: tq.quantize_rows_int8(x, 256, kernel="auto"), pairs),
                  "tiles": graph_time_us(lambda x, q, s, c=tile_cfg: run_tiles(x, q, s, 256, c), pairs)}
            before_kernel = tq.pick_kernel(pairs[0][0], 256, tq.MODE_INT8, grows=False)
            us["before"] = graph_time_us(lambda x, q, s, b=before_kernel: tq.quantize_rows_int8(x, 256, kernel=b),
                                         pairs)
            if tq.held_apply(pairs[0][0], 256, tq.MODE_INT8):
                us["held"] = graph_time_us(lambda x, q, s: tq.quantize_rows_int8(x, 256, kernel="held"), pairs)
            for cfg in grows_configs(k):
                q, s = torch.empty_like(want_q), row_scales(m, 0, "cuda")
                run_grows(pairs[0][0], q, s, cfg)
                off = int((q != want_q).sum()) + int((s != want_s).sum())
                if off:
                    mismatches[f"{m}x{k} grows {cfg}"] = off
                us[f"grows{cfg}"] = graph_time_us(lambda x, q, s, cfg=cfg: run_grows(x, q, s, cfg), pairs)
            out.append({"m": m, "k": k, "group": 256, "pick": tq.pick_kernel(pairs[0][0], 256, tq.MODE_INT8),
                        "pick_before": before_kernel, "us": us})
            best = min((v, c) for c, v in us.items() if c.startswith("grows"))
            before = us["before"]
            print(f"M={m:5} K={k:5} plain {us['plain_blocks']:6.1f} tiles {us['tiles']:7.1f} held "
                  f"{us.get('held', 0):7.1f} auto {us['auto']:7.1f} ({out[-1]['pick']}) best {best[1]} "
                  f"{best[0]:7.1f} us = {before / best[0]:.2f}x the pick before ({before_kernel} {before:.1f}), "
                  f"{best[0] / us['plain_blocks']:.2f}x plain", flush=True)
            del pairs
            torch.cuda.empty_cache()
            if save is not None:
                save(out, mismatches)
    return out, mismatches


BACK_M = (4096, 16384)


def back_rows(ms: list[int], ks: list[int], g: int) -> tuple[list[dict], dict]:
    """The tile kernel's default configuration forward and with ``back`` (codes compared with the forward's),
    against the unrotated block kernel, GPU time."""
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq

    out, mismatches = [], {}
    for k in ks:
        for m in ms:
            pairs = _pairs(m, k, 0)
            cfg = tq.rot_tile_config(m, torch.cuda.get_device_properties(0).multi_processor_count)
            want_q, want_s = torch.empty_like(pairs[0][1]), torch.empty_like(pairs[0][2])
            run_tiles(pairs[0][0], want_q, want_s, g, cfg, back=False)  # (the launch's default walks back)
            q, s = torch.empty_like(want_q), torch.empty_like(want_s)
            run_tiles(pairs[0][0], q, s, g, cfg, back=True)
            off = int((q != want_q).sum()) + int((s != want_s).sum())
            if off:
                mismatches[f"{m}x{k} back"] = off
            us = {"plain_blocks": _baselines(pairs, g)["plain_blocks"]}
            for name, back in (("forward", False), ("back", True)):
                us[name] = graph_time_us(lambda x, q, s, back=back, cfg=cfg: run_tiles(x, q, s, g, cfg, back), pairs)
            out.append({"m": m, "k": k, "group": g, "config": str(cfg), "us": us})
            print(f"M={m:5} K={k:5} {cfg}: plain {us['plain_blocks']:7.1f} forward {us['forward']:7.1f} back "
                  f"{us['back']:7.1f} us = {us['forward'] / us['back']:.2f}x faster, {us['back'] / us['plain_blocks']:.2f}x "
                  f"plain", flush=True)
            del pairs
            torch.cuda.empty_cache()
    return out, mismatches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--k", default=",".join(map(str, K_VALUES)))
    p.add_argument("--group", type=int, default=256)
    p.add_argument("--split", action="store_true", help="the split form at M = 64 .. 2048 instead (one call)")
    p.add_argument("--held", action="store_true", help="the one-read kernel at M = 64 .. 16,384 instead")
    p.add_argument("--back", action="store_true", help="the codes pass from the row's end against forward")
    p.add_argument("--grows", action="store_true", help="the group-rows kernel at M = 256 .. 16,384 instead")
    a = p.parse_args()
    from comfyquant.bench.timing import run_record

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ks = [int(v) for v in a.k.split(",")]
    if a.grows:
        def save(rows: list[dict], bad: dict) -> None:
            (a.out / "rotation_grows.json").write_text(json.dumps(run_record(t0, mismatches=bad, rows=rows),
                                                                  indent=1))

        rows, bad = grows_rows(list(GROWS_M) if a.m == p.get_default("m") else [int(v) for v in a.m.split(",")],
                               list(GROWS_K) if a.k == p.get_default("k") else ks, save)
    elif a.back:
        rows, bad = back_rows([int(v) for v in a.m.split(",")] if a.m != p.get_default("m") else list(BACK_M), ks,
                              a.group)
    elif a.held:
        rows, bad = held_rows(list(HELD_M), ks if a.k != p.get_default("k") else list(HELD_K))
    elif a.split:
        rows, bad = split_rows(list(SPLIT_M), ks, a.group)
    else:
        rows, bad = tile_rows([int(v) for v in a.m.split(",")], ks, a.group)
    res = run_record(t0, mismatches=bad, rows=rows)
    name = ("rotation_grows.json" if a.grows else "rotation_back.json" if a.back else "rotation_held.json" if a.held
            else "rotation_split.json" if a.split else "rotation_tiles.json")
    (a.out / name).write_text(json.dumps(res, indent=1))
    what = "configurations whose codes differ from the default's" if not (a.split or a.held) else \
        "configurations whose codes differ from the tile kernel's"
    print(f"done in {res['seconds']} s; {what}: {len(bad)}", flush=True)
    return 1 if bad and (a.split or a.held or a.back or a.grows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
