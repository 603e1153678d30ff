"""Test-only (``tests/cpu_int8_guard.py`` puts this folder first on a child process's ``PYTHONPATH``): counts
the child's CPU ``torch._int_mm`` calls into ``$COMFYQUANT_TEST_INT8_DIR/<pid>.calls``, one byte a call, written
as it happens (a server the tests stop with a signal has counted all the same). ``torch._int_mm`` is wrapped as
soon as torch has made it, without importing torch here: a child that never imports torch pays nothing."""

import builtins
import os
import sys

_DIR = os.environ.get("COMFYQUANT_TEST_INT8_DIR")


def _install(counts_dir: str) -> None:
    real_import = builtins.__import__
    fd = []

    def note() -> None:
        if not fd:
            fd.append(os.open(os.path.join(counts_dir, f"{os.getpid()}.calls"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        os.write(fd[0], b".")

    def wrap(torch) -> None:
        real = torch._int_mm

        def int_mm(a, b, *args, **kwargs):
            if a.device.type == "cpu":
                note()
            return real(a, b, *args, **kwargs)

        torch._int_mm = int_mm

    def watching_import(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        torch = sys.modules.get("torch")
        # torch has bound its functions: wrap them, once (outer imports still under way come back through here)
        if torch is not None and not done and hasattr(torch, "_int_mm"):
            done.append(True)
            builtins.__import__ = real_import
            wrap(torch)
        return module

    done: list[bool] = []

    builtins.__import__ = watching_import


if _DIR:
    _install(_DIR)

try:
    from comfyquant.testing.site_chain import run_next
except ImportError:  # a child without comfyquant on its path has no other sitecustomize of ours to run
    pass
else:
    run_next(__file__)
