"""Automatic precision on the real reference models (small samplers to stay quick): at the size of a uniform
format it beats that format end to end on held-out inputs, and quality floors hold on held-out inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyquant.autoprec.bound import t_quantile
from comfyquant.convert.api import convert
from comfyquant.eval.autoprobe import ModelProbe, dit_probe, fake_quantized, minilm_probe
from comfyquant.eval.sampling import SampleConfig
from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.formats import get_format

pytestmark = pytest.mark.cpu_int8


def _bytes(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.fixture(scope="module")
def dit() -> ModelProbe:
    torch.set_num_threads(1)
    return dit_probe(per_class=1, steps=8, heldout=SampleConfig(steps=8, per_class=3, seed=1234))


def test_fake_quantization_is_what_the_loader_runs(dit: ModelProbe, tmp_path: Path) -> None:
    """The probe's fake-quantized model and the written file loaded by the runtime have the same error.

    Not bit-identical: float32 accumulation order differs, and activations sitting on a rounding boundary
    then round to neighbouring codes, so the two error patterns differ while their size agrees.
    """
    from comfyquant.eval.sampling import class_labels, initial_noise
    from comfyquant.eval.workloads import DigitsWorkload
    from comfyquant.runtime.loader import load_quantized

    out = tmp_path / "int8-rot.safetensors"
    rep = convert(DIT_FIXTURE, out, format="int8-rot", progress=False)
    fmt = get_format("int8-rot")
    assign = {x.name.removesuffix(".weight"): (fmt, fmt.resolve(tuple(x.shape))) for x in rep.layers
              if x.action == "quantize"}
    loaded = load_quantized(DigitsWorkload().empty_model(), out, compute_dtype=torch.float32).eval()
    m = dit.model
    labels = class_labels(10, 4)
    x = initial_noise(len(labels), (16, 8, 8), 99)
    errs = []
    with torch.no_grad():
        for t in (0.9, 0.5, 0.1):
            tt = torch.full((len(labels),), t)
            ref = m.velocity(x, tt, labels)
            with fake_quantized(m, assign):
                fq = m.velocity(x, tt, labels)
            lq = loaded.velocity(x, tt, labels)
            errs.append((float((fq - ref).square().mean()), float((lq - ref).square().mean())))
    fake, real = sum(e[0] for e in errs), sum(e[1] for e in errs)
    assert fake == pytest.approx(real, rel=0.05)


def test_auto_beats_the_uniform_format_of_its_size(dit: ModelProbe, tmp_path: Path) -> None:
    uniform = tmp_path / "int8-rot.safetensors"
    convert(DIT_FIXTURE, uniform, format="int8-rot", progress=False)
    ratio = _bytes(uniform) / _bytes(DIT_FIXTURE)
    out = tmp_path / "auto.safetensors"
    rep = convert(DIT_FIXTURE, out, format="auto", budget=f"size={ratio:.6f}", probe=dit, progress=False)
    assert _bytes(out) <= _bytes(uniform)
    auto, base = rep.auto.heldout["psnr"], dit.heldout(uniform)["psnr"]
    assert auto >= base + 1.0, (auto, base)
    assert rep.auto.measured["psnr"] == pytest.approx(rep.auto.predicted["psnr"], abs=2.0)


def test_psnr_floor_holds_on_heldout_samples(dit: ModelProbe, tmp_path: Path) -> None:
    """The floor is planned on the 95% lower confidence bound of the 10 calibration samples' mean PSNR plus a
    fixed margin, checked there with the whole plan applied, and holds on 30 held-out samples."""
    out = tmp_path / "auto.safetensors"
    rep = convert(DIT_FIXTURE, out, format="auto", budget="psnr=47", probe=dit, progress=False)
    f = rep.auto.floor
    assert rep.auto.heldout["psnr"] >= 47.0
    assert (f["items"], f["confidence"], f["target"]) == (10, 0.95, 47.0)
    assert f["measured_bound"] >= f["floor"] == 47.0 + f["margin_db"]
    assert f["measured_mean"] == pytest.approx(rep.auto.measured["psnr"])
    assert f["measured_mean"] - f["measured_bound"] == pytest.approx(
        t_quantile(0.95, 9) * f["measured_sd"] / math.sqrt(10))
    assert f["measured_sd"] > 0.5  # the samples do spread: the bound is real headroom, not zero
    assert rep.auto.summary()["floor"] == f and "95% one-sided, n 10 calibration items" in rep.auto.to_text()
    assert rep.auto.size_ratio < 0.9
    assert any("met on held-out inputs" in n for n in rep.auto.notes)


def test_cosine_floor_holds_on_heldout_sentences(tmp_path: Path) -> None:
    probe = minilm_probe(sentences=16)
    cfg = tmp_path / "rules.json"
    cfg.write_text('{"rules": [{"pattern": "^embeddings\\\\.", "format": "skip"}]}')
    out = tmp_path / "auto.safetensors"
    rep = convert(probe_source(), out, format="auto", budget="cosine=0.9993", probe=probe, layer_config=cfg,
                  progress=False)
    assert rep.auto.heldout["cosine"] >= 0.9993
    assert rep.auto.heldout["items"] == 213
    assert rep.auto.size_ratio < 0.66  # float32 input (int8-rot everywhere: 0.646; embeddings stay float32)


def probe_source() -> Path:
    from comfyquant.eval.minilm import weights_path

    return weights_path()


def test_eval_harness_reports_the_auto_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyquant eval --format auto``: the plan, its predictions and the held-out measurement in one report."""
    import comfyquant.eval.autoprobe as autoprobe
    from comfyquant.eval.harness import EvalConfig, run_eval

    small = dit_probe(per_class=1, steps=4)
    monkeypatch.setattr(autoprobe, "probe_for", lambda src: small)  # a shorter probe run, same code path
    rep = run_eval(EvalConfig(model="digits-dit", format="auto", out=tmp_path / "e", budget="size=0.5",
                              sampling=SampleConfig(steps=4, per_class=2)))
    auto = rep["auto"]
    assert rep["format"] == "auto" and auto["budget"] == "size=0.5" and auto["size"] <= 0.5
    assert auto["heldout"]["psnr"] == rep["metrics"]["psnr_db"]["mean"] and auto["heldout"]["items"] == 20
    assert "psnr" in auto["predicted"] and "psnr" in auto["measured_calibration"]
    assert set(auto["layers"].values()) - {"keep"}
    assert "auto budget" in (tmp_path / "e" / "report.md").read_text()


