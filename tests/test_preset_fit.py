"""An explicit ``--model`` that does not fit the file: one warning line and a report note, or with
``--strict-preset`` exit 2; never a silent conversion of a different set of layers."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import flux_like, write
from safetensors import safe_open

from comfyquant.cli import convert_to_quant
from comfyquant.cli import main as cli
from comfyquant.presets.registry import PRESETS, get_preset
from comfyquant.testing.architectures import ARCHS, arch_tensors

SIGNED = [p for p in PRESETS if PRESETS[p].detect is not None]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_preset_fits_its_own_architecture_and_no_other(arch: str) -> None:
    from comfyquant.presets.fit import preset_mismatch

    shapes = dict(arch_tensors(arch, "tiny"))
    fitting = {p for p in SIGNED if preset_mismatch(get_preset(p), shapes) is None}
    expected = {ARCHS[arch].preset}
    if arch == "zimage":
        expected.add("zimage-refiner")  # a policy for the same structure, chosen with --model
    if arch == "sdxl-checkpoint":
        expected.add("clip")  # converts the bundled CLIP encoders
    if arch == "flux-checkpoint":
        expected |= {"clip", "t5xxl"}
    assert fitting == expected
    for name in ("none", "generic"):  # written for any structure
        assert preset_mismatch(get_preset(name), shapes) is None


@pytest.fixture
def flux(tmp_path):
    return write(tmp_path / "flux.safetensors", flux_like(torch.bfloat16, prefix="model.diffusion_model."))


def _run(entry, capsys, *argv):
    rc = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("model", ["sdxl", "t5xxl", "flux2"])
def test_convert_warns_once_and_notes_it_in_the_report(tmp_path, flux, capsys, model):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    rc, stdout, err = _run(cli.main, capsys, "convert", flux, "-o", out, "--model", model, "--report", rep)
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"comfyquant: warning: --model {model} does not fit"), err
    assert "auto-detection says 'flux'" in lines[0]
    notes = json.loads(rep.read_text())["notes"]
    assert any(n.startswith(f"--model {model} does not fit") for n in notes)
    assert f"note: --model {model} does not fit" in stdout
    rc, _, err = _run(cli.main, capsys, "convert", flux, "-o", tmp_path / "s.safetensors", "--model", model,
                      "--strict-preset")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("comfyquant: error: --model")
    assert "(--strict-preset)" in err and not (tmp_path / "s.safetensors").exists()


def test_fitting_or_detected_presets_say_nothing(tmp_path, flux, capsys):
    for model in ("auto", "flux", "none", "generic"):
        out = tmp_path / f"out-{model}.safetensors"
        rc, _, err = _run(cli.main, capsys, "convert", flux, "-o", out, "--model", model, "-q", "--strict-preset")
        assert rc == 0 and err == "", (model, err)


def test_inspect_and_template_warn_or_refuse(tmp_path, flux, capsys):
    rc, out, err = _run(cli.main, capsys, "inspect", flux, "--model", "sdxl")
    assert rc == 0 and err.startswith("comfyquant: warning: --model sdxl does not fit") and err.count("\n") == 1
    assert "note: --model sdxl does not fit" in out
    rc, _, err = _run(cli.main, capsys, "inspect", flux, "--model", "sdxl", "--strict-preset")
    assert rc == 2 and "(--strict-preset)" in err
    layers = tmp_path / "layers.json"
    rc, _, err = _run(cli.main, capsys, "template", flux, "-o", layers, "--model", "wan")
    assert rc == 0 and err.startswith("comfyquant: warning: --model wan does not fit")
    assert json.loads(layers.read_text())["_preset_warning"].startswith("--model wan does not fit")
    rc, _, err = _run(cli.main, capsys, "template", flux, "-o", tmp_path / "t2.json", "--model", "wan",
                      "--strict-preset")
    assert rc == 2 and not (tmp_path / "t2.json").exists()


@pytest.mark.parametrize("flag", ["--t5xxl", "--flux2"])
def test_convert_to_quant_model_flags(tmp_path, flux, capsys, flag):
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(convert_to_quant.main, capsys, "-i", flux, "-o", out, "--comfy_quant", flag)
    assert rc == 0, err
    assert [x for x in err.splitlines() if "warning" in x] == [
        x for x in err.splitlines() if x.startswith(f"convert_to_quant: warning: --model {flag[2:]} does not fit")]
    assert len([x for x in err.splitlines() if "warning" in x]) == 1
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["comfyquant.model"] == flag[2:]
    rc, _, err = _run(convert_to_quant.main, capsys, "-i", flux, "-o", tmp_path / "s.safetensors",
                      "--comfy_quant", flag, "--strict-preset")
    assert rc == 2 and err.count("\n") == 1 and "(--strict-preset)" in err
    assert not (tmp_path / "s.safetensors").exists()
