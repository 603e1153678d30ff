"""The node pack's engine driven in-process with ComfyUI 0.30's own ModelPatcher, Flux class and LoRA code:
object patches on a clone, the memo, bad models, lowvram partial loads, weight wrappers, the install command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_fixtures import model_patcher, patched
from comfyui_server_fixtures import dit_forward, make_lora, rel_err
from safetensors.torch import load_file

from comfyquant.errors import UserError
from comfyquant.nodes.adapter import MSG_AUTO_FAILED, MSG_NO_DIFFUSION, adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]


def test_adapter_patches_a_clone_and_leaves_the_input_alone(comfy: Any, dit_sd: dict) -> None:
    base = model_patcher(comfy, dit_sd)
    ref = dit_forward(base, dit_sd)
    cache = QuantCache()
    calls: list[tuple[int, int]] = []

    class Progress:  # ComfyUI's ProgressBar interface
        def update_absolute(self, value: int, total: int) -> None:
            calls.append((value, total))

    out, report = adapt_model(base, AdapterSettings(format="int8"), cache=cache, progress=Progress())
    assert len(calls) > 20 and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert out is not base and not base.object_patches and len(report.converted) == 20
    assert len(out.object_patches) == 20 + len(report.folded) and len(report.folded) == 4  # the MLPs' GELUs
    assert report.preset == "flux" and report.bytes_after < report.bytes_before / 3
    assert all(isinstance(m, ComfyQuantLinear | torch.nn.Identity) for m in out.object_patches.values())
    assert out.model_options["transformer_options"]["comfyquant"] == AdapterSettings(format="int8")
    q = dit_forward(out, dit_sd)
    assert 0 < rel_err(q, ref) < 0.01  # measured 0.0035
    assert torch.equal(dit_forward(base, dit_sd), ref)  # the shared model is back to float after unloading ours
    again, report2 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(backend="torch")),
                                 cache=cache)
    assert len(report2.cached) == 20 and len(cache) == 20
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    a, b = out.object_patches[name], again.object_patches[name]
    assert a is not b and a.qweight.qdata.data_ptr() == b.qweight.qdata.data_ptr()  # shared storage
    assert a.backend is None and b.backend == "torch"  # settings belong to each patched model
    assert torch.equal(dit_forward(again, dit_sd), q)


def test_model_without_diffusion_model_is_returned_unchanged(comfy: Any) -> None:
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(32, 32), torch.device("cpu"), torch.device("cpu"))
    out, report = adapt_model(patcher, AdapterSettings())
    assert out is patcher and report.messages == [MSG_NO_DIFFUSION] and not report.converted


def test_unknown_architecture_uses_the_conservative_union(comfy: Any) -> None:
    import comfy.model_patcher

    class Unknown(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.diffusion_model = torch.nn.ModuleDict({
                "stem": torch.nn.Linear(64, 64), "blocks": torch.nn.Sequential(torch.nn.Linear(64, 128),
                                                                                torch.nn.Linear(128, 64)),
                "final_layer": torch.nn.ModuleDict({"linear": torch.nn.Linear(64, 64)}),
                "norm": torch.nn.LayerNorm(64)})

    model = Unknown()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    out, report = adapt_model(patcher, AdapterSettings())
    assert MSG_AUTO_FAILED in report.messages and report.preset == "generic"
    assert set(report.converted) == {"stem", "blocks.0", "blocks.1"}
    assert ("final_layer.linear", next(r for n, r in report.kept if n == "final_layer.linear")) in report.kept
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(3, 64)
    with patched(out), torch.no_grad():
        got = out.model.diffusion_model["blocks"](x)
        assert isinstance(out.model.diffusion_model["blocks"][0], ComfyQuantLinear)
    with torch.no_grad():
        assert 0 < rel_err(got, model.diffusion_model["blocks"](x)) < 0.02


def test_lora_reaches_every_layer_in_a_lowvram_load_and_weight_wrappers_apply(comfy: Any, dit_sd: dict) -> None:
    import comfy.lora
    import comfy.sd

    base = model_patcher(comfy, dit_sd)
    q, _ = adapt_model(base, AdapterSettings(format="int8"))
    q_lora, _ = comfy.sd.load_lora_for_models(q, None, make_lora(), 1.0, 0.0)
    f_lora, _ = comfy.sd.load_lora_for_models(base, None, make_lora(), 1.0, 0.0)
    full = dit_forward(q_lora, dit_sd)
    low = dit_forward(q_lora, dit_sd, device_to=torch.device("cpu"), lowvram_model_memory=1)
    ref = dit_forward(f_lora, dit_sd)
    plain = dit_forward(q, dit_sd)
    assert rel_err(plain, ref) > 0.05  # the LoRA matters
    assert rel_err(full, ref) < 0.02 and rel_err(low, ref) < 0.02, (rel_err(full, ref), rel_err(low, ref))
    wrapped = q.clone()
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    wrapped.add_weight_wrapper(key, lambda w: w * 0)
    zeroed = dit_forward(wrapped, dit_sd)
    assert rel_err(zeroed, plain) > 0.01  # the wrapper ran on the quantized layer


def test_weight_wrappers_do_not_pile_up_across_loads_or_leak_into_other_clones(comfy: Any, dit_sd: dict) -> None:
    """ComfyUI's classic loader appends a clone's weight wrappers to each module's ``weight_function`` at every
    load and clears the list only on modules with its cast machinery, which our layers lack: the same wrapper ran
    once more per load (x0.5 twice on the second run), and ran in a sibling clone without it. Each load now gives
    our layers exactly its own patcher's wrappers."""
    base = model_patcher(comfy, dit_sd)
    q, _ = adapt_model(base, AdapterSettings(format="int8"))
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    layer = q.object_patches[key[:-len(".weight")]]
    plain = dit_forward(q, dit_sd)
    halved = q.clone()
    halved.add_weight_wrapper(key, lambda w: w * 0.5)
    first, second = dit_forward(halved, dit_sd), dit_forward(halved, dit_sd)
    assert rel_err(first, plain) > 0.01 and torch.equal(first, second)
    assert len(layer.weight_function) == 1
    assert torch.equal(dit_forward(q, dit_sd), plain)  # the clone without the wrapper shares the layer
    assert layer.weight_function == [] and layer.bias_function == []


