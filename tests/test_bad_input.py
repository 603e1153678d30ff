"""Every bad-input case of the converter, through the real CLI in a subprocess.

Each one: exit status 2, exactly one line on stderr naming the problem, the input bytes unchanged, and no
output or temporary file left behind.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from convert_helpers import cli_env, flux_like, leftovers, run_cli, sha256, write
from fs_helpers import drop_dac_capabilities, file_size_limit


class _Marker:
    """Unpickling this creates a directory: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "in.safetensors", flux_like(torch.float32))


def _expect_refusal(tmp_path: Path, inp: Path, args: list[str], pattern: str, out: Path | None = None,
                    **kw) -> subprocess.CompletedProcess[str]:
    out = out or tmp_path / "out.safetensors"
    digest = sha256(inp) if inp.is_file() else None
    existed = out.read_bytes() if out.exists() else None
    r = run_cli(tmp_path, "convert", inp, "-o", out, *args, **kw)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("comfyquant: error: "), r.stderr
    assert pattern.lower() in lines[0].lower(), lines[0]
    if digest is not None:
        assert sha256(inp) == digest
    if existed is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == existed
    assert leftovers(out.parent) == []
    return r


def test_truncated_file(tmp_path, good):
    blob = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(blob[: len(blob) - 1000])
    _expect_refusal(tmp_path, bad, [], "truncated")


def test_corrupt_header(tmp_path, good):
    blob = bytearray(good.read_bytes())
    blob[8:20] = b"#corrupted!#"
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(blob))
    _expect_refusal(tmp_path, bad, [], "not a safetensors file")


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, kind):
    marker = tmp_path / "UNPICKLED"
    bad = tmp_path / f"model.{kind}"
    if kind == "ckpt":
        bad.write_bytes(pickle.dumps({"state_dict": _Marker(marker)}, protocol=4))
    else:
        torch.save({"w": torch.zeros(2), "m": _Marker(marker)}, bad)  # zip container with a data.pkl inside
    _expect_refusal(tmp_path, bad, [], "never unpickles")
    assert not marker.exists()
    if kind == "ckpt":  # the file really is armed: unpickling it creates the marker
        pickle.loads(bad.read_bytes())
        assert marker.exists()


def test_non_model_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a model\n" * 10)
    _expect_refusal(tmp_path, text, [], "not a safetensors file")
    js = tmp_path / "config.json"
    js.write_text('{"hidden_size": 64}')
    _expect_refusal(tmp_path, js, [], "not a sharded checkpoint index")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _expect_refusal(tmp_path, empty, [], "empty")


def test_missing_input(tmp_path):
    _expect_refusal(tmp_path, tmp_path / "nope.safetensors", [], "not found")


def test_nan_weights_named_and_force_keeps_them(tmp_path):
    sd = flux_like(torch.float32)
    sd["double_blocks.0.img_mlp.0.weight"][7, 1] = float("inf")
    inp = write(tmp_path / "nan.safetensors", sd)
    _expect_refusal(tmp_path, inp, [], "layer 'double_blocks.0.img_mlp.0.weight' holds NaN/Inf")
    out = tmp_path / "out.safetensors"
    r = run_cli(tmp_path, "convert", inp, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert "NaN/Inf" in r.stdout and out.exists()


def test_already_quantized_input(tmp_path, good):
    q = tmp_path / "q.safetensors"
    assert run_cli(tmp_path, "convert", good, "-o", q, "-q").returncode == 0
    _expect_refusal(tmp_path, q, [], "already quantized")


def test_output_equal_to_input(tmp_path, good):
    _expect_refusal(tmp_path, good, ["--force"], "is the input", out=good)
    link = tmp_path / "link.safetensors"
    link.symlink_to(good)
    _expect_refusal(tmp_path, good, ["--force"], "is the input", out=link)
    _expect_refusal(tmp_path, good, ["--force"], "is the input", out=tmp_path / "." / "in.safetensors")


def test_existing_output_without_force(tmp_path, good):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    _expect_refusal(tmp_path, good, [], "exists", out=out)
    r = run_cli(tmp_path, "convert", good, "-o", out, "--force", "-q")
    assert r.returncode == 0 and out.read_bytes() != b"precious"


def test_unwritable_directory(tmp_path, good):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _expect_refusal(tmp_path, good, [], "permission denied", out=ro / "out.safetensors",
                        preexec_fn=drop_dac_capabilities)
    finally:
        ro.chmod(0o755)
    _expect_refusal(tmp_path, good, [], "directory does not exist", out=tmp_path / "no" / "out.safetensors")


def test_write_error_on_the_header(tmp_path, good):
    # the header is written before the background writer starts; test_disk_errors fills a disk mid-stream
    _expect_refusal(tmp_path, good, [], "writing", preexec_fn=file_size_limit(20_000))


def _default_sigint() -> None:
    # What a terminal gives a command: background jobs of a non-interactive shell (CI runners, nohup) start
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so Ctrl-C could not arrive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_write(tmp_path, sig):
    g = torch.Generator().manual_seed(0)
    inp = write(tmp_path / "big.safetensors",
                {f"blocks.{i}.linear.weight": torch.randn(512, 1024, generator=g) for i in range(48)})
    digest = sha256(inp)
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "comfyquant", "convert", str(inp), "-o", str(out),
                             "--format", "int8-rot", "--model", "none", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path), cwd=tmp_path,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert leftovers(tmp_path), "the temporary output never appeared"
    # wait until some tensor data is in the temporary file, so the signal lands mid-write
    tmp = tmp_path / leftovers(tmp_path)[0]
    header = 8 + struct.unpack("<Q", tmp.read_bytes()[:8])[0] if tmp.stat().st_size >= 8 else 0
    while proc.poll() is None and tmp.exists() and tmp.stat().st_size <= header:
        time.sleep(0.002)
    # freeze it there so the signal lands mid-write however fast the conversion is, then deliver it
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None and tmp.exists() and out.exists() is False, "conversion finished before the signal"
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    # -q: no progress lines (on a slow machine one would precede the error); the error itself is always printed
    assert err.strip().splitlines() == ["comfyquant: error: interrupted; no output written"]
    assert not out.exists() and leftovers(tmp_path) == [] and sha256(inp) == digest
