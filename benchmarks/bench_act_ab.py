"""This tree's activation kernels against a saved copy of ``act_kernels.py`` (``--base``), in one process.

A kernel change is judged by its A/B on the same card in the same minutes: the H100s this project is lent move
10% with their power cap between runs. For each shape (rows x columns, bf16) and path (the rotating pass the
runtime picks for a convrot layer, group 256; the unrotated block kernel), both versions run on the same inputs,
their int8 codes and scales are compared bit for bit, and their GPU time (CUDA-graph replays, inputs cycled past
L2) is taken in alternating rounds, new then base, ``--rounds`` times; the medians and their ratio are printed
and saved as json. ``--ncu``: no timing, each version's launch twice per shape and path, for Nsight Compute to
profile (the printed order names them).

    python3 benchmarks/bench_act_ab.py --base /tmp/act_kernels_base.py --out results/
    ncu --clock-control none -k regex:_act_ python3 benchmarks/bench_act_ab.py --base ... --out ... --ncu
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

M_VALUES = (4096, 16384, 1024)
K_VALUES = (3072, 5120, 12288, 15360)
PATHS = {"rotated": (256, "auto"), "plain": (None, "blocks")}  # name -> (rotation group, activation kernel)
SWAPPED = {"_ACT": "_act_kernel", "_ACT_TILES": "_act_tile_kernel", "_ACT_BLOCKS": "_act_block_kernel",
           "_ACT_HELD": "_act_held_kernel", "_ACT_GROWS": "_act_group_rows_kernel"}


def load_base(path: Path) -> ModuleType:
    """The saved ``act_kernels.py`` at ``path`` as a module of its own (it imports only triton)."""
    spec = importlib.util.spec_from_file_location("act_kernels_base", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_act_ab: cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_kernels(base: ModuleType) -> dict[str, object]:
    """``triton_quant``'s kernel slots -> FastKernels of ``base``'s kernels, made once for the run (each keeps the
    kernels it compiles)."""
    from comfyquant.runtime.kernels.launch import FastKernel

    return {name: FastKernel(getattr(base, fn)) for name, fn in SWAPPED.items()}


@contextlib.contextmanager
def kernels_of(swap: dict[str, object] | None) -> Iterator[None]:
    """``triton_quant``'s kernels replaced by ``swap`` (:func:`base_kernels`) inside the block (None: this tree's,
    as they are)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    if swap is None:
        yield
        return
    saved = {name: getattr(tq, name) for name in swap}
    try:
        for name, k in swap.items():
            setattr(tq, name, k)
        yield
    finally:
        for name, k in saved.items():
            setattr(tq, name, k)


def _call(group: int | None, kernel: str):
    from comfyquant.runtime.kernels import triton_quant as tq

    return lambda x, q, s: tq.quantize_rows_int8(x, group, kernel=kernel)


def ab_rows(base: dict[str, object], ms: list[int], ks: list[int], rounds: int) -> tuple[list[dict], dict]:
    """Per shape and path: the pick, both versions' median GPU µs and their ratio; codes that differ."""
    from bench_rotation import _pairs

    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels import triton_quant as tq

    out, differ = [], {}
    for m in ms:
        for k in ks:
            pairs = _pairs(m, k, m * tq.held_parts(k, 1))
            for name, (group, kernel) in PATHS.items():
                op = _call(group, kernel)
                with kernels_of(base):
                    want_q, want_s = tq.quantize_rows_int8(pairs[0][0], group, kernel=kernel)
                got_q, got_s = tq.quantize_rows_int8(pairs[0][0], group, kernel=kernel)
                off = int((got_q != want_q).sum()) + int((got_s != want_s).sum())
                if off:
                    differ[f"{m}x{k} {name}"] = off
                new, old = [], []
                for _ in range(rounds):
                    new.append(graph_time_us(op, pairs))
                    with kernels_of(base):
                        old.append(graph_time_us(op, pairs))
                row = {"m": m, "k": k, "path": name, "pick": tq.pick_kernel(pairs[0][0], group, tq.MODE_INT8),
                       "new_us": statistics.median(new), "base_us": statistics.median(old), "new_rounds": new,
                       "base_rounds": old}
                row["speedup"] = row["base_us"] / row["new_us"]
                out.append(row)
                print(f"M={m:5} K={k:5} {name:7} ({row['pick']:5}) new {row['new_us']:7.1f} base "
                      f"{row['base_us']:7.1f} us = {row['speedup']:.3f}x{'  CODES DIFFER' if off else ''}",
                      flush=True)
            del pairs
            torch.cuda.empty_cache()
    return out, differ


def ncu_launches(base: dict[str, object], ms: list[int], ks: list[int]) -> None:
    """Each version's kernels twice per shape and path, in the printed order (for ``ncu -k regex:_act_``)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    for m in ms:
        for k in ks:
            x = torch.randn(m, k, device="cuda").bfloat16()
            for name, (group, kernel) in PATHS.items():
                for label, b in (("base", base), ("new", None)):
                    with kernels_of(b):
                        for _ in range(2):
                            tq.quantize_rows_int8(x, group, kernel=kernel)
                    torch.cuda.synchronize()
                    print(f"ncu order: M={m} K={k} {name} {label} "
                          f"({tq.pick_kernel(x, group, tq.MODE_INT8)}) x2", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the saved act_kernels.py to compare against")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--k", default=",".join(map(str, K_VALUES)))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ncu", action="store_true", help="launches for Nsight Compute only, no timing")
    a = p.parse_args()
    if not a.base.is_file():
        print(f"bench_act_ab: no file {a.base}", file=sys.stderr)
        return 2
    from comfyquant.bench.timing import run_record

    try:
        base = base_kernels(load_base(a.base))
    except (SyntaxError, ImportError, AttributeError) as e:  # not a kernels file: one line, no traceback
        print(f"bench_act_ab: {a.base} is not an act_kernels.py: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return 2
    ms, ks = [int(v) for v in a.m.split(",")], [int(v) for v in a.k.split(",")]
    if a.ncu:
        ncu_launches(base, ms, ks)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, differ = ab_rows(base, ms, ks, a.rounds)
    (a.out / "act_ab.json").write_text(json.dumps(run_record(t0, mismatches=differ, rows=rows), indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s; shapes whose codes differ: {len(differ)}", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