def test_runtime_options_map_onto_backend_names_and_dispatch_policies() -> None:
    from comfyquant.runtime.kernels.registry import backends_for

    assert RuntimeOptions().backend_for("int8") is None
    for kind in ("int8", "fp8"):
        no_small = RuntimeOptions(small_batch_fallback=False).backend_for(kind)
        assert set(no_small.allow) == set(backends_for(kind)) - {"dequant", "triton_w8a16"} and no_small.mode == "eager"
        assert "torch" in no_small.allow
    assert RuntimeOptions(use_triton=False).backend_for("int8").allow == ("torch", "dequant")
    # int4_rot: the weight-only kernel is left out with the others, and the choice honours the allow list
    int4 = RuntimeOptions(small_batch_fallback=False).backend_for("int4_rot")
    assert set(int4.allow) == set(backends_for("int4_rot")) - {"dequant", "triton_w4a16"}
    assert RuntimeOptions(use_triton=False).backend_for("int4_rot").allow == ("torch", "dequant")
    assert RuntimeOptions(cuda_graphs=True).backend_for("int8").mode == "graph"
    measured = RuntimeOptions(measure_backends=True).backend_for("int8")
    assert measured.measure and measured.mode == "eager" and set(measured.allow) == set(backends_for("int8"))
    assert not RuntimeOptions(measure_backends=True, cuda_graphs=True).backend_for("int8").measure  # graphs: model
    assert RuntimeOptions(backend="torch").backend_for("fp8") == "torch"
    assert RuntimeOptions(backend="triton").backend_for("fp8") == "triton"  # the Triton FP8 W8A8 GEMM
    with pytest.raises(UserError, match="no kernel for int8_block"):
        RuntimeOptions(backend="triton").backend_for("int8_block")
    with pytest.raises(UserError, match="runtime_backend"):
        RuntimeOptions(backend="tensorrt")
    assert AdapterSettings(format="int8", outlier_method="hadamard").quant_format() == "int8-rot"


def test_install_nodes_links_or_copies_and_refuses_foreign_folders(tmp_path: Path) -> None:
    from comfyquant.cli.main import main
    from comfyquant.nodes.install import ENTRY_FILE, MARKER

    assert (Path(__file__).resolve().parent.parent / "__init__.py").read_text() == ENTRY_FILE
    assert main(["install-nodes", str(tmp_path)]) == 2  # no custom_nodes/ folder
    (tmp_path / "custom_nodes").mkdir()
    assert main(["install-nodes", str(tmp_path), "--example-model"]) == 0
    target = tmp_path / "custom_nodes" / "comfyquant"
    assert (target / "comfyquant").is_symlink() and (target / "__init__.py").read_text() == ENTRY_FILE
    assert (tmp_path / "models" / "diffusion_models" / "comfyquant_digits_dit.safetensors").exists()
    assert main(["install-nodes", str(tmp_path), "--copy"]) == 0  # replaces its own earlier install
    assert not (target / "comfyquant").is_symlink() and (target / "comfyquant" / "nodes" / "adapter.py").is_file()
    assert json.loads((target / MARKER).read_text())["mode"] == "copy"
    assert not list((target / "comfyquant").rglob("__pycache__"))
    (target / MARKER).unlink()
    assert main(["install-nodes", str(tmp_path)]) == 2  # not ours any more
    assert main(["install-nodes", str(tmp_path), "--force"]) == 0


