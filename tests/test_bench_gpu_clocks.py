"""The clock sampler beside the profiles: nvidia-smi's stamped lines parsed, and each timing window given the
samples stamped inside it (an executable printing nvidia-smi's query format stands in for the driver's tool,
whose output here is read through a real pipe and process)."""

from __future__ import annotations

import stat
import time
from datetime import datetime
from pathlib import Path

import pytest

from comfyquant.bench.gpu_clocks import ClockSampler, parse_line, summarize


def test_parse_line_reads_the_stamp_and_three_numbers() -> None:
    v = parse_line("2026/12/07 06:20:01.125, 1980, 612.35, 54\n")
    assert v is not None
    assert v[0] == pytest.approx(datetime(2026, 12, 7, 6, 20, 1, 125000).timestamp())
    assert v[1:] == (1980.0, 612.35, 54.0)
    assert parse_line("timestamp, clocks.sm [MHz], power.draw [W], temperature.gpu") is None
    assert parse_line("2026/12/07 06:20:01.125, [N/A], 612.35, 54") is None
    assert parse_line("1980, 612.35, 54") is None


def test_summarize_means_and_peaks() -> None:
    s = summarize([(0.0, 1980.0, 600.0, 50.0), (1.0, 1780.0, 700.0, 55.0)])
    assert s == {"samples": 2, "sm_mhz": 1880.0, "power_w": 650.0, "power_max_w": 700.0, "temp_c": 55.0}
    assert summarize([])["sm_mhz"] is None


def _fake_smi(tmp_path: Path, mhz: str) -> Path:
    """An executable that prints nvidia-smi's ``--format=csv,noheader,nounits`` lines every 10 ms, with the SM
    clock read from the file ``mhz`` (so a test can change it between windows). It stamps a line after reading
    the clock, so a line never carries a value read after its stamp."""
    exe = tmp_path / "fake-smi"
    exe.write_text("#!/usr/bin/env python3\n"
                   "import sys, time\nfrom datetime import datetime\n"
                   f"path = {mhz!r}\n"
                   "while True:\n"
                   "    mhz = open(path).read().strip()\n"  # read, then stamp: a sample is never stamped before
                   "    now = datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]\n"  # the value it carries
                   "    print(f'{now}, {mhz}, 500.0, 40', flush=True)\n"
                   "    time.sleep(0.01)\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_windows_get_the_samples_stamped_inside_them(tmp_path: Path) -> None:
    mhz = tmp_path / "mhz"
    mhz.write_text("1980")
    exe = _fake_smi(tmp_path, str(mhz))
    with ClockSampler(command=str(exe)) as cs:
        _, fast = cs.window(lambda: time.sleep(0.4))
        # nvidia-smi's stamps (and the fake's) are whole milliseconds, truncated: a sample read within a millisecond
        # after the window's end can carry a stamp inside it, so the clock changes only after that millisecond
        # (changed at once, the first window got a 1500 MHz sample twice in fresh-clone runs: 1965 against 1980)
        time.sleep(0.01)
        mhz.write_text("1500")
        time.sleep(0.1)  # a sample in flight at the switch falls between the windows
        out, slow = cs.window(lambda: time.sleep(0.4) or 7)
    assert out == 7
    a, b = fast.summary(), slow.summary()
    assert a["samples"] >= 10 and b["samples"] >= 10
    assert a["sm_mhz"] == pytest.approx(1980.0) and b["sm_mhz"] == pytest.approx(1500.0)
    assert cs.reason == ""


def test_a_missing_tool_gives_empty_windows_and_a_reason(tmp_path: Path) -> None:
    with ClockSampler(command=str(tmp_path / "no-such-smi")) as cs:
        _, w = cs.window(lambda: None)
    assert w.summary()["samples"] == 0 and "not found" in cs.reason


def test_a_tool_that_prints_nothing_is_said(tmp_path: Path) -> None:
    exe = tmp_path / "silent-smi"
    exe.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with ClockSampler(command=str(exe)) as cs:
        _, w = cs.window(lambda: time.sleep(0.05))
    assert w.summary()["samples"] == 0
    assert cs.reason.startswith(f"{exe} gave no sample") and "NVIDIA-SMI has failed" in cs.reason
