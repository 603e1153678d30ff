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


def _inner_session(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    """``source`` as a test module run by an inner pytest session with the guard and the two markers."""
    pytester.makeconftest('pytest_plugins = ["cpu_int8_guard"]\n')
    pytester.makeini("[pytest]\nmarkers =\n    cpu_int8: x\n    stock_comfy_int8_cpu: y\n    cpu_int8_reference: z\n")
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


@pytest.mark.parametrize(("mark", "failed"), [("", 2), ("pytestmark = pytest.mark.cpu_int8", 0),
                                              ("pytestmark = pytest.mark.stock_comfy_int8_cpu", 0)])
def test_unmarked_cpu_int_mm_fails_the_test(pytester: pytest.Pytester, mark: str, failed: int) -> None:
    """An unmarked test that calls ``torch._int_mm`` on the CPU, in its body or a fixture, fails with a line that
    names the marker; marked ones, and tests that make no such call, pass; ``torch._int_mm`` is restored after."""
    import torch

    real = torch._int_mm
    res = _inner_session(pytester, _INNER.format(mark=mark))
    res.assert_outcomes(passed=3 - failed, failed=failed)
    if failed:
        res.stdout.fnmatch_lines(["*test_in_call ran torch._int_mm on the CPU 1 time(s) without the cpu_int8 marker*",
                                  "*test_in_setup ran torch._int_mm on the CPU 1 time(s)*"])
    assert torch._int_mm is real


_INNER_CHILD = """
import subprocess
import sys

import pytest

{mark}

CHILD = "import torch; a = torch.ones(32, 16, dtype=torch.int8); torch._int_mm(a, a.t().contiguous())"

def test_child_calls():
    subprocess.run([sys.executable, "-c", CHILD], check=True)

def test_child_without_int8():
    subprocess.run([sys.executable, "-c", "import torch; torch.ones(2).sum()"], check=True)
"""


@pytest.mark.parametrize(("mark", "failed"), [("", 1), ("pytestmark = pytest.mark.cpu_int8", 0),
                                              ("pytestmark = pytest.mark.cpu_int8_reference", 0)])
def test_cpu_int_mm_in_a_child_process_counts(pytester: pytest.Pytester, mark: str, failed: int) -> None:
    """A test whose child process (the CLI, the ComfyUI server) runs ``torch._int_mm`` on the CPU is charged its
    calls: unmarked, it fails naming the child's share; a child that makes none, or a marked test, passes; the
    environment the guard gave the session's children is undone after it."""
    import os

    before = {k: os.environ.get(k) for k in ("PYTHONPATH", "COMFYQUANT_TEST_INT8_DIR")}
    res = _inner_session(pytester, _INNER_CHILD.format(mark=mark))
    res.assert_outcomes(passed=2 - failed, failed=failed)
    if failed:
        res.stdout.fnmatch_lines(["*test_child_calls ran torch._int_mm on the CPU 1 time(s) (1 in child processes)*"])
    assert {k: os.environ.get(k) for k in before} == before


def test_sitecustomize_modules_run_in_path_order_and_the_chain_ends(tmp_path) -> None:
    """Two folders on ``PYTHONPATH`` with a ``sitecustomize`` each that calls ``site_chain.run_next``: both run,
    first to last, once each (the second's call finds none after it)."""
    import os
    import subprocess
    import sys

    log = tmp_path / "ran.txt"
    for name in ("first", "second"):
        d = tmp_path / name
        d.mkdir()
        (d / "sitecustomize.py").write_text(
            f"open({str(log)!r}, 'a').write({name!r} + '\\n')\n"
            "from comfyquant.testing.site_chain import run_next\nrun_next(__file__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second"),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env, cwd=tmp_path)
    assert log.read_text().split() == ["first", "second"]
