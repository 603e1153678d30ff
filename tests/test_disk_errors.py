"""Output file systems that fail: a disk that fills up mid-write and a read-only output folder.

Both on real file systems (a tmpfs and a read-only bind mount in a private namespace, see fs_helpers), through
the real command-line entry points, in a child process with a hard timeout so that a hang fails the test
instead of hanging CI. Every failure must be exit 2 with one line on stderr and no file left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import flux_like, write
from fs_helpers import drop_dac_capabilities, file_size_limit, in_namespace, namespaces_available

from comfyquant.convert.api import convert

# Runs command lines (JSON lists read from stdin: program name, then arguments) through the console-script
# entry points in one process and prints one JSON line per run: exit status, stderr, what is left in WATCH.
DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from comfyquant.cli import convert_to_quant, main
entry = {"comfyquant": main.main, "convert_to_quant": convert_to_quant.main}
watch = Path(sys.argv[1])
for line in sys.stdin:
    prog, *argv = json.loads(line)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = entry[prog](argv)
    left = sorted(p.name for p in watch.iterdir())
    print(json.dumps({"rc": rc, "stderr": err.getvalue(), "left": left}), flush=True)
"""

RUNS = 20  # a lost race hung 2 runs in 6 before the fix; 20 in a row make a surviving race very unlikely
TIMEOUT_S = 90


def _drive(watch: Path, commands: list[list[str]], *, wrap=None, preexec_fn=None) -> list[dict]:
    argv = [sys.executable, "-c", DRIVER, str(watch)]
    try:
        r = subprocess.run(wrap(argv) if wrap else argv, input="".join(json.dumps(c) + "\n" for c in commands),
                           capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"hung: {len(done.splitlines())} of {len(commands)} runs returned within {TIMEOUT_S} s")
    assert r.returncode == 0, r.stderr
    results = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(results) == len(commands), r.stderr
    return results


def _one_line_exit_2(res: dict, prog: str, *patterns: str) -> None:
    lines = res["stderr"].splitlines()
    assert res["rc"] == 2, res["stderr"]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res["stderr"]
    assert lines[0].count("error:") == 1, lines[0]
    assert any(p in lines[0] for p in patterns), lines[0]


@pytest.fixture(scope="module")
def fills_disk(tmp_path_factory) -> Path:
    """A checkpoint whose first tensor (8 MiB) overflows the small disk, followed by many small ones: the
    background writer fails on the first tensor while the converter is queueing the next ones."""
    g = torch.Generator().manual_seed(0)
    sd = {"a.big": torch.randn(2**21, generator=g)}
    sd.update({f"b.{i:02d}.bias": torch.randn(64, generator=g) for i in range(24)})
    return write(tmp_path_factory.mktemp("full") / "in.safetensors", sd)


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_fails_cleanly_every_time(tmp_path, fills_disk, how):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out.safetensors"
    cmd = ["comfyquant", "convert", str(fills_disk), "-o", str(out), "--model", "none", "-q"]
    if how == "tmpfs":
        if not namespaces_available():
            pytest.skip("no unprivileged mount namespaces here; the rlimit case covers the same write path")
        results = _drive(disk, [cmd] * RUNS, wrap=lambda a: in_namespace(a, tmpfs=(disk, 4 * 2**20)))
        expect = "no space left on device"
    else:
        results = _drive(disk, [cmd] * RUNS, preexec_fn=file_size_limit(4 * 2**20))
        expect = "file too large"
    for res in results:
        _one_line_exit_2(res, "comfyquant", expect)
        assert res["left"] == []


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ro-src")
    src = write(d / "flux.safetensors", flux_like(torch.bfloat16))
    q = d / "flux-int8.safetensors"
    convert(src, q, progress=False)
    return src, q


def test_read_only_output_folder_is_one_line_exit_2(tmp_path, quantized):
    src, q = quantized
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = [
        ["comfyquant", "convert", str(src), "-o", str(ro / "a.safetensors")],
        ["comfyquant", "convert", str(src), "-o", str(ro / "a.safetensors"), "--report", str(tmp_path / "r.json")],
        ["convert_to_quant", "-i", str(src), "-o", str(ro / "b.safetensors"), "--comfy_quant"],
        ["convert_to_quant", "-i", str(src), "-o", str(ro / "b.safetensors"), "--save-quant-metadata"],
        ["convert_to_quant", "-i", str(src), "-o", str(ro / "t.json"), "--dry-run", "create-template"],
        ["comfyquant", "template", str(src), "-o", str(ro / "t.json")],
        ["comfyquant", "edit", str(q), "-o", str(ro / "e.safetensors"), "--to-header-metadata"],
    ]
    if namespaces_available():
        results = _drive(ro, commands, wrap=lambda a: in_namespace(a, read_only=[ro]))
        patterns: tuple[str, ...] = ("read-only file system",)
    else:  # without namespaces only permission bits are left; root needs its override capabilities dropped
        ro.chmod(0o555)
        try:
            results = _drive(ro, commands, preexec_fn=drop_dac_capabilities)
        finally:
            ro.chmod(0o755)
        patterns = ("permission denied", "Permission denied")
    for cmd, res in zip(commands, results, strict=True):
        _one_line_exit_2(res, cmd[0], *patterns)
        assert res["left"] == [], cmd
    assert not (tmp_path / "r.json").exists()
