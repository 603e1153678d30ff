"""``benchmarks/bench_act_ab.py``: the A/B of this tree's activation kernels against a saved copy swaps exactly the
five kernels ``triton_quant`` launches, puts them back afterwards (also after an error), and refuses a missing base
file, or one that is not a kernels file, with one line and exit code 2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from convert_helpers import REPO

pytest.importorskip("triton")


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_act_ab", REPO / "benchmarks" / "bench_act_ab.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_of_swaps_the_five_kernels_and_restores_them() -> None:
    from comfyquant.runtime.kernels import triton_quant as tq

    ab = _load()
    base = ab.load_base(REPO / "comfyquant" / "runtime" / "kernels" / "act_kernels.py")
    swap = ab.base_kernels(base)
    before = {name: getattr(tq, name) for name in ab.SWAPPED}
    with ab.kernels_of(swap):
        for name, fn in ab.SWAPPED.items():
            swapped = getattr(tq, name)
            assert swapped is not before[name] and swapped.fn is getattr(base, fn), name
            assert getattr(base, fn) is not before[name].fn  # the saved file's own kernel, not the tree's
    assert {name: getattr(tq, name) for name in ab.SWAPPED} == before
    with pytest.raises(RuntimeError, match="inside"), ab.kernels_of(swap):
        raise RuntimeError("inside")
    assert {name: getattr(tq, name) for name in ab.SWAPPED} == before
    with ab.kernels_of(None):
        assert {name: getattr(tq, name) for name in ab.SWAPPED} == before


def test_a_missing_base_file_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ab = _load()
    monkeypatch.setattr(sys, "argv", ["bench_act_ab.py", "--base", str(tmp_path / "none.py"), "--out",
                                      str(tmp_path / "out")])
    assert ab.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no file" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["def broken(:\n", "import triton\n"])
def test_a_base_that_is_not_a_kernels_file_exits_2(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ab = _load()
    bad = tmp_path / "act_kernels.py"
    bad.write_text(text)
    monkeypatch.setattr(sys, "argv", ["bench_act_ab.py", "--base", str(bad), "--out", str(tmp_path / "out")])
    assert ab.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an act_kernels.py" in err[0]
    assert not (tmp_path / "out").exists()
