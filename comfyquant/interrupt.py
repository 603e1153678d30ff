"""A Ctrl-C that cannot be lost: the console entry points' SIGINT handler remembers the signal as well as raising.

Python delivers SIGINT as a KeyboardInterrupt raised wherever the main thread is running bytecode. When that is a
finalizer (a weakref callback or ``__del__`` run by a tensor's release, which torch's optimizers cause every
step), CPython prints "Exception ignored in ..." and carries on: the Ctrl-C is lost and the run goes on (seen once
in a learned-rounding conversion: the first Ctrl-C did nothing, the second stopped it). Long loops call
:func:`check` once per step, which raises again if a SIGINT arrived since the handler was installed.

The flag mirrors the signal, which is the process's own; :func:`sigint_handler` installs it for the duration of a
command and restores the previous handler after, so nothing outlives the command that asked for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_PENDING = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _PENDING.set()
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived under :func:`sigint_handler` (even one whose exception was
    swallowed); cheap enough to call once per optimizer step."""
    if _PENDING.is_set():
        raise KeyboardInterrupt("interrupted")


@contextlib.contextmanager
def sigint_handler() -> Iterator[None]:
    """Install the remembering SIGINT handler for the block (main thread only, and not where SIGINT is ignored or
    handled outside Python: there the block runs as it is). The flag is cleared on entry and on exit."""
    old = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if old is None or old is signal.SIG_IGN:  # not the main thread, a handler set outside Python, or ignored
        yield
        return
    _PENDING.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        _PENDING.clear()
