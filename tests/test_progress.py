"""Progress output: a tqdm bar on a terminal, plain lines in a redirected stderr, nothing for quick work;
the converter, eval and demo report where they are."""

from __future__ import annotations

import io
import os
import pty

import torch
from convert_helpers import flux_like, write

import comfyquant
from comfyquant.progress import Progress


class Clock:
    """A clock the test moves by hand (no sleeps)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_mode_prints_after_the_delay_every_interval_and_at_the_end():
    buf, clock = io.StringIO(), Clock()
    p = Progress(mode="lines", prog="comfyquant", stream=buf, delay=2.0, interval=10.0, clock=clock)
    with p.task("convert", 300, "tensors", total_bytes=300 * 2**20) as t:
        for _ in range(300):
            clock.t += 0.125
            t.update(1, 2**20)
    lines = buf.getvalue().splitlines()
    # nothing in the first 2 s, then a line at 2 s, one every 10 s (12, 22, 32 s) and one at the end (37.5 s)
    assert len(lines) == 5, lines
    assert all("\r" not in x and x.startswith("comfyquant: convert: ") for x in lines)
    assert lines[0] == "comfyquant: convert: 16/300 tensors, 16.0 MiB of 300.0 MiB, 8 MB/s, 2 s so far"
    assert lines[1].startswith("comfyquant: convert: 96/300 tensors")
    assert lines[-1] == "comfyquant: convert: 300/300 tensors, 300.0 MiB of 300.0 MiB, 8 MB/s in 37.5 s"
    buf = io.StringIO()
    with Progress(mode="lines", stream=buf, delay=0, interval=0, clock=clock).task("sampling 1/2", 20, "steps") as t:
        clock.t += 4.0
        t.update()
    assert buf.getvalue().splitlines()[0] == "comfyquant: sampling 1/2: 1/20 steps, 0.2 steps/s, 4 s so far"


def test_quick_work_prints_nothing_and_off_prints_no_progress():
    for mode in ("lines", "bar", "off"):
        buf, clock = io.StringIO(), Clock()
        p = Progress(mode=mode, stream=buf, clock=clock)
        with p.task("convert", 5, "tensors") as t:
            for _ in range(5):
                clock.t += 0.1
                t.update()
        if mode == "off":
            p.stage("quantizing")
        assert buf.getvalue() == "", mode
    buf = io.StringIO()
    Progress(mode="off", prog="comfyquant", stream=buf).warn("--model sdxl does not fit\nthis file")
    assert buf.getvalue() == "comfyquant: warning: --model sdxl does not fit this file\n"  # warnings always


def test_auto_is_a_bar_on_a_terminal_and_lines_otherwise():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert Progress(stream=tty).style == "bar"
    finally:
        os.close(master)
        os.close(slave)
    r, w = os.pipe()
    try:
        with os.fdopen(w, "w", closefd=False) as pipe:
            assert Progress(stream=pipe).style == "lines"
    finally:
        os.close(r)
        os.close(w)
    assert Progress(stream=io.StringIO()).style == "lines"


def test_converter_reports_counts_bytes_and_rate(tmp_path):
    src = write(tmp_path / "in.safetensors", flux_like(torch.bfloat16))
    buf = io.StringIO()
    report = comfyquant.convert(src, tmp_path / "o.safetensors",
                                progress=Progress(mode="lines", stream=buf, delay=0.0, interval=0.0))
    lines = buf.getvalue().splitlines()
    n = len(report.layers)
    assert len(lines) == n + 1  # interval 0: a line per tensor, then the closing line
    assert lines[-1].startswith(f"comfyquant: convert: {n}/{n} tensors, ") and " MB/s in " in lines[-1]
    bar = io.StringIO()
    comfyquant.convert(src, tmp_path / "o.safetensors", force=True,
                       progress=Progress(mode="bar", stream=bar, delay=0.0))
    assert "convert: 100%" in bar.getvalue() and f"{n}/{n} tensors" in bar.getvalue()
