"""A Ctrl-C whose KeyboardInterrupt a finalizer swallowed still stops the long optimizer loops
(``comfyquant.interrupt``): once, in CI, an interrupted learned-rounding conversion ignored its first SIGINT."""

from __future__ import annotations

import os
import signal
import sys
import weakref

import pytest
import torch

from comfyquant import interrupt
from comfyquant.formats import REGISTRY
from comfyquant.optimize.config import LearnedConfig
from comfyquant.optimize.learned import learned_round


def _swallowed_sigint(seen: list) -> None:
    """Deliver SIGINT while a finalizer runs, as a tensor release inside an optimizer step can: Python raises the
    KeyboardInterrupt inside the finalizer, reports it to ``sys.unraisablehook`` and carries on."""

    class Obj:
        pass

    def fin() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs at one of these bytecode boundaries
            pass

    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_type)
    try:
        o = Obj()
        weakref.finalize(o, fin)
        del o
    finally:
        sys.unraisablehook = old_hook


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_swallowed_ctrl_c_still_stops_learned_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * 0.02
    fmt = REGISTRY.get("int8")
    grid = fmt.grid(w, fmt.resolve(tuple(w.shape), {}))
    h = torch.eye(32) + 0.1
    seen: list = []
    with interrupt.sigint_handler():
        _swallowed_sigint(seen)
        assert seen == [KeyboardInterrupt]  # the interrupt was lost to the finalizer: we are still running
        with pytest.raises(KeyboardInterrupt):
            learned_round(w, h, grid, LearnedConfig(iters=2000))
    interrupt.check()  # leaving the block forgets the signal: nothing outlives the command that asked
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ignored_sigint_stays_ignored() -> None:
    """A process started with SIGINT ignored (``nohup``, a background job) keeps it ignored: the handler is not
    installed over it."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.sigint_handler():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
