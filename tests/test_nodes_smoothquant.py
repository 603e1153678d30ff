"""Enable INT8 on MODEL with outlier_method smoothquant, on the bundled digits DiT in ComfyUI 0.30's own Flux class.

Calibration: the converter's DiT sampling one image per class for 4 Euler steps (cond + uncond); held-out
activations: the same sampler with another seed, recorded at every linear layer's input. Measured (CPU, 1
thread): mean relative output error over the 20 converted layers 0.0088 plain int8 RTN -> 0.0072 smoothquant
(alpha 0.5); on the 8 layers whose input has channel outliers (max/median channel absmax >= 4) 0.0086 -> 0.0065;
one denoiser call against float 0.0032 -> 0.0028.
fp8 (scalar weight scale, activations per token) gains nothing measurable (0.0269 -> 0.0268), so fp8 is only
checked to run and stay within the bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_fixtures import model_patcher
from comfyui_server_fixtures import dit_forward, rel_err
from safetensors.torch import load_file

from comfyquant.calibration import CalibrationConfig, calibrate, calibrate_to_file, save_stats
from comfyquant.errors import UserError
from comfyquant.eval.calibration_sources import dit_source
from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.lora.rounding import requantize
from comfyquant.nodes.adapter import PREFIX, adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.save import model_state_for_saving, save_quantized_model
from comfyquant.nodes.settings import AdapterSettings
from comfyquant.runtime.tensor import QuantizedTensor

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]

INT8_BOUND = 0.05  # sampled latents of an int8 model against float (as the node server tests)
DENOISE_BOUND = 0.01  # one denoiser call of an int8 model against float (measured 0.0028 smoothquant, 0.0032 plain)
OUTLIER_RATIO = 4.0  # a layer "has activation outliers" when max/median of its input channels' absmax >= this


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = dit_source(per_class=1, steps=4)
    path = tmp_path_factory.mktemp("sq") / "digits_calib.safetensors"
    calibrate_to_file(src.model, src.run, path, config=CalibrationConfig(reservoir=16), meta=src.meta)
    return path


@pytest.fixture(scope="module")
def held_out() -> dict[str, torch.Tensor]:
    """Every linear layer's input rows (every 7th, at most 1024) from sampling with a seed calibration never saw."""
    src = dit_source(per_class=1, steps=4, seed=12345)
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in src.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def grab(_m: Any, args: tuple, name: str = name) -> None:
                rows.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float()[::7])
            hooks.append(mod.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            src.run(src.model)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v)[:1024] for n, v in rows.items()}


def _sq(calib: Path, **kw: Any) -> AdapterSettings:
    return AdapterSettings(**{"format": "int8", "outlier_method": "smoothquant", "calibration_file": str(calib),
                              **kw})


def _layer_errors(clone: Any, names: list[str], sd: dict, held: dict) -> dict[str, float]:
    """Per layer: relative error of the quantized layer's output (bias removed) against float64 x W^T."""
    out = {}
    for name in names:
        x, w = held[name], sd[name + ".weight"].double()
        ref = x.double() @ w.T
        layer = clone.object_patches[PREFIX + name]
        with torch.no_grad():
            y = F.linear(x, layer.qweight).double()  # the layer's own quantized product, through the runtime
        out[name] = float((y - ref).norm() / ref.norm())
    return out


