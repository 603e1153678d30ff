"""``format = auto`` on "Enable INT8 on MODEL" (issue 13), in-process with ComfyUI 0.30's own ModelPatcher and
Flux class on the digits DiT: the plan meets the size budget on the model's real bytes, beats the uniform
format that fits the same budget, mixes formats with each layer on its own backend, re-runs from the memo, and
bad budgets are one clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from comfyui_server_fixtures import dit_forward, rel_err

from comfyquant.errors import UserError
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.settings import AdapterSettings

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]


@pytest.fixture(scope="module")
def base(comfy: Any, dit_sd: dict) -> Any:
    return comfy.sd.load_diffusion_model_state_dict(dict(dit_sd), model_options={})


def _model_bytes(patcher: Any) -> int:
    """Bytes of the diffusion model's tensors as the patched MODEL holds them (quantized layers at their size)."""
    dm = patcher.model.diffusion_model
    total = 0
    for name, live in dm.named_modules():
        if live._modules:
            continue
        mod = patcher.get_model_object("diffusion_model." + name) if name else live
        total += sum(p.nbytes for p in mod.parameters(recurse=False))
    return total + sum(b.nbytes for b in dm.buffers())


def test_auto_meets_the_size_budget_and_beats_the_uniform_formats(base: Any, dit_sd: dict) -> None:
    """Measured on the digits DiT (float32 model bytes; the uniform formats keep the preset's layers):
    int8 0.515 of the bytes at 0.32% error, int4-rot 0.434 at 3.2%; auto 0.449 at 0.29%, 0.200 at 2.9%."""
    ref = dit_forward(base, dit_sd)
    before = _model_bytes(base)
    cache = QuantCache()
    got = {}
    for name, settings in (("int8", AdapterSettings(format="int8")), ("int4", AdapterSettings(format="int4-rot")),
                           ("auto45", AdapterSettings(format="auto", budget="size=0.45")),
                           ("auto20", AdapterSettings(format="auto", budget="size=0.2"))):
        model, report = adapt_model(base, settings, cache=cache)
        got[name] = (model, report, _model_bytes(model) / before, rel_err(dit_forward(model, dit_sd), ref))
    for name, budget in (("auto45", 0.45), ("auto20", 0.2)):
        model, report, size, _ = got[name]
        assert size <= budget and report.auto.size_ratio <= budget, (name, size)
        assert sum(report.formats.values()) == len(report.converted)
        assert any(line.startswith(f"auto precision: budget size={budget}") for line in report.lines())
    # smaller than uniform int8 and no worse; under half of uniform int4-rot's bytes and still better
    assert got["auto45"][2] < got["int8"][2] and got["auto45"][3] <= got["int8"][3], (got["auto45"][2:], got["int8"][2:])
    assert got["auto20"][2] < 0.5 * got["int4"][2] and got["auto20"][3] < got["int4"][3]
    auto, report = got["auto20"][:2]
    layouts = {auto.object_patches[f"diffusion_model.{n}"].qweight.layout_name for n in report.converted}
    assert len(layouts) >= 2, layouts  # a real mix of the 4-bit and the 8-bit formats
    # a re-run quantizes nothing: the same plan, every layer from the memo, the same outputs
    again, rep2 = adapt_model(base, AdapterSettings(format="auto", budget="size=0.2"), cache=cache)
    assert sorted(rep2.cached) == sorted(report.converted)
    assert torch.equal(dit_forward(again, dit_sd), dit_forward(auto, dit_sd))


def test_auto_on_a_bf16_model_counts_its_real_bytes_and_pins_each_format_s_backend(comfy: Any,
                                                                                  dit_sd: dict) -> None:
    from comfyquant.nodes.settings import RuntimeOptions

    bf16 = comfy.sd.load_diffusion_model_state_dict(dict(dit_sd), model_options={"dtype": torch.bfloat16})
    settings = AdapterSettings(format="auto", budget="size=0.4", runtime=RuntimeOptions(backend="torch"))
    out, report = adapt_model(bf16, settings, cache=QuantCache())
    assert _model_bytes(out) <= 0.4 * _model_bytes(bf16), _model_bytes(out) / _model_bytes(bf16)
    layers = [out.object_patches[f"diffusion_model.{n}"] for n in report.converted]
    assert all(isinstance(m, ComfyQuantLinear) for m in layers)
    kinds = {m.qweight.layout_cls.kernel_kind for m in layers}
    assert len(kinds) >= 2 and all(m.qweight.params.backend == "torch" for m in layers), kinds


def test_bad_budgets_and_settings_are_one_clear_error(base: Any) -> None:
    with pytest.raises(UserError, match="budget"):
        AdapterSettings(format="auto", budget="smaller please")
    with pytest.raises(UserError, match="auto"):
        AdapterSettings(format="auto", outlier_method="hadamard").quant_format()
    with pytest.raises(UserError, match=r"size=0\.01"):
        adapt_model(base, AdapterSettings(format="auto", budget="size=0.01"), cache=QuantCache())
    assert AdapterSettings(format="int8", budget="not read unless auto").budget  # other formats ignore it


def test_auto_plans_for_the_gpu_it_runs_on_or_the_one_asked_for(base: Any) -> None:
    """nvfp4 / mxfp8 run natively on Blackwell only: they are candidates when the target (the load device, or
    the node's target_gpu) is Blackwell, and never on the CPU or an older GPU."""
    from comfyquant.formats.registry import gpu_generation
    from comfyquant.nodes.adapter import plan_target_gpu

    assert [gpu_generation(c) for c in ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))] == [
        None, "turing", "ampere", "ampere", "ada", "hopper", "blackwell", "blackwell"]
    assert plan_target_gpu("auto", torch.device("cpu")) is None
    assert plan_target_gpu("hopper", torch.device("cpu")) == "hopper"
    _, cpu = adapt_model(base, AdapterSettings(format="auto", budget="size=0.3"), cache=QuantCache())
    _, bw = adapt_model(base, AdapterSettings(format="auto", budget="size=0.3", target_gpu="blackwell"),
                        cache=QuantCache())
    assert "nvfp4" not in cpu.auto.candidates and "nvfp4" in bw.auto.candidates, (cpu.auto.candidates,
                                                                                    bw.auto.candidates)
    with pytest.raises(UserError, match="target_gpu"):
        AdapterSettings(format="auto", target_gpu="volta")
