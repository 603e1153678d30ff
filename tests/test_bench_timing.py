"""The benchmarks' timer (CPU): candidates take turns, so a drift in the host's speed hits them alike."""

from __future__ import annotations

import pytest

from comfyquant.bench.timing import interleaved_ms


def test_interleaved_timing_survives_a_host_that_slows_down_mid_run() -> None:
    """Two functions of equal cost on a host that becomes 3x slower after 400 calls (a simulated clock, so the
    test does not depend on this machine's load): timed one after the other, the second looks 3x slower (what
    made SDXL's bf16 baseline 5.4 ms in one run and 3.3 in the next); in turns, their medians agree. A function
    that raises is reported by its error line, the others still timed."""
    state = {"calls": 0, "now": 0.0}

    def work() -> None:
        state["calls"] += 1
        state["now"] += 0.001 if state["calls"] < 400 else 0.003  # the host slows down after 400 calls

    def broken() -> None:
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    def timed(fns: dict, rounds: int) -> dict:
        return interleaved_ms(fns, rounds=rounds, min_ms=40.0, sync=lambda: None, clock=lambda: state["now"])

    out = timed({"a": work, "b": work, "c": broken}, rounds=7)
    assert out["c"] == "RuntimeError: CUDA error: out of memory"
    # the slow calls happened (the last rounds), yet both medians are the fast time
    assert state["calls"] > 500 and out["a"] == pytest.approx(1.0) and out["b"] == pytest.approx(1.0)
    # one after the other (the old way): the same drift shows as a 3x difference
    state["calls"] = 0
    first = timed({"a": work}, rounds=3)["a"]
    for _ in range(300):
        work()
    assert first == pytest.approx(1.0) and timed({"b": work}, rounds=3)["b"] == pytest.approx(3.0)


def test_a_round_makes_at_least_min_calls_calls() -> None:
    """A slow call (50 ms against ``min_ms`` 12) still gets ``min_calls`` calls a round, so a per-round cost
    (the first call after a sync) is spread over as many calls as on fast layers."""
    state = {"calls": 0, "now": 0.0}

    def slow() -> None:
        state["calls"] += 1
        state["now"] += 0.05

    out = interleaved_ms({"slow": slow}, rounds=3, min_ms=12.0, sync=lambda: None, clock=lambda: state["now"],
                         min_calls=24)
    assert out["slow"] == pytest.approx(50.0)
    assert state["calls"] == 2 + 1 + 3 * 24  # warm-up, the sizing call, three rounds of 24


def test_run_record_names_the_run_then_the_scripts_fields() -> None:
    """``run_record``: the header every GPU bench script's json starts with (device, torch, date, command,
    seconds since its start), then the script's own fields in the order given."""
    import sys
    import time

    import torch

    from comfyquant.bench.timing import run_record

    rec = run_record(time.perf_counter() - 2.0, failures=3, rows=[{"m": 1}])
    assert list(rec) == ["device", "torch", "date", "command", "seconds", "failures", "rows"]
    assert rec["torch"] == torch.__version__ and rec["command"] == " ".join(sys.argv)
    assert rec["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert 2.0 <= rec["seconds"] < 60.0 and rec["failures"] == 3 and rec["rows"] == [{"m": 1}]
    assert rec["date"] == time.strftime("%Y-%m-%d")
