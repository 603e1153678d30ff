"""``--format auto`` through the converter, inspect, the CLI and ``quantize_``: the budget holds in real bytes,
the file holds exactly the chosen formats, the predicted layer errors are the written ones, bad budgets write
nothing, and stock ComfyUI 0.30 loads and runs the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from comfyquant.autoprec import KEEP
from comfyquant.calibration.stats import CalibrationStats, LayerStats
from comfyquant.cli.main import main
from comfyquant.convert.api import convert
from comfyquant.convert.inspect import inspect_checkpoint
from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.quantize import QuantizeConfig, quantize_
from tests.convert_helpers import flux_like, leftovers, write

pytestmark = pytest.mark.cpu_int8


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("auto") / "flux.safetensors", flux_like())


def _calibration(path: Path, seed: int = 0) -> CalibrationStats:
    """Per-layer inputs with a few outlier channels (what real activations look like)."""
    gen = torch.Generator().manual_seed(seed)
    out = CalibrationStats(meta={"source": "test inputs"})
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            if k.endswith(".weight") and len(shape) == 2 and min(shape) >= 16:
                x = torch.randn(64, shape[1], generator=gen)
                x[:, : max(1, shape[1] // 16)] *= 12.0
                s = LayerStats.empty(shape[1], 64)
                s.update(x, gen)
                out.layers[k[:-7]] = s
    return out


def _tensor_bytes(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def _stored_formats(path: Path) -> dict[str, str]:
    """Layer -> registry format name of every quantized layer of a written file."""
    sd = load_file(str(path))
    out = {}
    for k, t in sd.items():
        if k.endswith(".comfy_quant"):
            layer = k[: -len(".comfy_quant")]
            shapes = {s[len(layer) + 1:]: tuple(v.shape) for s, v in sd.items() if s.startswith(layer + ".")}
            out[layer] = REGISTRY.identify(decode_comfy_quant(t), shapes).name
    return out


def test_size_budget_holds_in_real_bytes(flux_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.safetensors"
    rep = convert(flux_file, out, format="auto", budget="size=0.45", calibration=_calibration(flux_file),
                  progress=False)
    auto = rep.auto
    assert auto is not None and rep.format == "auto"
    written = _tensor_bytes(out)
    assert written == auto.bytes_out == rep.bytes_after
    assert written <= 0.45 * _tensor_bytes(flux_file)
    chosen = auto.formats()
    stored = _stored_formats(out)
    assert {k: v for k, v in chosen.items() if v != KEEP and REGISTRY.get(v).is_quantized} == stored
    sd, src = load_file(str(out)), load_file(str(flux_file))
    for layer, fmt in chosen.items():
        if fmt == KEEP:
            assert torch.equal(sd[f"{layer}.weight"], src[f"{layer}.weight"])
    assert {x.rule for x in rep.layers if x.name.removesuffix(".weight") in chosen} == {"auto"}
    assert all(REGISTRY.get(f).stock_comfy for f in stored.values())
    assert "tiny.weight" not in {f"{k}.weight" for k in chosen}  # 8x8: not a linear weight, stays as it is
    for layer, fmt in stored.items():  # int4-rot runs W4A8 in stock ComfyUI too, as it was measured
        assert (decode_comfy_quant(sd[f"{layer}.comfy_quant"]).get("linear_dtype") == "int8") == (fmt == "int4-rot")
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["comfyquant.auto"])
    assert meta["layers"] == chosen and meta["budget"] == "size=0.45"
    assert "int4-rot" in stored.values()
    text = inspect_checkpoint(out).to_text()
    assert "auto precision: budget size=0.45" in text
    kept = [k for k, v in chosen.items() if v == KEEP]
    if kept:
        assert "kept in high precision by the plan" in text


def test_predicted_layer_errors_are_the_written_ones(flux_file: Path, tmp_path: Path) -> None:
    """RTN writes exactly the tensors the sensitivity measured: tr(E H E^T) of the file's weights matches."""
    calib = _calibration(flux_file, seed=1)
    out = tmp_path / "auto.safetensors"
    rep = convert(flux_file, out, format="auto", budget="size=0.55", calibration=calib, progress=False)
    sd, src = load_file(str(out)), load_file(str(flux_file))
    from comfyquant.formats import dequantize_weight

    checked = 0
    for x in rep.auto.layers:
        if x.format == KEEP:
            continue
        tensors = {k[len(x.name) + 1:]: v for k, v in sd.items() if k.startswith(x.name + ".") and
                   "." not in k[len(x.name) + 1:] and k != f"{x.name}.comfy_quant"}
        conf = decode_comfy_quant(sd[f"{x.name}.comfy_quant"]) if f"{x.name}.comfy_quant" in sd else None
        deq = dequantize_weight(tensors, conf, torch.float64)
        w = src[f"{x.name}.weight"].double()
        h = calib[x.name].hessian_mean()
        e = w - deq
        want = float(((e @ h) * e).sum() / ((w @ h) * w).sum())
        assert x.weight_err == pytest.approx(want, rel=1e-9, abs=1e-15), x.name
        checked += 1
    assert checked >= 3