def test_smoothquant_beats_plain_int8_on_layers_with_outliers_and_stays_near_float(
        comfy: Any, dit_sd: dict, calib_file: Path, held_out: dict, torch_single_thread: None) -> None:
    base = model_patcher(comfy, dit_sd)
    float_out = dit_forward(base, dit_sd)
    plain, plain_rep = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    smooth, rep = adapt_model(base, _sq(calib_file), cache=QuantCache())
    assert rep.converted == plain_rep.converted and len(rep.converted) == 20
    assert rep.smoothed == rep.converted  # the capture saw every layer
    assert "smoothquant (alpha 0.5, digits_calib.safetensors) on 20 layers" in rep.summary()
    for name in rep.converted:  # the stored weight is W diag(s), the layer multiplies x by p = 1/s
        qt = smooth.object_patches[PREFIX + name].qweight
        p = qt.params.pre_quant_scale
        assert p is not None and p.shape == (qt.shape[1],) and not torch.allclose(p, torch.ones_like(p))
        assert rel_err(qt.dequantize().float(), dit_sd[name + ".weight"].float()) < 0.02
    e_plain = _layer_errors(plain, rep.converted, dit_sd, held_out)
    e_sq = _layer_errors(smooth, rep.converted, dit_sd, held_out)
    absmax = {n: held_out[n].abs().amax(0) for n in rep.converted}
    outliers = [n for n in rep.converted if float(absmax[n].max() / absmax[n].median()) >= OUTLIER_RATIO]
    assert len(outliers) >= 5, outliers

    def mean(e: dict[str, float], names: list[str]) -> float:
        return sum(e[n] for n in names) / len(names)

    assert mean(e_sq, outliers) < 0.85 * mean(e_plain, outliers), (mean(e_sq, outliers), mean(e_plain, outliers))
    assert mean(e_sq, rep.converted) < 0.9 * mean(e_plain, rep.converted)
    # the whole denoiser (ComfyQuantLinear.forward: smoothing applied to x inside the runtime's linear)
    out_sq, out_plain = dit_forward(smooth, dit_sd), dit_forward(plain, dit_sd)
    err_sq, err_plain = rel_err(out_sq, float_out), rel_err(out_plain, float_out)
    assert 0 < err_sq < DENOISE_BOUND and err_sq < err_plain, (err_sq, err_plain)
    assert torch.equal(dit_forward(base, dit_sd), float_out)  # the input MODEL is unchanged


def test_fp8_smoothquant_runs_within_the_bound_and_the_cache_key_holds_file_and_alpha(
        comfy: Any, dit_sd: dict, calib_file: Path, tmp_path: Path, torch_single_thread: None) -> None:
    base = model_patcher(comfy, dit_sd)
    float_out = dit_forward(base, dit_sd)
    fp8, rep = adapt_model(base, _sq(calib_file, format="fp8"), cache=QuantCache())
    assert rep.smoothed == rep.converted and rep.formats == {"float8_e4m3fn": 20}
    assert 0 < rel_err(dit_forward(fp8, dit_sd), float_out) < 2 * INT8_BOUND
    cache = QuantCache()
    first, _ = adapt_model(base, _sq(calib_file), cache=cache)
    again, rep_again = adapt_model(base, _sq(calib_file), cache=cache)
    assert len(rep_again.cached) == 20
    other_alpha, rep_alpha = adapt_model(base, _sq(calib_file, alpha=0.8), cache=cache)
    copy = tmp_path / "copy.safetensors"  # the same statistics in another file: another identity
    copy.write_bytes(calib_file.read_bytes())
    _, rep_copy = adapt_model(base, _sq(copy), cache=cache)
    _, rep_plain = adapt_model(base, AdapterSettings(format="int8"), cache=cache)
    assert not rep_alpha.cached and not rep_copy.cached and not rep_plain.cached
    name = PREFIX + rep.converted[0]
    a, b = first.object_patches[name].qweight, other_alpha.object_patches[name].qweight
    hit = again.object_patches[name].qweight
    assert hit.qdata.data_ptr() == a.qdata.data_ptr() and torch.equal(hit.params.pre_quant_scale, a.params.pre_quant_scale)
    assert not torch.equal(a.params.pre_quant_scale, b.params.pre_quant_scale)