def test_probe_runs_each_assignment_once() -> None:
    """Planning several budgets with one probe (auto_frontier, a node re-planning) must not redo the per-layer
    gain runs: a repeated assignment reuses its measured distortion, a different one is run."""
    from comfyquant.autoprec.probe import cosine_of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    x = torch.randn(8, 32)
    runs = []

    def run(m: torch.nn.Module) -> torch.Tensor:
        runs.append(1)
        return torch.nn.functional.normalize(m(x), dim=1)

    probe = ModelProbe("tiny", "cosine", model, run, lambda a, b: (a - b).square().sum(1), cosine_of,
                       lambda p: {})
    int8, rot = get_format("int8"), get_format("int8-rot")
    first = probe.distortion({"0": (int8, int8.resolve((32, 32)))})
    assert len(runs) == 2 and float(first.sum()) > 0  # the reference run, then the quantized one
    first.zero_()  # a caller changing its result does not change what is remembered
    again = probe.distortion({"0": (int8, int8.resolve((32, 32)))})
    assert len(runs) == 2 and float(again.sum()) > 0
    probe.distortion({"0": (rot, rot.resolve((32, 32)))})
    probe.distortion({"0": (int8, int8.resolve((32, 32))), "1": (int8, int8.resolve((16, 32)))})
    assert len(runs) == 4
