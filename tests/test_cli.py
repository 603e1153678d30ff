"""The ``comfyquant`` command line: convert end to end, inspect/template/edit wiring, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
from convert_helpers import cli_env, flux_like, run_cli, write
from safetensors import safe_open

from comfyquant.cli import main as cli
from comfyquant.io.writer import save_file as stream_save


@pytest.fixture
def src(tmp_path):
    return write(tmp_path / "in.safetensors", flux_like(torch.bfloat16, prefix="model.diffusion_model."),
                 {"note": "kept"})


def test_convert_end_to_end(tmp_path, src):
    out, rep, png = tmp_path / "q.safetensors", tmp_path / "r.json", tmp_path / "p.png"
    r = run_cli(tmp_path, "convert", src, "-o", out, "--format", "int8-block", "--block-size", "32",
                "--report", rep, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    assert "SQNR: mean" in r.stdout and f"wrote {out}" in r.stdout
    assert f"wrote report {rep}" in r.stdout and f"wrote plot {png}" in r.stdout  # where the extra files went
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        conf = json.loads(bytes(f.get_tensor("model.diffusion_model.single_blocks.0.linear1.comfy_quant").tolist()))
    assert meta["note"] == "kept" and meta["comfyquant.format"] == "int8-block"
    assert conf == {"format": "int8_blockwise", "group_size": 32}
    assert json.loads(rep.read_text())["summary"]["counts"]["quantize"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    q = run_cli(tmp_path, "convert", src, "-o", out, "--force", "--quiet")
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""


def test_inspect_template_edit_wiring(tmp_path, src):
    r = run_cli(tmp_path, "inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)
    t = run_cli(tmp_path, "template", src, "-o", tmp_path / "layers.json")
    assert t.returncode == 0, t.stderr
    rules = json.loads((tmp_path / "layers.json").read_text())["rules"]
    assert rules and all("pattern" in x for x in rules)
    out = tmp_path / "q.safetensors"
    c = run_cli(tmp_path, "convert", src, "-o", out, "--layer-config", tmp_path / "layers.json", "-q")
    assert c.returncode == 0, c.stderr
    e = run_cli(tmp_path, "edit", out, "-o", tmp_path / "h.safetensors", "--to-header-metadata")
    assert e.returncode == 0, e.stderr
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        assert "_quantization_metadata" in f.metadata()


@pytest.mark.parametrize(("args", "message"), [
    (["convert", "x.safetensors"], "the following arguments are required: -o"),
    (["convert", "x.safetensors", "-o", "y", "--format", "int4"], "invalid choice: 'int4'"),
    (["frobnicate"], "invalid choice"),
    (["convert", "missing.safetensors", "-o", "y.safetensors"], "input not found"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    r = run_cli(tmp_path, *args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("comfyquant: error: ") and message in r.stderr
    assert r.stderr.count("comfyquant:") == 1 and "error: comfyquant" not in r.stderr  # the prefix once


def test_help_and_version(tmp_path):
    r = run_cli(tmp_path, "--help")
    listed = [line.split()[0] for line in r.stdout.splitlines()  # a long name's help wraps to a deeper indent
              if line.startswith("    ") and not line.startswith("      ") and line.split()]
    assert r.returncode == 0 and listed == ["convert", "inspect", "template", "edit", "bench", "eval", "demo",
                                            "calibrate", "install-nodes"]
    h = run_cli(tmp_path, "convert", "--help")
    assert h.returncode == 0 and all(f in h.stdout for f in ("--format", "--model", "--layer-config", "--report",
                                                            "--plot", "--device", "--low-memory", "--force",
                                                            "--block-size", "--quiet", "--strict-preset"))
    assert "a bar on a terminal" in h.stdout and "one line per stage" in " ".join(h.stdout.split())
    v = run_cli(tmp_path, "--version")
    assert v.returncode == 0 and v.stdout.startswith("comfyquant ")


def test_external_subcommands_dispatch(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("comfyquant_fake_tool")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "comfyquant_fake_tool", fake)
    monkeypatch.setitem(cli.EXTERNAL, "fake", ("a fake tool", "comfyquant_fake_tool:main"))
    assert cli.main(["fake", "--x", "1"]) == 3 and seen == [["--x", "1"]]
    monkeypatch.setitem(cli.EXTERNAL, "gone", ("not installed", "comfyquant_no_such_module_xyz:main"))
    assert cli.main(["gone"]) == 2
    assert capsys.readouterr().err == "comfyquant: error: the 'gone' command is not available in this installation\n"


def test_bug_exits_1_with_traceback(monkeypatch, capsys):
    def boom(_args):
        raise RuntimeError("internal bug")

    monkeypatch.setitem(cli.COMMANDS, "convert", (*cli.COMMANDS["convert"][:2], boom))
    assert cli.main(["convert", "a", "-o", "b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: internal bug" in err


def test_keyboard_interrupt_exits_2(monkeypatch, capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "convert", (*cli.COMMANDS["convert"][:2], interrupted))
    assert cli.main(["convert", "a", "-o", "b"]) == 2
    assert capsys.readouterr().err == "comfyquant: error: interrupted; no output written\n"


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Peak RSS of a conversion of 8 vs 48 layers of 8 MiB each: streaming keeps them within a few layers."""
    g = torch.Generator().manual_seed(0)
    layer = torch.randn(2048, 2048, generator=g).to(torch.bfloat16)
    code = ("import resource, sys, comfyquant; comfyquant.convert(sys.argv[1], sys.argv[2], model='none', "
            "progress=False); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = []
    for n in (8, 48):
        inp = tmp_path / f"m{n}.safetensors"
        stream_save(inp, {f"b.{i}.weight": layer for i in range(n)})  # one tensor, written n times
        r = subprocess.run([sys.executable, "-c", code, inp, tmp_path / f"o{n}.safetensors"], capture_output=True,
                           text=True, cwd=tmp_path, env=cli_env(tmp_path), timeout=600)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stdout.split()[-1]) * 1024)
        inp.unlink()
    layer_bytes = layer.numel() * layer.element_size()
    # the model grows by 40 layers (320 MiB); the peak may grow by a few layers at most
    assert peaks[1] - peaks[0] < 5 * layer_bytes, f"peak RSS {peaks[0] >> 20} -> {peaks[1] >> 20} MiB"