def test_folded_activations_compute_what_the_gelu_modules_did(comfy: Any, dit_sd: dict) -> None:
    """The MLPs' GELU(tanh) modules are patched to Identity on the clone and applied by the next layer: same
    output on the CPU as without folding, the shared model keeps its GELUs, a LoRA node's derived layer too."""
    base = model_patcher(comfy, dit_sd)
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_activations=False)),
                            cache=QuantCache())
    folded, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert r0.folded == [] and sorted(r1.folded) == sorted(
        f"double_blocks.{i}.{s}_mlp.2: gelu_tanh" for i in range(2) for s in ("img", "txt"))
    assert "4 activations folded" in r1.summary()
    gelu = "diffusion_model.double_blocks.0.img_mlp.1"
    assert isinstance(folded.object_patches[gelu], torch.nn.Identity)
    assert isinstance(base.model.get_submodule(gelu), torch.nn.GELU)  # the input MODEL is untouched
    assert torch.equal(dit_forward(folded, dit_sd), dit_forward(plain, dit_sd))
    layer = folded.object_patches["diffusion_model.double_blocks.0.img_mlp.2"]
    assert layer.input_act == "gelu_tanh" and ComfyQuantLinear.derive(layer).input_act == "gelu_tanh"


def test_flux2_swiglu_is_folded_in_comfyuis_own_model(comfy: Any, tmp_path: Path) -> None:
    """A Flux.2-layout checkpoint loaded by ComfyUI 0.30 (its Flux class with ``mlp_silu_act``): the double
    blocks' ``SiLUActivation`` modules are patched to Identity on the clone and applied by the down projection,
    which computes on the CPU exactly what the unfolded layer does after the module."""
    from comfyquant.testing.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path / "flux2.safetensors", "flux2", "tiny", seed=1)
    base = model_patcher(comfy, load_file(str(tmp_path / "flux2.safetensors")))
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_activations=False)),
                            cache=QuantCache())
    folded, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert r1.preset == "flux2" and r0.folded == []
    assert sorted(r1.folded) == sorted(f"double_blocks.{i}.{s}_mlp.2: swiglu" for i in range(2) for s in ("img", "txt"))
    act = "diffusion_model.double_blocks.0.img_mlp.1"
    assert isinstance(folded.object_patches[act], torch.nn.Identity)
    assert type(base.model.get_submodule(act)).__name__ == "SiLUActivation"  # the input MODEL keeps its module
    x = torch.randn(2, 5, base.model.get_submodule("diffusion_model.double_blocks.0.img_mlp.0").in_features)
    outs = []
    for patcher in (plain, folded):
        with patched(patcher), torch.no_grad():
            outs.append(patcher.model.get_submodule("diffusion_model.double_blocks.0.img_mlp")(x))
    assert torch.equal(outs[0], outs[1])


def test_sdxl_geglu_is_folded_by_patching_the_gate_forward_only(comfy: Any) -> None:
    """ComfyUI 0.30's own ``FeedForward(glu=True)`` (SD1.x / SDXL) in a model: the GEGLU module is kept (its
    converted ``proj`` patched as any layer) and only its forward is patched, to the projection; the down
    projection applies the gate. Same output as unfolded, and after unloading the shared model computes its
    float output again (module, forward and proj restored)."""
    import importlib

    import comfy.model_patcher

    attention = importlib.import_module("comfy.ldm.modules.attention")

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.diffusion_model = torch.nn.ModuleDict({"ff": attention.FeedForward(64, glu=True,
                                                                                    operations=torch.nn)})

    model = Model()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        float_out = model.diffusion_model["ff"](x)
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_activations=False)),
                            cache=QuantCache())
    folded, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert r0.folded == [] and r1.folded == ["ff.net.2: geglu"]
    assert "diffusion_model.ff.net.0.forward" in folded.object_patches
    outs = []
    for patcher in (plain, folded):
        with patched(patcher), torch.no_grad():
            outs.append(model.diffusion_model["ff"](x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], float_out)
    gate = model.diffusion_model["ff"].net[0]
    assert type(gate).__name__ == "GEGLU" and type(gate.proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(model.diffusion_model["ff"](x), float_out)
