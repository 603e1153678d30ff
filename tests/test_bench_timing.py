"""The benchmarks' timer (CPU): candidates take turns, so a drift in the host's speed hits them alike."""

from __future__ import annotations

import time

from comfyquant.bench.timing import interleaved_ms


def test_interleaved_timing_survives_a_host_that_slows_down_mid_run() -> None:
    """Two functions of equal cost on a host that becomes 3x slower halfway: timed one after the other, the
    second looked 3x slower (what made SDXL's bf16 baseline 5.4 ms in one run and 3.3 in the next); in turns,
    their medians agree. A function that raises is reported by its error line, the others still timed."""
    state = {"calls": 0}

    def work() -> None:
        state["calls"] += 1
        time.sleep(0.001 if state["calls"] < 400 else 0.003)  # the host slows down after ~400 calls

    def broken() -> None:
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    out = interleaved_ms({"a": work, "b": work, "c": broken}, rounds=7, min_ms=40.0, sync=lambda: None)
    assert out["c"] == "RuntimeError: CUDA error: out of memory"
    assert isinstance(out["a"], float) and isinstance(out["b"], float)
    assert 0.8 < out["a"] / out["b"] < 1.25
    # one after the other (the old way): the same drift shows as a 2x+ difference
    state["calls"] = 0
    first = interleaved_ms({"a": work}, rounds=3, min_ms=40.0, sync=lambda: None)["a"]
    for _ in range(300):
        work()
    second = interleaved_ms({"b": work}, rounds=3, min_ms=40.0, sync=lambda: None)["b"]
    assert second / first > 2.0
