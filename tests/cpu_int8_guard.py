"""Keeps the capped CI pass complete: a test that runs ``torch._int_mm`` on the CPU must carry a marker.

``scripts/test_isa_caps.sh`` runs the tests marked ``cpu_int8`` again with oneDNN and ATen capped to AVX2, where
``torch._int_mm`` sums wrong without VNNI (docs/KERNEL_NOTES.md). A new test of a CPU int8 path that nobody marks
would never meet that CPU; so while a test sets up and runs, ``torch._int_mm`` is wrapped to count its CPU calls,
and a test that made any without the ``cpu_int8`` marker (or ``stock_comfy_int8_cpu``: stock ComfyUI's layers;
``cpu_int8_reference``: CPU products as the reference a kernel is checked against; the capped pass leaves both
out) fails, naming the marker to add. Child processes (the CLI, the ComfyUI server)
count theirs too: for the session ``PYTHONPATH`` starts with ``tests/int8_guard_site``, whose ``sitecustomize``
wraps the child's ``torch._int_mm`` and appends a byte a CPU call to a file of the session's counts folder; a
test is charged the bytes added while it set up and ran (a session-wide server's calls land in the test whose
workflow made them). A child given an environment that drops ``PYTHONPATH`` is not seen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

MARKERS = ("cpu_int8", "stock_comfy_int8_cpu", "cpu_int8_reference")
ENV_DIR = "COMFYQUANT_TEST_INT8_DIR"  # read by tests/int8_guard_site/sitecustomize.py only
SITE = Path(__file__).resolve().parent / "int8_guard_site"
_CALLS = pytest.StashKey[int]()
_CHILD_START = pytest.StashKey[int]()
_SAVED = pytest.StashKey[dict]()


def children_calls(counts: Path) -> int:
    """CPU ``torch._int_mm`` calls the session's child processes have counted so far (a byte each)."""
    return sum(f.stat().st_size for f in counts.glob("*.calls"))


def pytest_configure(config: pytest.Config) -> None:
    """The counts folder, and ``PYTHONPATH`` / :data:`ENV_DIR` that children inherit, for the session."""
    counts = Path(tempfile.mkdtemp(prefix="cq-int8-calls-"))
    config.stash[_SAVED] = {k: os.environ.get(k) for k in ("PYTHONPATH", ENV_DIR)} | {"dir": counts}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), *([old] if old else [])])
    os.environ[ENV_DIR] = str(counts)


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED, None)
    if saved is None:
        return
    shutil.rmtree(saved.pop("dir"), ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _counts(item: pytest.Item) -> Path:
    return item.config.stash[_SAVED]["dir"]


@contextlib.contextmanager
def _watched(item: pytest.Item) -> Iterator[None]:
    """``torch._int_mm`` wrapped, while the block runs, to add its CPU calls to ``item``'s count."""
    real = torch._int_mm

    def int_mm(a: torch.Tensor, b: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if a.device.type == "cpu":
            item.stash[_CALLS] = item.stash.get(_CALLS, 0) + 1
        return real(a, b, *args, **kwargs)

    torch._int_mm = int_mm
    try:
        yield
    finally:
        torch._int_mm = real


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    item.stash[_CHILD_START] = children_calls(_counts(item))
    with _watched(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _watched(item):
        result = yield
    calls = item.stash.get(_CALLS, 0)
    children = children_calls(_counts(item)) - item.stash.get(_CHILD_START, 0)
    if (calls or children) and not any(item.get_closest_marker(m) for m in MARKERS):
        where = f" ({children} in child processes)" if children else ""
        pytest.fail(f"{item.nodeid} ran torch._int_mm on the CPU {calls + children} time(s){where} without the "
                    "cpu_int8 marker: add `pytestmark = pytest.mark.cpu_int8` to its module "
                    "(scripts/test_isa_caps.sh then runs it under AVX2 caps too)", pytrace=False)
    return result
