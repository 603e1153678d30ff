"""The LoRA node's engine (``comfyquant.nodes.loras``) in-process with ComfyUI 0.30's own ModelPatcher, Flux class
and LoRA code: a LoRA on the quantized digits DiT against the same LoRA on the float model (ComfyUI's own merge),
dynamic vs bake, stacking, the input MODEL left alone, lowvram loads, and bad files.

Bounds: each test LoRA moves one forward of the DiT by ~14%; int8 W8A8 adds 0.32% error to it (measured), the
LoRA on the quantized model lands 0.35% (dynamic) / 0.44% (bake) from the LoRA on the float model, so every
quantized result must be within 1% of the float result with the same LoRAs, and 10% away from any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_server_fixtures import dit_forward, make_lora, rel_err
from safetensors.torch import load_file, save_file

from comfyquant.errors import UserError
from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.lora.sidepath import LoRASidePath
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.loras import LoraRequest, apply_loras
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.settings import AdapterSettings

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]
QKV = "diffusion_model.double_blocks.0.img_attn.qkv"
BOUND = 0.01
SCALE = 0.12  # make_lora's factor scale: a clear effect on one forward


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("loras")
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    save_file(make_lora(seed=0, scale=SCALE), str(a))
    save_file(make_lora(seed=1, scale=SCALE), str(b))
    return a, b


@pytest.fixture(scope="module")
def models(comfy: Any, dit_sd: dict) -> tuple[Any, Any]:
    """(float ModelPatcher, its int8 adapter clone)."""
    base = comfy.sd.load_diffusion_model_state_dict(dict(dit_sd), model_options={})
    q, _ = adapt_model(base, AdapterSettings(format="int8"))
    return base, q


def _stock(comfy: Any, patcher: Any, *files: Path, strengths: tuple[float, ...] = ()) -> Any:
    for f, s in zip(files, strengths or (1.0,) * len(files), strict=True):
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(f)), s, 0.0)
    return patcher


def test_dynamic_and_bake_match_the_lora_on_the_float_model(comfy: Any, dit_sd: dict, models: tuple,
                                                           lora_files: tuple) -> None:
    base, q = models
    a, _ = lora_files
    plain = dit_forward(q, dit_sd)
    ref = dit_forward(_stock(comfy, base, a), dit_sd)
    assert rel_err(plain, ref) > 10 * BOUND  # the LoRA matters
    before = {k: m for k, m in q.object_patches.items()}
    dyn, rep = apply_loras(q, [LoraRequest(str(a), 1.0)], "dynamic")
    assert len(rep.dynamic) == 20 and not rep.baked and rep.matches[0].matched == rep.matches[0].modules
    layer = dyn.object_patches[QKV]
    assert isinstance(layer.adapter, LoRASidePath)
    assert layer.qweight.qdata.data_ptr() == q.object_patches[QKV].qweight.qdata.data_ptr()  # shared, not copied
    assert q.object_patches == before and all(getattr(m, "adapter", None) is None for m in q.object_patches.values())
    baked, rep_b = apply_loras(q, [LoraRequest(str(a), 1.0)], "bake")
    assert len(rep_b.baked) == 20 and baked.object_patches[QKV].adapter is None
    got_d, got_b = dit_forward(dyn, dit_sd), dit_forward(baked, dit_sd)
    assert rel_err(got_d, ref) < BOUND and rel_err(got_b, ref) < BOUND, (rel_err(got_d, ref), rel_err(got_b, ref))
    assert rel_err(got_d, got_b) < BOUND
    assert torch.equal(dit_forward(q, dit_sd), plain)  # the input MODEL is unchanged
    low = dit_forward(dyn, dit_sd, device_to=torch.device("cpu"), lowvram_model_memory=1)
    assert rel_err(low, got_d) < 1e-5


def test_stacking_in_a_chain_or_in_one_node_gives_both_effects(comfy: Any, dit_sd: dict, models: tuple,
                                                               lora_files: tuple) -> None:
    base, q = models
    a, b = lora_files
    ref_ab = dit_forward(_stock(comfy, base, a, b), dit_sd)
    ref_a = dit_forward(_stock(comfy, base, a), dit_sd)
    ref_b = dit_forward(_stock(comfy, base, b), dit_sd)
    first, _ = apply_loras(q, [LoraRequest(str(a), 1.0)])
    chain, _ = apply_loras(first, [LoraRequest(str(b), 1.0)])
    one, _ = apply_loras(q, [LoraRequest(str(a), 1.0), LoraRequest(str(b), 1.0)])
    mixed, _ = apply_loras(apply_loras(q, [LoraRequest(str(a), 1.0)], "bake")[0], [LoraRequest(str(b), 1.0)])
    assert chain.object_patches[QKV].adapter.rank == 8 and first.object_patches[QKV].adapter.rank == 4
    got = {n: dit_forward(m, dit_sd) for n, m in (("chain", chain), ("one", one), ("mixed", mixed))}
    for name, out in got.items():
        assert rel_err(out, ref_ab) < BOUND, (name, rel_err(out, ref_ab))
        assert rel_err(out, ref_a) > 10 * BOUND and rel_err(out, ref_b) > 10 * BOUND
    assert rel_err(got["chain"], got["one"]) < 1e-5


@pytest.mark.parametrize("mode", ["dynamic", "bake"])
def test_strengths_scale_each_lora_as_stock_comfyui_does(comfy: Any, dit_sd: dict, models: tuple,
                                                         lora_files: tuple, mode: str) -> None:
    base, q = models
    a, b = lora_files
    ref = dit_forward(_stock(comfy, base, a, b, strengths=(0.5, -0.8)), dit_sd)
    got = dit_forward(apply_loras(q, [LoraRequest(str(a), 0.5), LoraRequest(str(b), -0.8)], mode)[0], dit_sd)
    assert rel_err(got, ref) < BOUND, rel_err(got, ref)
    full = dit_forward(_stock(comfy, base, a, b), dit_sd)
    assert rel_err(got, full) > 10 * BOUND  # the strengths matter


def test_stock_lora_and_ours_on_one_model_apply_both(comfy: Any, dit_sd: dict, models: tuple,
                                                     lora_files: tuple) -> None:
    base, q = models
    a, b = lora_files
    ref_ab = dit_forward(_stock(comfy, base, a, b), dit_sd)
    ours_then_stock = _stock(comfy, apply_loras(q, [LoraRequest(str(a), 1.0)])[0], b)
    stock_then_ours = apply_loras(_stock(comfy, q, b), [LoraRequest(str(a), 1.0)])[0]
    for m in (ours_then_stock, stock_then_ours):
        assert rel_err(dit_forward(m, dit_sd), ref_ab) < BOUND


def test_on_the_float_model_it_patches_through_comfyui(comfy: Any, dit_sd: dict, models: tuple,
                                                       lora_files: tuple) -> None:
    base, _ = models
    a, _ = lora_files
    ours, rep = apply_loras(base, [LoraRequest(str(a), 0.7)])
    assert not rep.dynamic and len(rep.float_patched) == 20 and not ours.object_patches
    stock, _ = comfy.sd.load_lora_for_models(base, None, load_file(str(a)), 0.7, 0.0)
    assert rel_err(dit_forward(ours, dit_sd), dit_forward(stock, dit_sd)) < 1e-5
    # the adapter bakes our patches into the float weights before quantizing, as it does stock ones
    q, report = adapt_model(ours, AdapterSettings(format="int8"))
    assert len(report.baked_loras) == 20 and not q.patches
    assert rel_err(dit_forward(q, dit_sd), dit_forward(stock, dit_sd)) < BOUND


def test_dora_layers_are_baked_and_strength_zero_is_a_no_op(comfy: Any, dit_sd: dict, models: tuple,
                                                            tmp_path: Path) -> None:
    base, q = models
    sd = make_lora(seed=2, scale=SCALE)
    layer = "diffusion_model.double_blocks.0.img_attn.qkv"
    sd[f"{layer}.dora_scale"] = load_file(str(DIT_FIXTURE))["double_blocks.0.img_attn.qkv.weight"].float().norm(
        dim=1, keepdim=True) * 1.1
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    out, rep = apply_loras(q, [LoraRequest(str(path), 1.0)], "dynamic")
    assert rep.baked == ["double_blocks.0.img_attn.qkv"] and len(rep.dynamic) == 19
    assert any("DoRA" in n for n in rep.notes)
    ref = dit_forward(_stock(comfy, base, path), dit_sd)
    assert rel_err(dit_forward(out, dit_sd), ref) < BOUND
    same, rep0 = apply_loras(q, [LoraRequest(str(path), 0.0)])
    assert same is q and not rep0.dynamic


def test_a_lora_for_another_model_is_a_user_error_naming_file_and_key(models: tuple, tmp_path: Path) -> None:
    _, q = models
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_some_other_net_to_q.lora_up.weight": torch.ones(8, 4),
               "lora_unet_some_other_net_to_q.lora_down.weight": torch.ones(4, 8)}, str(foreign))
    with pytest.raises(UserError, match=r"foreign\.safetensors.*none of its 1 modules.*first key "
                                        r"'lora_unet_some_other_net_to_q\.lora_(up|down)\.weight'"):
        apply_loras(q, [LoraRequest(str(foreign), 1.0)])
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({f"{QKV}.lora_up.weight": torch.ones(100, 4), f"{QKV}.lora_down.weight": torch.ones(4, 64)},
              str(wrong_shape))
    with pytest.raises(UserError, match=r"shape\.safetensors.*made for another model"):
        apply_loras(q, [LoraRequest(str(wrong_shape), 1.0)])
    with pytest.raises(UserError, match="mode"):
        apply_loras(q, [LoraRequest(str(foreign), 1.0)], "merge")


def test_side_path_moves_with_the_layer() -> None:
    from comfyquant.lora.sidepath import SideEntry
    from comfyquant.runtime.tensor import QuantizedTensor

    qt = QuantizedTensor.from_float(torch.randn(32, 64), "int8")
    layer = ComfyQuantLinear.wrap(qt, None)
    layer.adapter = LoRASidePath()
    layer.adapter.add(1, SideEntry(down=torch.randn(4, 64), up=torch.randn(32, 4)))
    copy = ComfyQuantLinear.derive(layer)
    copy.to(torch.float64)
    assert copy.adapter.down.dtype == torch.float64 and layer.adapter.down.dtype == torch.float32
    copy.adapter.add(2, SideEntry(down=torch.randn(4, 64, dtype=torch.float64),
                                  up=torch.randn(32, 4, dtype=torch.float64)))
    assert copy.adapter.rank == 8 and layer.adapter.rank == 4


def test_saving_a_model_with_dynamic_loras_bakes_them_into_the_file(comfy: Any, dit_sd: dict, models: tuple,
                                                                   lora_files: tuple, tmp_path: Path) -> None:
    from comfyquant.nodes.loader import load_quantized_model
    from comfyquant.nodes.save import save_quantized_model
    from comfyquant.nodes.settings import RuntimeOptions

    base, q = models
    a, _ = lora_files
    ref = dit_forward(_stock(comfy, base, a), dit_sd)
    dyn, _ = apply_loras(q, [LoraRequest(str(a), 1.0)], "dynamic")
    path = tmp_path / "dyn.safetensors"
    formats = save_quantized_model(dyn, path)
    assert formats.get("int8_tensorwise") == 20, formats
    loaded, summary = load_quantized_model(path, RuntimeOptions(), None)
    assert summary.folded == 4 and "4 activations folded" in summary.line()  # the MLPs' GELUs
    got = dit_forward(loaded, dit_sd)
    assert rel_err(got, ref) < BOUND, rel_err(got, ref)  # without the side path: 14% away
    assert rel_err(got, dit_forward(dyn, dit_sd)) < BOUND
    unfolded, s2 = load_quantized_model(path, RuntimeOptions(fold_activations=False), None)
    assert s2.folded == 0 and torch.equal(dit_forward(unfolded, dit_sd), got)


@pytest.mark.parametrize("mode", ["dynamic", "bake"])
def test_a_mixed_precision_auto_model_takes_loras_too(comfy: Any, dit_sd: dict, models: tuple, lora_files: tuple,
                                                     mode: str) -> None:
    base, _ = models
    a, _ = lora_files
    mixed, rep = adapt_model(base, AdapterSettings(format="auto", budget="size=0.2"))
    assert len(rep.formats) >= 2, rep.formats  # int8 and rotated int4 layers
    ref = dit_forward(_stock(comfy, base, a), dit_sd)
    plain = dit_forward(mixed, dit_sd)
    got = dit_forward(apply_loras(mixed, [LoraRequest(str(a), 1.0)], mode)[0], dit_sd)
    # measured on one forward: the plan alone is 2.9% from float, the LoRA 14%
    assert rel_err(got, ref) < 0.06 and rel_err(got, ref) < 0.4 * rel_err(plain, ref), (rel_err(got, ref),
                                                                                      rel_err(plain, ref))
