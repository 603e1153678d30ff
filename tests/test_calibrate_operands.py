"""The device calibration's timing operands (``calibrate._operands``), made in row chunks to bound the transient
at a model's first quantized call: every row of every operand written, with the formats' real codes."""

from __future__ import annotations

import pytest
import torch

from comfyquant.quant.int4 import unpack_int4
from comfyquant.runtime.kernels import calibrate


@pytest.mark.parametrize("chunk_rows", [64, 100_000])  # five chunks (the last partial), and one
def test_operands_every_row_written_in_chunks(monkeypatch: pytest.MonkeyPatch, chunk_rows: int) -> None:
    m, n, k = 4, 300, 192
    monkeypatch.setattr(calibrate, "CHUNK_BYTES", 4 * k * chunk_rows)
    o = calibrate._operands(m, n, k, torch.device("cpu"))
    assert set(o) == {"x", "q", "s", "ps", "qf", "sf", "wb", "p"}
    assert o["x"].shape == (m, k) and o["x"].dtype == torch.bfloat16
    q, s = o["q"], o["s"]
    assert q.shape == (n, k) and q.dtype == torch.int8 and s.shape == (n, 1) and o["ps"].shape == (n,)
    # per-row absmax quantization: every row reaches 127 in magnitude (an unwritten row would hold garbage)
    assert torch.equal(q.abs().amax(dim=1), torch.full((n,), 127, dtype=torch.int8))
    assert bool((s > 0).all()) and float(s.max()) < 0.2 / 127 * 2  # N(0, 0.02) rows: absmax ~0.06-0.1
    w = q.float() * s
    assert abs(float(w.std()) - 0.02) < 0.002
    wf = o["qf"].float() * o["sf"]
    assert bool(torch.isfinite(wf).all()) and abs(float(wf.std()) - 0.02) < 0.002
    # each row's fp8 codes are the same weight rows as the int8 ones (one master weight per chunk)
    rel = (wf - w).norm(dim=1) / w.norm(dim=1)
    assert float(rel.max()) < 0.1
    assert o["wb"].dtype == torch.bfloat16 and float(((o["wb"].float() - w).norm(dim=1) / w.norm(dim=1)).max()) < 0.02
    p = unpack_int4(o["p"])
    assert p.shape == (n, k) and int(p.min()) >= -7 and int(p.max()) <= 7
    assert int((p != 0).sum(dim=1).min()) > k // 2  # every row drawn (~14 of 15 values nonzero)


def test_operands_build_only_the_keys_asked() -> None:
    o = calibrate._operands(2, 96, 64, torch.device("cpu"), frozenset({"q", "s"}))
    assert set(o) == {"x", "q", "s"}
    o = calibrate._operands(2, 96, 64, torch.device("cpu"), frozenset({"qf", "sf"}))
    assert set(o) == {"x", "qf", "sf"} and o["sf"].dim() == 0


@pytest.mark.cpu_int8
def test_timed_calls_are_the_calibrations_calls_on_their_operands() -> None:
    """``timed_calls`` (the seam ``benchmarks/probe_host_floor.py`` times through): the paths' calls on operands
    built for those paths only, the same operands ``measure`` builds, each call reading them."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels.reference import int8_linear_ref

    cpu = torch.device("cpu")
    calls, o = calibrate.timed_calls((16, 256, 128), cpu, ("bf16", "torch"))
    assert set(calls) == {"bf16", "torch"} and set(o) == {"x", "wb", "q", "s"}
    assert torch.equal(o["q"], calibrate._operands(16, 256, 128, cpu)["q"])
    assert torch.equal(calls["bf16"](), F.linear(o["x"], o["wb"]))
    want = int8_linear_ref(o["x"], o["q"], o["s"], None, None, torch.bfloat16)
    assert torch.equal(calls["torch"](), want)
