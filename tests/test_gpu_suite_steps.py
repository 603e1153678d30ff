"""Every step of ``benchmarks/gpu_suite.py`` (the one command a device session runs) hands its script arguments
that script accepts: a misspelt flag would otherwise cost a device call (minutes of a short lease) to find. Each
script runs as ``__main__`` with the step's real arguments until its argument parser has parsed them."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


class Parsed(Exception):
    """Raised by the patched parser once a script's arguments parsed: the script stops there."""


def _step_commands() -> list[tuple[str, list[str]]]:
    table = gpu_suite.steps(Path("/tmp/gpu_suite_work"), False, Path("/tmp/comfyui_cache"))
    return [(f"{name}[{i}]", [c.replace("{budget}", "120") for c in cmd])
            for name, cmds in table.items() for i, cmd in enumerate(cmds)]


@pytest.mark.parametrize(("step", "cmd"), _step_commands(), ids=[s for s, _ in _step_commands()])
def test_each_steps_arguments_parse(step: str, cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", cmd[1:])
    monkeypatch.chdir(ROOT)
    with pytest.raises(Parsed) as got:
        runpy.run_path(str(ROOT / cmd[1]), run_name="__main__")
    assert isinstance(got.value.args[0], argparse.Namespace), step


def test_a_misspelt_check_name_is_refused_before_any_device_work() -> None:
    """``check_kernels_gpu.py --only`` takes check names only: a misspelt one (which would run nothing and pass)
    stops the parser with exit code 2, so the step tests above catch it on the CPU."""
    import check_kernels_gpu

    with pytest.raises(SystemExit) as e:
        check_kernels_gpu.main(["--only", "check_norm_fold,check_nope"])
    assert e.value.code == 2


def test_a_second_suite_call_keeps_the_first_ones_results(tmp_path: Path) -> None:
    """Two suite calls with one ``--out`` in a device call (run 123): the second zip takes a free name instead of
    replacing the first's, and the summary keeps both calls' lines."""
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results.zip"
    (tmp_path / "results.zip").write_bytes(b"first")
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results-2.zip"
    (tmp_path / "results-2.zip").write_bytes(b"second")
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results-3.zip"
    assert (tmp_path / "results.zip").read_bytes() == b"first"
