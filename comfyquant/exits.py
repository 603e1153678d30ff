"""The one mapping from outcomes to exit codes shared by every console entry point.

0 done; 2 a user mistake (``UserError``) or Ctrl-C, printed as one line ``PROG: error: ...`` with no
traceback; 1 a bug (traceback). A closed output pipe (``| head``) is not an error.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

from comfyquant import interrupt
from comfyquant.errors import UserError

A = TypeVar("A")


def one_line(msg: object) -> str:
    """``msg`` with all whitespace runs folded to single spaces (an error message is always one line)."""
    return " ".join(str(msg).split()) or "error"


def run_cli(prog: str, run: Callable[[A], int], argv: A) -> int:
    """Call ``run(argv)`` and turn what it raises into the exit code and one-line message above."""
    try:
        with interrupt.sigint_handler():  # a Ctrl-C swallowed by a finalizer still stops the long loops
            return run(argv)
    except (UserError, KeyboardInterrupt, BrokenPipeError, Exception) as e:
        return report(prog, e)


def report(prog: str, e: BaseException) -> int:
    """Print what ``e`` means for the user (one line, or a traceback for a bug) and return the exit code.
    Exceptions that are not errors of the run (``SystemExit``, ...) are raised again."""
    if isinstance(e, UserError):
        say(f"{prog}: error: {one_line(e)}")
        return 2
    if isinstance(e, KeyboardInterrupt):
        say(f"{prog}: error: interrupted; no output written")
        _forget_handled_interrupt()
        return 2
    if isinstance(e, BrokenPipeError):
        return 0
    if isinstance(e, Exception):
        traceback.print_exception(e)
        return 1
    raise e


def say(line: str) -> None:
    """Write one line to stderr in one write (``print`` writes the text and the newline separately, so two
    threads printing at once could join their lines)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _forget_handled_interrupt() -> None:
    """Tell CPython the Ctrl-C was handled. A KeyboardInterrupt raised while a nested ``PyRun_*`` call runs
    (torch runs Python snippets that way) sets CPython's ``_Py_UnhandledKeyboardInterrupt`` even when the
    program catches it, and the interpreter then kills itself with SIGINT at exit instead of returning our
    exit code 2 (seen in about 1 run in 6 of an interrupted learned-rounding conversion)."""
    import ctypes

    try:
        flag = ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt")
    except ValueError:  # another Python build without the symbol: nothing to reset
        return
    flag.value = 0


def argv_or_sys(argv: Sequence[str] | None) -> list[str]:
    """The explicit arguments, or the process's own."""
    return list(sys.argv[1:] if argv is None else argv)
