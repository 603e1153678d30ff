"""Progress of long work: a tqdm bar on a terminal, plain lines otherwise, nothing for work that ends quickly.

A :class:`Progress` (a frozen config, passed down explicitly) says where output goes and how. ``mode``:
``bar`` draws tqdm bars (counts and rates); ``lines`` prints one line per stage, and for a task that runs
longer than ``delay`` seconds a line every ``interval`` seconds and one when it ends (no carriage returns, so a
log file or CI output stays readable); ``auto`` picks ``bar`` when the stream is a terminal, else ``lines``;
``off`` prints no progress at all. Warnings are printed in every mode.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO

MODES = ("auto", "bar", "lines", "off")
HELP = ("progress goes to stderr: a bar on a terminal; otherwise (redirected, CI, logs) one line per stage and, "
        "for steps over 2 s, a line every 10 s with counts and rates.")


def human_bytes(n: float) -> str:
    """``1.2 GiB`` style sizes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


@dataclass(frozen=True)
class Progress:
    """Where and how long work reports itself (see the module docstring for ``mode``)."""

    mode: str = "auto"
    prog: str = "comfyquant"
    stream: TextIO | None = None  # None: sys.stderr at the time of printing
    delay: float = 2.0  # tasks that end sooner print nothing (bar or lines)
    interval: float = 10.0  # seconds between progress lines in ``lines`` mode
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {self.mode!r}")

    @property
    def out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    @property
    def style(self) -> str:
        """The mode in effect: ``auto`` resolved against the stream."""
        if self.mode != "auto":
            return self.mode
        isatty = getattr(self.out, "isatty", None)
        return "bar" if isatty is not None and isatty() else "lines"

    def warn(self, message: str) -> None:
        """``PROG: warning: MESSAGE`` on one line, in every mode."""
        print(f"{self.prog}: warning: {' '.join(str(message).split())}", file=self.out, flush=True)

    def stage(self, message: str) -> None:
        """One line saying what starts now (not in ``off`` mode)."""
        if self.style != "off":
            print(f"{self.prog}: {message}", file=self.out, flush=True)

    def task(self, desc: str, total: int, unit: str = "it", *, total_bytes: int | None = None) -> Task:
        """A counted task (``with progress.task(...) as t: ... t.update()``); with ``total_bytes`` the bar
        runs over bytes and shows the count as ``i/n unit``."""
        return Task(self, desc, total, unit, total_bytes)


def as_progress(progress: bool | Progress, prog: str = "comfyquant") -> Progress:
    """``True`` -> automatic, ``False`` -> off, a :class:`Progress` as is (for ``progress=`` arguments)."""
    if isinstance(progress, Progress):
        return progress
    return Progress(mode="auto" if progress else "off", prog=prog)


class Task:
    """One counted piece of work; see :meth:`Progress.task`."""

    def __init__(self, progress: Progress, desc: str, total: int, unit: str, total_bytes: int | None) -> None:
        self.p, self.desc, self.total, self.unit, self.total_bytes = progress, desc, total, unit, total_bytes
        self.count = 0
        self.bytes = 0
        self.style = progress.style
        self.start = progress.clock()
        self._last_line: float | None = None
        self._bar: Any = None

    def __enter__(self) -> Task:
        if self.style == "bar":
            from tqdm import tqdm

            if self.total_bytes is not None:
                self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=self.desc, file=self.p.out, delay=self.p.delay, dynamic_ncols=True)
            else:
                self._bar = tqdm(total=self.total, unit=f" {self.unit}", desc=self.desc, file=self.p.out,
                                 delay=self.p.delay, dynamic_ncols=True)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.style == "lines" and et is None and self.p.clock() - self.start >= self.p.delay:
            self._line(done=True)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        """``n`` more items (and ``nbytes`` more bytes) done."""
        self.count += n
        self.bytes += nbytes
        if self._bar is not None:
            if self.total_bytes is not None:
                self._bar.set_postfix_str(f"{self.count}/{self.total} {self.unit}", refresh=False)
                self._bar.update(nbytes)
            else:
                self._bar.update(n)
            return
        if self.style != "lines":
            return
        now = self.p.clock()
        if now - self.start < self.p.delay:
            return
        if self._last_line is None or now - self._last_line >= self.p.interval:
            self._line(done=False)

    def _line(self, done: bool) -> None:
        now = self.p.clock()
        self._last_line = now
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{self.count}/{self.total} {self.unit}"]
        if self.total_bytes is not None:
            parts.append(f"{human_bytes(self.bytes)} of {human_bytes(self.total_bytes)}, "
                         f"{self.bytes / elapsed / 1e6:.0f} MB/s")
        else:
            parts.append(f"{self.count / elapsed:.1f} {self.unit}/s")
        tail = f" in {elapsed:.1f} s" if done else f", {elapsed:.0f} s so far"
        print(f"{self.p.prog}: {self.desc}: {', '.join(parts)}{tail}", file=self.p.out, flush=True)


QUIET = Progress(mode="off")  # no progress output (warnings still print): the API's and the tests' default
