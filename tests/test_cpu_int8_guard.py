"""The guard that keeps scripts/test_isa_caps.sh complete (tests/cpu_int8_guard.py), run on inner test sessions."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.cpu_int8  # the inner sessions run torch._int_mm in this process

_INNER = """
import pytest
import torch

{mark}

def _product():
    a = torch.ones(32, 16, dtype=torch.int8)
    return torch._int_mm(a, a.t().contiguous())

@pytest.fixture
def made_in_setup():
    return _product()

def test_in_call():
    assert int(_product()[0, 0]) == 16

def test_in_setup(made_in_setup):
    assert int(made_in_setup[0, 0]) == 16

def test_none():
    assert torch.ones(2).sum() == 2
"""


@pytest.mark.parametrize(("mark", "failed"), [("", 2), ("pytestmark = pytest.mark.cpu_int8", 0),
                                              ("pytestmark = pytest.mark.stock_comfy_int8_cpu", 0)])
def test_unmarked_cpu_int_mm_fails_the_test(pytester: pytest.Pytester, mark: str, failed: int) -> None:
    """An unmarked test that calls ``torch._int_mm`` on the CPU, in its body or a fixture, fails with a line that
    names the marker; marked ones, and tests that make no such call, pass; ``torch._int_mm`` is restored after."""
    import torch

    real = torch._int_mm
    pytester.makeconftest('pytest_plugins = ["cpu_int8_guard"]\n')
    pytester.makeini("[pytest]\nmarkers =\n    cpu_int8: x\n    stock_comfy_int8_cpu: y\n")
    pytester.makepyfile(test_inner=_INNER.format(mark=mark))
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=3 - failed, failed=failed)
    if failed:
        res.stdout.fnmatch_lines(["*test_in_call ran torch._int_mm on the CPU 1 time(s) without the cpu_int8 marker*",
                                  "*test_in_setup ran torch._int_mm on the CPU 1 time(s)*"])
    assert torch._int_mm is real
