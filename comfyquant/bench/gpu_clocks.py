"""The GPU's SM clock and power draw while a benchmark runs, read from ``nvidia-smi`` in the background.

Two runs of the same kernel on the same shapes can differ by the data they read (tensor cores toggle more bits on
high-entropy operands and a card at its power limit lowers its clock), so a timing that differs where the code
does not needs the clock beside it. ``nvidia-smi --query-gpu ... -lms`` prints a sample every few ms with its own
wall-clock stamp (its output may arrive in buffered chunks); each window of :class:`ClockSampler` gets the samples
stamped inside it, read once the sampler has stopped.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu"
T = TypeVar("T")
Sample = tuple[float, float, float, float]  # (epoch seconds, SM MHz, watts, °C)


def parse_line(line: str) -> Sample | None:
    """``"2026/12/07 06:20:01.123, 1980, 612.35, 54"`` -> (epoch seconds in local time, 1980.0, 612.35, 54.0);
    None for a line that is not a stamp and three numbers (a header, ``[N/A]``)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        return None


def summarize(samples: list[Sample]) -> dict[str, float | int | None]:
    """Mean SM clock, mean and peak power, peak temperature and the sample count (None where there is none)."""
    if not samples:
        return {"samples": 0, "sm_mhz": None, "power_w": None, "power_max_w": None, "temp_c": None}
    n = len(samples)
    return {"samples": n, "sm_mhz": sum(s[1] for s in samples) / n, "power_w": sum(s[2] for s in samples) / n,
            "power_max_w": max(s[2] for s in samples), "temp_c": max(s[3] for s in samples)}


@dataclass
class Window:
    """Two wall-clock marks (epoch seconds) and the sampler whose samples between them it summarizes."""

    t0: float
    t1: float
    sampler: ClockSampler

    def summary(self) -> dict[str, float | int | None]:
        """:func:`summarize` of the samples stamped between the marks (complete once the sampler has stopped)."""
        return summarize(self.sampler.between(self.t0, self.t1))


class ClockSampler:
    """``with ClockSampler(device_index) as cs: y, w = cs.window(fn)``, then ``w.summary()``: the clock and power
    while ``fn`` ran. Where ``nvidia-smi`` is missing or gives nothing, windows are empty (never invented) and
    ``reason`` says why."""

    def __init__(self, index: int = 0, period_ms: int = 20, command: str = "nvidia-smi") -> None:
        self.index, self.period_ms, self.command = index, period_ms, command
        self.samples: list[Sample] = []
        self.reason = ""  # why there are no samples, once the sampler has stopped
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> ClockSampler:
        exe = shutil.which(self.command)
        if exe is None:
            self.reason = f"{self.command} not found"
            return self
        line_buffered = [b, "-oL"] if (b := shutil.which("stdbuf")) else []
        self._proc = subprocess.Popen(
            [*line_buffered, exe, f"--id={self.index}", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            v = parse_line(line)
            if v is not None:
                with self._lock:
                    self.samples.append(v)

    def between(self, t0: float, t1: float) -> list[Sample]:
        """The samples stamped in [t0, t1] (epoch seconds)."""
        with self._lock:
            return [s for s in self.samples if t0 <= s[0] <= t1]

    def window(self, fn: Callable[[], T]) -> tuple[T, Window]:
        """``fn()``'s result and the window of its wall-clock span (summarize it after the sampler stops)."""
        t0 = time.time()
        out = fn()
        return out, Window(t0, time.time(), self)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.samples and not self.reason:
            err = self._proc.stderr.read().strip() if self._proc is not None and self._proc.stderr else ""
            self.reason = f"{self.command} gave no sample" + (f": {err.splitlines()[0]}" if err else "")
