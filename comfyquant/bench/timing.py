"""Wall-time measurement shared by the benchmarks: candidates timed in turns, and the record of a run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def run_record(t0: float, **fields: Any) -> dict[str, Any]:
    """A benchmark script's result file: the device, torch, the date, its command line and the seconds since
    ``t0`` (``time.perf_counter``), then ``fields`` (its rows, its failure counts) in the order given."""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "seconds": round(time.perf_counter() - t0, 1), **fields}


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int = 7, min_ms: float = 40.0,
                       sync: Callable[[], None] = torch.cuda.synchronize,
                       clock: Callable[[], float] = time.perf_counter,
                       min_calls: int = 2) -> dict[str, list[float] | str]:
    """Per function: each round's (wall time of back-to-back calls, synchronized) / calls in ms, in round order,
    the functions taking turns within each round (forward, then backward order): round ``r`` of two functions ran
    under the same host state, so their ratio is a paired one (:func:`paired_ratio`). Timing one variant after
    another let the host's speed drift between them: the same run once gave SDXL's bf16 5.4 ms and its unfolded int8
    3.3 ms. A function that raises (RuntimeError / ValueError) gets its one-line error instead of a time.
    ``sync`` waits for the device's queued work (CUDA's by default); ``clock`` reads seconds.

    A round makes at least ``min_calls`` calls (the layer sweep asks for 24): at 16,384 rows a layer call takes
    0.7-1.7 ms, so ``min_ms`` = 12 gave rounds of 7-13 calls, and the rotated and int4 columns read 0.84x / 0.86x
    of what rounds of 35-66 calls (and a profiler's GPU time) gave on the same machine (H200, 2026-12-04, run
    70)."""
    out: dict[str, list[float] | str] = {}
    calls: dict[str, int] = {}
    with torch.no_grad():
        for name, fn in fns.items():
            try:
                for _ in range(2):
                    fn()
                sync()
                t = clock()
                fn()
                sync()
            except (RuntimeError, ValueError) as e:  # recorded in the table, never hidden
                out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            calls[name] = max(2, min_calls, int(min_ms / max((clock() - t) * 1e3, 1e-3)))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
                fn, n = fns[name], calls[name]
                t = clock()
                for _ in range(n):
                    fn()
                sync()
                times[name].append((clock() - t) * 1e3 / n)
    out.update(times)
    return out


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count), as every timing here takes it."""
    return sorted(values)[len(values) // 2]


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int = 7, min_ms: float = 40.0,
                   sync: Callable[[], None] = torch.cuda.synchronize,
                   clock: Callable[[], float] = time.perf_counter,
                   min_calls: int = 2) -> dict[str, float | str]:
    """Per function: the median over rounds of :func:`interleaved_rounds`' times (ms per call), or its error
    line."""
    got = interleaved_rounds(fns, rounds, min_ms, sync, clock, min_calls)
    return {name: v if isinstance(v, str) else median(v) for name, v in got.items()}


def paired_ratio(base: list[float], other: list[float]) -> float:
    """The median over rounds of ``base[r] / other[r]`` (a speed-up of ``other`` over ``base`` when both are
    times): each round's two timings shared the host's state, so a drift between rounds cancels out of each
    pair, where it does not out of the ratio of the two medians."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired rounds need equal, non-empty counts, got {len(base)} and {len(other)}")
    return median([b / o for b, o in zip(base, other, strict=True)])
