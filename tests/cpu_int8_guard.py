"""Keeps the capped CI pass complete: a test that runs ``torch._int_mm`` on the CPU must carry a marker.

``scripts/test_isa_caps.sh`` runs the tests marked ``cpu_int8`` again with oneDNN and ATen capped to AVX2, where
``torch._int_mm`` sums wrong without VNNI (docs/KERNEL_NOTES.md). A new test of a CPU int8 path that nobody marks
would never meet that CPU; so while a test sets up and runs, ``torch._int_mm`` is wrapped to count its CPU calls,
and a test that made any without the ``cpu_int8`` marker (or ``stock_comfy_int8_cpu``: stock ComfyUI's layers,
which the capped pass leaves out) fails, naming the marker to add. Calls in child processes are not seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

MARKERS = ("cpu_int8", "stock_comfy_int8_cpu")
_CALLS = pytest.StashKey[int]()


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
    with _watched(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _watched(item):
        result = yield
    calls = item.stash.get(_CALLS, 0)
    if calls and not any(item.get_closest_marker(m) for m in MARKERS):
        pytest.fail(f"{item.nodeid} ran torch._int_mm on the CPU {calls} time(s) without the cpu_int8 marker: "
                    "add `pytestmark = pytest.mark.cpu_int8` to its module (scripts/test_isa_caps.sh then runs it "
                    "under AVX2 caps too)", pytrace=False)
    return result
