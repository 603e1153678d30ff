"""Every step of ``benchmarks/gpu_suite.py`` (the one command a device session runs) hands its script arguments
that script accepts: a misspelt flag would otherwise cost a device call (minutes of a short lease) to find. Each
script runs as ``__main__`` with the step's real arguments until its argument parser has parsed them."""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
import zipfile
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


def test_every_benchmark_script_puts_the_repos_package_first() -> None:
    """The device machine has no comfyquant installed: a benchmark run outside ``gpu_suite`` (which sets
    ``PYTHONPATH``) found no package in run 150. Every script that imports it puts the repo root on its path."""
    def finds(text: str) -> bool:
        return ("sys.path.insert(0, str(Path(__file__).resolve().parents[1]))" in text
                or ("ROOT = Path(__file__).resolve().parents[1]" in text and "sys.path.insert(0, str(ROOT))" in text))

    missing = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py"))
               if re.search(r"^\s*(from|import) comfyquant", p.read_text(), re.M) and not finds(p.read_text())]
    assert not missing, missing


def test_a_check_script_runs_where_the_package_is_not_installed(tmp_path: Path) -> None:
    """Run 150's failure, reproduced: ``check_kernels_gpu.py`` started from another folder by a Python that has
    torch but no comfyquant installed (``-S``: the editable install's ``.pth`` is not read) parses its arguments."""
    import subprocess

    import torch

    site = str(Path(torch.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "check_kernels_gpu.py"), "--help"],
                       cwd=tmp_path, env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--only" in r.stdout, r.stderr[-2000:]


def test_checks_of_kernels_no_gpu_has_run_need_naming() -> None:
    """The warp-specialized resident kernel's check runs only when ``--only`` names it: a default run (and the
    suite steps that run every check) keeps to kernels a GPU has run, where a hang cannot come."""
    import check_kernels_gpu as ck

    default = {fn.__name__ for fn in ck.selected(set())}
    assert "check_resident_ws" not in default and "check_resident" in default
    assert len(default) == len(ck._checks()) - len(ck.OPT_IN)
    assert [fn.__name__ for fn in ck.selected({"check_resident_ws"})] == ["check_resident_ws"]


def test_a_second_suite_call_keeps_the_first_ones_results(tmp_path: Path) -> None:
    """Two suite calls with one ``--out`` in a device call (run 123): the second zip takes a free name instead of
    replacing the first's, and the summary keeps both calls' lines."""
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results.zip"
    (tmp_path / "results.zip").write_bytes(b"first")
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results-2.zip"
    (tmp_path / "results-2.zip").write_bytes(b"second")
    assert gpu_suite.unused(tmp_path, "results", ".zip") == tmp_path / "results-3.zip"
    assert (tmp_path / "results.zip").read_bytes() == b"first"


def test_each_finished_step_is_in_the_results_before_the_next_starts(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A device call cut off by its time limit returns what ``--out`` holds then: the suite rewrites results.zip
    after every step, so the second step here already sees the first's file in it, and the summary has the first
    step's line before the second runs."""
    out = tmp_path / "out"
    seen = tmp_path / "seen.txt"
    read_back = ("import json, sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); "
                 "summary = open(sys.argv[2]).read(); json.dump([sorted(names), summary], open(sys.argv[3], 'w'))")

    def table(work: Path, smoke: bool, cache: Path | None) -> dict[str, list[list[str]]]:
        return {"first": [[sys.executable, "-c", f"open({str(work / 'sweep' / 'one.json')!r}, 'w').write('1')"]],
                "second": [[sys.executable, "-c", read_back, str(out / "results.zip"), str(out / "summary.txt"),
                            str(seen)]]}

    monkeypatch.setattr(gpu_suite, "steps", table)
    monkeypatch.setattr(gpu_suite, "unpack", lambda scratch: (dict(__import__("os").environ), None))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--out", str(out), "--steps", "first:30,second:30"])
    assert gpu_suite.main() == 0
    names, summary = json.loads(seen.read_text())
    assert "first/sweep/one.json" in names and "first.log" in names and "second.log" not in names
    assert "== first: rc=0" in summary and "== second" not in summary
    final = zipfile.ZipFile(out / "results.zip").namelist()
    assert "second.log" in final and "first/sweep/one.json" in final
    assert sorted(p.name for p in out.iterdir()) == ["results.zip", "summary.txt"]  # no .part left behind


@pytest.mark.parametrize("names", [("sweep_a", "sweep_b"), ("sweep", "sweep_dit")])
def test_two_steps_writing_the_same_file_both_keep_theirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           names: tuple[str, str]) -> None:
    """Two sweeps in one call both write ``sweep/bench.json`` (run 128 returned only the second's): each step's
    files go under its own name in the results, the first's left as it wrote them, also where a step is named
    like the folder it writes (the ``sweep`` step)."""
    out = tmp_path / "out"

    def table(work: Path, smoke: bool, cache: Path | None) -> dict[str, list[list[str]]]:
        write = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
        return {name: [[sys.executable, "-c", write, str(work / "sweep" / "bench.json"), name]] for name in names}

    monkeypatch.setattr(gpu_suite, "steps", table)
    monkeypatch.setattr(gpu_suite, "unpack", lambda scratch: (dict(__import__("os").environ), None))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--out", str(out), "--steps", ",".join(f"{n}:30" for n in names)])
    assert gpu_suite.main() == 0
    z = zipfile.ZipFile(out / "results.zip")
    assert [z.read(f"{n}/sweep/bench.json") for n in names] == [n.encode() for n in names]
    assert "sweep/bench.json" not in z.namelist()


def test_each_steps_shape_names_are_ones_its_benchmark_knows() -> None:
    """The shape selections steps hand ``bench_gemm_ws.py`` (``--only``, per ``--narrow``'s table) and
    ``bench_resident.py`` (``--shapes``) name shapes those scripts have: both refuse others with exit 2, which on
    a device costs the step."""
    import bench_gemm_ws
    import bench_resident

    checked = 0
    for step, cmd in _step_commands():
        script = Path(cmd[1]).name
        if script not in ("bench_gemm_ws.py", "bench_resident.py"):
            continue
        flag = "--only" if script == "bench_gemm_ws.py" else "--shapes"
        if flag not in cmd:
            continue
        names = cmd[cmd.index(flag) + 1].split(",")
        if script == "bench_gemm_ws.py":
            known = {f"{m}.{la}" for m, la in (bench_gemm_ws.NARROW if "--narrow" in cmd else bench_gemm_ws.SHAPES)}
        else:
            known = set(bench_resident.SHAPES)
        assert set(names) <= known, (step, sorted(set(names) - known))
        checked += 1
    assert checked >= 4  # resident, resident_ws, gemm_n64's two