def test_save_refuses_a_smoothed_model_that_stock_comfyui_would_load_wrongly(
        comfy: Any, dit_sd: dict, calib_file: Path, tmp_path: Path, torch_single_thread: None) -> None:
    from comfyquant.io.writer import save_file

    base = model_patcher(comfy, dit_sd)
    smooth, _ = adapt_model(base, _sq(calib_file), cache=QuantCache())
    out = tmp_path / "sq.safetensors"
    with pytest.raises(UserError, match=r"smoothed .* stock ComfyUI 0\.30 ignores outside nvfp4"):
        save_quantized_model(smooth, out)
    assert not out.exists()
    # why: the file Save would have written, loaded by stock ComfyUI, runs x @ (W diag(s))^T unsmoothed
    save_file(tmp_path / "unchecked.safetensors", model_state_for_saving(smooth), {})
    stock = model_patcher(comfy, load_file(str(tmp_path / "unchecked.safetensors")))
    assert rel_err(dit_forward(stock, dit_sd), dit_forward(smooth, dit_sd)) > 10 * INT8_BOUND


def test_bad_smoothquant_inputs_are_one_line_errors_and_leave_the_model_alone(
        comfy: Any, dit_sd: dict, calib_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="smoothquant' needs calibration statistics"):
        AdapterSettings(outlier_method="smoothquant")
    with pytest.raises(UserError, match=r"alpha 1\.5 must be between 0 and 1"):
        _sq(calib_file, alpha=1.5)
    base = model_patcher(comfy, dit_sd)
    other = tmp_path / "other.safetensors"  # statistics of another model
    save_stats(calibrate(torch.nn.Sequential(torch.nn.Linear(8, 4)), [torch.randn(3, 8)]), other)
    cases = [(_sq(calib_file, format="int4-rot"), "applies to formats int8 and fp8; int4-rot"),
             (_sq(calib_file, format="int8-rot"), "applies to formats int8 and fp8; int8-rot"),
             (_sq(calib_file, format="auto"), "does not apply to format auto"),
             (_sq(tmp_path / "missing.safetensors"), "not found"),
             (_sq(DIT_FIXTURE), "not a comfyquant calibration file"),
             (_sq(other), "is from another model")]
    for settings, message in cases:
        with pytest.raises(UserError, match=message) as info:
            adapt_model(base, settings, cache=QuantCache())
        assert "\n" not in str(info.value)
        assert not base.object_patches and base.model_options.get("transformer_options", {}).get("comfyquant") is None


def test_pre_quant_scale_in_the_runtime_dequantize_linear_requantize_and_lora_bake() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 32, generator=g), torch.randn(5, 32, generator=g)
    w[:, 3] *= 20  # a heavy input channel
    p = torch.rand(32, generator=g) + 0.25
    qt = QuantizedTensor.from_float(w, "int8", pre_quant_scale=p)
    plain = QuantizedTensor.from_float(w / p[None, :], "int8")
    assert torch.equal(qt.qdata, plain.qdata) and torch.equal(qt.params.pre_quant_scale, p)
    assert torch.allclose(qt.dequantize(), plain.dequantize() * p[None, :])  # the logical weight is W
    assert torch.allclose(F.linear(x, qt), F.linear(x * p, plain), atol=1e-5)
    assert torch.allclose(x @ qt.t(), F.linear(x, qt), atol=1e-5)  # transposed view (mm path)
    assert set(qt.state_dict_tensors()) == {"weight", "weight_scale", "pre_quant_scale"}
    base_err = rel_err(qt.dequantize(), w)
    for stochastic in (False, True):  # requantizing the logical weight keeps the smoothing (one grid step at most)
        again = requantize(qt.dequantize().float(), qt, stochastic=stochastic, generator=g)
        assert torch.equal(again.params.pre_quant_scale, p)
        assert rel_err(again.dequantize(), w) < 2 * base_err
    layer = ComfyQuantLinear.wrap(qt, None)  # ComfyUI's LoRA bake: convert_weight, patch, set_weight
    delta = 0.1 * torch.randn(24, 32, generator=g)
    layer.set_weight(layer.convert_weight(layer.qweight) + delta)
    assert torch.equal(layer.qweight.params.pre_quant_scale, p)
    assert rel_err(layer(x), F.linear(x, w + delta)) < 2 * rel_err(F.linear(x, qt), F.linear(x, w))