def test_explicit_layer_config_rules_stay(flux_file: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "rules.json"
    cfg.write_text(json.dumps({"rules": [{"pattern": r"^img_in$", "format": "fp8"},
                                         {"pattern": r"^final_layer\.", "skip": True}]}))
    rep = convert(flux_file, tmp_path / "o.safetensors", format="auto", budget="size=0.8", layer_config=cfg,
                  progress=False)
    assert "img_in" not in rep.auto.formats() and "final_layer.linear" not in rep.auto.formats()
    by_name = {x.name: x for x in rep.layers}
    assert by_name["img_in.weight"].format == "fp8" and by_name["img_in.weight"].rule.startswith("layer-config:")
    assert by_name["final_layer.linear.weight"].action == "keep"
    cfg.write_text(json.dumps({"_default": {"format": "int8"}, r"^img_in": {"format": "fp8"}}))
    with pytest.raises(UserError, match="catch-all default"):
        convert(flux_file, tmp_path / "p.safetensors", format="auto", budget="size=0.8", layer_config=cfg,
                progress=False)


@pytest.mark.parametrize(("args", "needle"), [
    (["--budget", "size=0.05"], "below what this model allows: the smallest output is 0."),
    (["--budget", "size=0.55,sqnr=60"], "needs size"),
    (["--budget", "psnr=40"], "needs a workload"),
    (["--budget", "cosine=2"], "(0, 1]"),
    ([], "--budget is required"),
    (["--budget", "size=0.5", "--fallback", "int8"], "--fallback does not apply"),
    (["--budget", "size=0.5", "--smoothquant", "--optimizer", "gptq", "--calibration", "synthetic"],
     "--smoothquant with --format auto"),
    (["--budget", "size=0.5", "--exclude", "img_in"], "per-layer options"),
    (["--budget", "psnr=45", "--auto-confidence", "1"], "--auto-confidence 1.0: must be a number in [0.5, 1)"),
    (["--budget", "psnr=45", "--auto-confidence", "0.3"], "--auto-confidence 0.3: must be a number in [0.5, 1)"),
    (["--budget", "psnr=45", "--auto-confidence", "nan"], "--auto-confidence nan: must be"),
    (["--budget", "psnr=45", "--auto-confidence", "high"], "argument --auto-confidence: invalid float value"),
    (["--budget", "psnr=45", "--auto-margin-db", "-0.5"], "--auto-margin-db -0.5: must be a number of dB >= 0"),
    (["--budget", "psnr=45", "--auto-margin-db", "inf"], "--auto-margin-db inf: must be"),
    (["--budget", "size=0.5", "--auto-confidence", "0.9"], "--auto-confidence applies to a psnr= or cosine="),
    (["--budget", "sqnr=30", "--auto-confidence", "0.9", "--auto-margin-db", "1"],
     "--auto-confidence and --auto-margin-db apply to a psnr= or cosine= --budget only"),
])
def test_bad_budgets_write_nothing(flux_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], needle: str) -> None:
    out = tmp_path / "never.safetensors"
    code = main(["convert", str(flux_file), "-o", str(out), "--format", "auto", "-q", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", [["--budget", "size=0.5"], ["--auto-confidence", "0.9"], ["--auto-margin-db", "1"]])
def test_budget_needs_format_auto(flux_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  flag: list[str]) -> None:
    code = main(["convert", str(flux_file), "-o", str(tmp_path / "x.safetensors"), *flag, "-q"])
    assert code == 2 and f"{flag[0]} applies to --format auto only" in capsys.readouterr().err


def test_floor_confidence_and_margin_reach_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--auto-confidence`` / ``--auto-margin-db`` (and ``convert``'s keywords) are what the floor is planned
    on: the file's ``comfyquant.auto`` metadata, the API's plan and ``inspect --format auto`` record them."""
    import comfyquant.cli.main as cli
    from tests.test_autoprec import _tiny_probe

    probe = _tiny_probe(6)
    src = write(tmp_path / "mlp.safetensors", {k: v.detach().contiguous() for k, v in probe.model.state_dict().items()})
    monkeypatch.setattr(cli, "auto_probe", lambda fmt, model: probe)
    out = tmp_path / "auto.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--format", "auto", "--budget", "psnr=45",
                 "--auto-confidence", "0.5", "--auto-margin-db", "0.25", "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        floor = json.loads(f.metadata()["comfyquant.auto"])["floor"]
    assert (floor["confidence"], floor["margin_db"], floor["floor"], floor["t"]) == (0.5, 0.25, 45.25, 0.0)
    assert floor["measured_bound"] == floor["measured_mean"] >= 45.25  # at 0.5 the bound is the mean
    rep = convert(src, tmp_path / "api.safetensors", format="auto", budget="psnr=45", probe=probe, progress=False,
                  auto_confidence=0.99, auto_margin_db=0)
    assert (rep.auto.floor["confidence"], rep.auto.floor["margin_db"], rep.auto.floor["floor"]) == (0.99, 0.0, 45.0)
    default = convert(src, tmp_path / "default.safetensors", format="auto", budget="psnr=45", probe=probe,
                      progress=False)
    assert (default.auto.floor["confidence"], default.auto.floor["margin_db"]) == (0.95, 0.5)
    capsys.readouterr()
    assert main(["inspect", str(src), "--format", "auto", "--budget", "psnr=45", "--auto-confidence", "0.8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["floor"]["confidence"] == 0.8


def test_inspect_plans_auto_without_writing(flux_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(flux_file), "--format", "auto", "--budget", "sqnr=35", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "auto" and d["auto"]["budget"] == "sqnr=35"
    assert all(x["output_sqnr_db"] == "inf" or x["output_sqnr_db"] >= 35 for x in d["auto"]["layers"])
    chosen = {x["name"]: x["format"] for x in d["auto"]["layers"]}
    planned = {e["name"][:-7]: e["format"] for e in d["entries"] if e["name"][:-7] in chosen}
    assert planned == {k: None if v == KEEP else v for k, v in chosen.items()}


def test_candidates_follow_the_policy(flux_file: Path, tmp_path: Path) -> None:
    rep = convert(flux_file, tmp_path / "a.safetensors", format="auto", budget="sqnr=20", progress=False)
    assert "int8-block" not in rep.auto.candidates
    rep = convert(flux_file, tmp_path / "b.safetensors", format="auto", budget="sqnr=20", progress=False,
                  allow_comfyquant_formats=True)
    assert "int8-block" in rep.auto.candidates


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_quantize_auto_in_memory() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(32, 64)
    ref = model(x).detach()
    from comfyquant.calibration.collector import calibrate

    stats = calibrate(model, [x])
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    summary = quantize_(model, QuantizeConfig(format="auto", budget="size=0.5", calibration=stats))
    assert summary.auto is not None and summary.format == "auto"
    sizes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert summary.auto.bytes_out <= 0.5 * total
    quantized = {d.name: d.format for d in summary.layers if d.action == "quantized"}
    assert quantized and all(isinstance(model.get_submodule(n), QuantLinear) for n in quantized)
    assert sizes < total
    with torch.no_grad():
        y = model(x)
    assert float((y - ref).square().mean() / ref.square().mean()) < 1e-2
    model2 = _Tiny()
    s2 = quantize_(model2, QuantizeConfig(format="auto", layer_formats={"a": "int8-rot", "b": KEEP, "head": "fp8"}))
    assert [(d.name, d.action, d.format) for d in s2.layers] == [
        ("a", "quantized", "int8-rot"), ("b", "kept", None), ("head", "quantized", "fp8")]
    with pytest.raises(UserError, match="budget"):
        QuantizeConfig(format="auto")
    with pytest.raises(UserError, match="format='auto' only"):
        QuantizeConfig(format="int8", budget="size=0.5")


@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.comfyui
def test_stock_comfyui_runs_the_auto_dit(comfy: Any, tmp_path: Path) -> None:
    """The digits DiT planned to 60% of its bytes (modulation layers included) loads in ComfyUI 0.30's own Flux."""
    from comfyquant.eval.dit import flux_keys
    from comfyquant.eval.workloads import DIT_FIXTURE
    from tests.test_eval_comfyui_flux import _comfy_flux, _inputs, _ours

    out = tmp_path / "dit-auto.safetensors"
    rep = convert(DIT_FIXTURE, out, format="auto", budget="size=0.6", progress=False)
    assert _tensor_bytes(out) <= 0.6 * _tensor_bytes(DIT_FIXTURE)
    dm = _comfy_flux(comfy, dict(flux_keys(load_file(str(out)))))
    quantized = [n for n, m in dm.named_modules() if type(getattr(m, "weight", None)).__name__ == "QuantizedTensor"]
    assert set(quantized) == set(_stored_formats(out)) and len(quantized) >= 20
    assert any(".img_mod.lin" in n for n in rep.auto.formats())
    ours = _ours()
    x, t, ctx, y = _inputs(ours)
    with torch.no_grad():
        ref = ours(x, t, ctx, y)
        got = dm(x, t, ctx, y=y)
    rel = float((got - ref).square().mean().sqrt() / ref.square().mean().sqrt())
    assert rel < 0.01


def test_inspect_prints_the_stored_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``comfyquant inspect FILE`` prints the floor stored in ``comfyquant.auto`` on one line; a file written
    before the floor was recorded (no key) shows no floor line, a malformed record says so, neither fails."""
    from tests.test_autoprec import _tiny_probe

    probe = _tiny_probe(6)
    src = write(tmp_path / "mlp.safetensors", {k: v.detach().contiguous() for k, v in probe.model.state_dict().items()})
    out = tmp_path / "auto.safetensors"
    convert(src, out, format="auto", budget="psnr=45", probe=probe, progress=False, auto_confidence=0.975)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = [x.strip() for x in capsys.readouterr().out.splitlines() if x.strip().startswith("floor:")]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    floor = json.loads(meta["comfyquant.auto"])["floor"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("floor: psnr >= 45 planned as mean - t sd / sqrt(n) >= 45.5 (97.5% one-sided, n 6 ")
    assert "margin 0.5 dB" in lines[0]
    for key in ("predicted_mean", "predicted_bound", "measured_mean", "measured_bound"):
        assert f"{floor[key]:.6g}" in lines[0]
    summary = json.loads(meta["comfyquant.auto"])
    del summary["floor"]  # as 6e4fecf's predecessors wrote it
    old = write(tmp_path / "old.safetensors", tensors, {**meta, "comfyquant.auto": json.dumps(summary)})
    assert main(["inspect", str(old)]) == 0
    text = capsys.readouterr().out
    assert "auto precision: budget psnr=45" in text and "floor" not in text
    summary["floor"] = {"metric": "psnr", "target": 45.0}
    bad = write(tmp_path / "bad.safetensors", tensors, {**meta, "comfyquant.auto": json.dumps(summary)})
    assert main(["inspect", str(bad)]) == 0
    assert "floor: unreadable record in comfyquant.auto (missing or not numbers: floor, confidence" in \
        capsys.readouterr().out


def test_quantize_config_takes_the_planner_settings() -> None:
    """``QuantizeConfig.auto_config`` is what ``quantize_`` plans a floor with (its confidence and margin reach
    the plan), and is refused where nothing is planned."""
    from comfyquant.autoprec import AutoConfig
    from tests.test_autoprec import _tiny_probe

    probe = _tiny_probe(6)
    summary = quantize_(probe.model, QuantizeConfig(format="auto", budget="psnr=45", probe=probe,
                                                    auto_config=AutoConfig(confidence=0.5, margin_db=0.25)))
    floor = summary.auto.floor
    assert (floor["confidence"], floor["margin_db"], floor["floor"], floor["t"]) == (0.5, 0.25, 45.25, 0.0)
    with pytest.raises(UserError, match="format='auto' only"):
        QuantizeConfig(format="int8", auto_config=AutoConfig())
    with pytest.raises(UserError, match="not to layer_formats"):
        QuantizeConfig(format="auto", layer_formats={"a": "fp8"}, auto_config=AutoConfig())
