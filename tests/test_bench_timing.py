"""The benchmarks' timer (CPU): candidates take turns, so a drift in the host's speed hits them alike."""

from __future__ import annotations

import pytest

from comfyquant.bench.layers import Row, paired_speedup, speedup, target_counts
from comfyquant.bench.timing import interleaved_ms, interleaved_rounds, paired_ratio


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


def test_rounds_come_back_in_order_and_pair_under_a_drifting_host() -> None:
    """A host whose speed changes from round to round (1x, 1.25x, 1.5x the time, as far as run 128's floor moved
    from run 125's) and a function 3% dearer than the base: the rounds come back in order, one a round, each
    round's two timings under the same host state, so every round's own ratio reads 1 / 1.03 and so does their
    median. (Where the drift is not shared alike within a round, the paired median and the ratio of the medians
    part: the next test.)"""
    state = {"now": 0.0, "syncs": 0}
    factors = (1.0, 1.25, 1.5)

    def make(cost_ms: float):
        def fn() -> None:  # two syncs a function before the rounds (warm-up, sizing), then one a function a round
            rnd = max(0, (state["syncs"] - 4) // 2)
            state["now"] += cost_ms * 1e-3 * factors[min(rnd, 2)]
        return fn

    base, dear = make(1.0), make(1.03)

    def sync() -> None:
        state["syncs"] += 1

    out = interleaved_rounds({"bf16": base, "int8": dear}, rounds=3, min_ms=10.0, sync=sync,
                             clock=lambda: state["now"], min_calls=4)
    b, t = out["bf16"], out["int8"]
    assert len(b) == len(t) == 3 and b[0] == pytest.approx(1.0) and b[2] == pytest.approx(1.5)
    assert paired_ratio(b, t) == pytest.approx(1 / 1.03)
    assert [x / y for x, y in zip(b, t, strict=True)] == pytest.approx([1 / 1.03] * 3)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_ratio(b, t[:2])


def test_the_paired_target_line_counts_rows_by_their_rounds() -> None:
    """The sweep's target lines: a host-bound row whose rounds drift (bf16 14 / 16 / 15 µs, auto 14.3 / 15.2 /
    15.9 µs: medians 15.0 / 15.2, 0.987x; paired 0.979 / 1.053 / 0.943 -> 0.979x) and one that misses in every
    round; rows recorded before rounds were kept count in the plain lines only."""
    drifting = Row("sdxl", "attn640", 4096, 640, 640, us={"bf16": 15.0, "auto": 15.2},
                   rounds_us={"bf16": [14.0, 16.0, 15.0], "auto": [14.3, 15.2, 15.9]})
    missing = Row("clip_l", "fc2", 1024, 3072, 768, us={"bf16": 14.0, "auto": 16.0},
                  rounds_us={"bf16": [14.0, 14.1, 13.9], "auto": [16.0, 16.2, 15.8]})
    old = Row("clip_l", "fc1", 1024, 768, 3072, us={"bf16": 14.0, "auto": 14.0})
    assert paired_speedup(drifting, "auto") == pytest.approx(14.0 / 14.3)
    assert paired_speedup(old, "auto") is None
    lines = target_counts([drifting, missing, old])
    assert "auto >= 0.97x bf16 eager: 2/3 rows" in lines
    assert "auto >= 0.97x bf16 eager, paired by round: 1/2 rows" in lines
    assert not any(ln.startswith("auto_copy") and "paired" in ln for ln in lines)


def test_module_columns_are_read_against_nn_linear() -> None:
    """Issue 12 defines its floor against bf16 ``nn.Linear``: a ``QuantLinear`` column counts against the
    ``nn.Linear`` column of its row, not the bare ``F.linear`` one. Here a copied layer (``auto_copy``) misses the
    ``F.linear`` bar (15.0 / 15.6 = 0.96x) but meets the module bar (15.8 / 16.1 = 0.98x)."""
    row = Row("sdxl", "attn640", 4096, 640, 640,
              us={"bf16": 15.0, "auto_copy": 15.6, "bf16_module": 15.8, "auto_copy_module": 16.1},
              rounds_us={"bf16": [15.0, 15.0, 15.0], "auto_copy": [15.6, 15.6, 15.6],
                         "bf16_module": [15.8, 15.8, 15.8], "auto_copy_module": [16.1, 16.1, 16.1]})
    assert speedup(row, "auto_copy_module") == pytest.approx(15.8 / 16.1)
    assert speedup(row, "bf16_module") == pytest.approx(15.0 / 15.8)  # nn.Linear's own cost over F.linear
    assert paired_speedup(row, "auto_copy_module") == pytest.approx(15.8 / 16.1)
    lines = target_counts([row])
    assert "auto_copy >= 0.97x bf16 eager: 0/1 rows" in lines
    assert "auto_copy_module >= 0.97x bf16 nn.Linear eager: 1/1 rows" in lines
    assert "auto_copy_module >= 0.97x bf16 nn.Linear eager, paired by round: 1/1 rows" in lines
    assert not any(ln.startswith("auto_module") for ln in lines)  # no such column in the row: no line


@pytest.mark.cpu_int8
def test_module_columns_compute_the_layer() -> None:
    """The sweep's module ops (one module per weight set, made on first use) give the layer's product: the
    ``nn.Linear`` exactly ``F.linear``'s, the int8 ``QuantLinear`` (plain and with a copy budget) within int8's
    error of the float64 product; a second call reuses the module made for that weight set."""
    torch = pytest.importorskip("torch")
    from comfyquant.bench.layers import _nn_linear, _per_set, _quant_linear
    from comfyquant.runtime.kernels import dispatch
    from comfyquant.runtime.kernels.dense_copy import CopyBudget

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=gen) * 0.02).bfloat16()
    b = torch.randn(48, generator=gen).bfloat16()
    wset = (w, None, None, None, None, None, None, b)
    x = torch.randn(8, 64, generator=gen).bfloat16()
    ref = x.double() @ w.double().T + b.double()
    made: list = []

    def counting(make):
        def wrapped(ws):
            made.append(ws)
            return make(ws)
        return wrapped

    lin = _per_set(counting(_nn_linear))
    assert torch.equal(lin(x, wset), torch.nn.functional.linear(x, w, b))
    lin(x, wset)
    assert len(made) == 1
    for backend in (None, dispatch.DispatchPolicy(copies=CopyBudget(1 << 40))):
        y = _per_set(_quant_linear(backend))(x, wset)
        assert y.dtype == torch.bfloat16 and y.shape == (8, 48)
        err = (y.double() - ref).abs().max().item()
        assert err < 0.02 * ref.abs().max().item(), err
