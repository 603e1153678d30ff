"""The node pack in a real ComfyUI 0.30.0 server: /object_info, workflows posted to /prompt, latents compared.

Every workflow samples the bundled digits DiT (Flux layout, ComfyUI's own Flux class) for a few Euler steps at
8x8 latent tokens, so a run takes well under a second of compute; the server starts once per session.

Bounds: the int8 samples must differ from the float ones (quantization happened) by less than 5% RMS (measured
1.2%: W8A8 error through 8 steps). The adapter and the loader node running the converter's int8 file hold the
same int8 weights and run the same arithmetic, so their samples agree to float rounding (< 1e-4). Stock
ComfyUI's own int8 path on that file lands as far from ours as from float (1.3%): comfy-kitchen 0.2.40's eager
int8 linear is off by 0.5% on non-contiguous inputs (the slices Flux's double blocks hand to ``attn.proj``),
while per-layer on contiguous inputs it matches ours to 5e-8; so that comparison only gets the int8 bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_server_fixtures import rel_err

from comfyquant.nodes.workflows import EXAMPLE_MODEL, add_sampler, digits_lora_workflow, digits_workflow
from comfyquant.testing.comfyui_server import execution_error, node_text

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # the server runs our int8 layers

SEED_INPUTS = ("model", "enable_int8", "model_type", "outlier_method", "small_batch_fallback", "runtime_backend",
               "prepack_int8_weights", "bake_loaded_loras", "log_progress")
INT8_BOUND = 0.05


@pytest.fixture(scope="module")
def float_latent(node_server: Any) -> torch.Tensor:
    return node_server.latent(node_server.run(digits_workflow(prefix="float")))


@pytest.fixture(scope="module")
def stock_int8_latent(node_server: Any) -> torch.Tensor:
    entry = node_server.run(digits_workflow(unet_name="dit-int8.safetensors", prefix="stock_int8"))
    return node_server.latent(entry)


def test_object_info_shows_every_node_with_the_seeds_inputs(node_server: Any) -> None:
    srv = node_server.server
    info = srv.object_info("INT8ModelAdapter")
    assert info["display_name"] == "Enable INT8 on MODEL" and info["category"] == "comfyquant"
    required, optional = info["input"]["required"], info["input"]["optional"]
    assert all(name in required for name in SEED_INPUTS), sorted(required)
    assert {"use_triton", "cuda_graphs"} <= set(optional) and info["output"] == ["MODEL"]
    assert required["model_type"][0][0] == "auto" and "flux" in required["model_type"][0]
    assert required["outlier_method"][0] == ["none", "hadamard", "smoothquant"]
    assert optional["calibration_file"][0] == "STRING" and optional["alpha"][1]["default"] == 0.5
    assert {"auto", "triton", "torch"} <= set(required["runtime_backend"][0])
    assert required["format"][0] == ["int8", "int8-rot", "fp8", "int4-rot", "auto"]
    assert optional["budget"][0] == "STRING" and optional["budget"][1]["default"] == "size=0.5"
    loader = srv.object_info("LoadQuantizedDiffusionModel")
    assert loader["category"] == "comfyquant" and EXAMPLE_MODEL in loader["input"]["required"]["unet_name"][0]
    assert srv.object_info("SaveQuantizedModel")["output_node"] is True
    assert "cuda_graphs" in loader["input"]["optional"]
    assert optional["fuse_projections"][1]["default"] is True and "fuse_projections" in loader["input"]["optional"]
    assert optional["attention"][0] == loader["input"]["optional"]["attention"][0] == ["auto", "sdpa", "comfyui", "cudnn", "int8", "int8-fp8"]
    assert optional["attention"][1]["default"] == "auto"
    lora = srv.object_info("ComfyQuantLoraLoader")
    assert lora["display_name"] == "Load LoRA (quantized model)" and lora["output"] == ["MODEL"]
    assert lora["input"]["required"]["mode"][0] == ["dynamic", "bake"]
    assert "digits_test_lora.safetensors" in lora["input"]["required"]["lora_name"][0]
    assert lora["input"]["optional"]["lora_name_2"][0][0] == "None"
    capture = srv.object_info("ComfyQuantCaptureCalibration")
    assert capture["display_name"] == "Capture Calibration" and capture["output"] == ["MODEL"]
    clip = srv.object_info("INT8ClipAdapter")
    assert clip["display_name"] == "Enable INT8 on CLIP" and clip["output"] == ["CLIP"]
    assert clip["input"]["required"]["clip"][0] == "CLIP" and "measure_backends" in clip["input"]["optional"]
    assert clip["input"]["optional"]["fuse_projections"][1]["default"] is True
    cond = srv.object_info("ComfyQuantDigitsConditioning")
    assert cond["input"]["required"]["digit"][0] == "INT" and cond["output"] == ["CONDITIONING", "CONDITIONING"]


@pytest.mark.stock_comfy_int8_cpu
def test_disabled_adapter_is_bit_identical_and_int8_stays_within_the_bound(
        node_server: Any, float_latent: torch.Tensor, stock_int8_latent: torch.Tensor) -> None:
    off = node_server.run(digits_workflow(prefix="off", adapter={"enable_int8": False}))
    assert torch.equal(node_server.latent(off), float_latent)
    assert any("not INT8-converted" in t for t in node_text(off, "4"))
    on = node_server.run(digits_workflow(prefix="int8", adapter={}))
    q = node_server.latent(on)
    err = rel_err(q, float_latent)
    assert 0 < err < INT8_BOUND
    assert rel_err(q, stock_int8_latent) < INT8_BOUND
    same_file = node_server.run(digits_workflow(unet_name="dit-int8.safetensors", prefix="ours_int8", loader={}))
    assert rel_err(q, node_server.latent(same_file)) < 1e-4
    # attention int8 on the CPU server: every call passes through its override to ComfyUI's own SDPA (the digits
    # DiT's 80 tokens and head size 32 are never routed), so sampling is bit-identical
    att = node_server.run(digits_workflow(prefix="int8_attn", adapter={"attention": "int8"}))
    assert execution_error(att) is None and torch.equal(node_server.latent(att), q)
    summary = node_text(on, "4")[-1]
    assert "layers converted" in summary and "preset flux" in summary and "MiB saved" in summary
    # the input MODEL is unchanged: sampling it again gives the float latents bit for bit
    assert torch.equal(node_server.latent(node_server.run(digits_workflow(prefix="float_again", seed=7))),
                       float_latent)


def test_docs_example_workflow_runs(node_server: Any, float_latent: torch.Tensor) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "workflows" / "digits_int8_api.json"
    workflow = json.loads(doc.read_text())
    assert workflow == digits_workflow(adapter={}, prefix="comfyquant_digits_int8")
    latent = node_server.latent(node_server.run(workflow))
    assert latent.shape == (1, 16, 8, 8) and 0 < rel_err(latent, float_latent) < INT8_BOUND


def test_rerun_with_other_runtime_options_reuses_the_quantized_weights(node_server: Any) -> None:
    first = node_server.run(digits_workflow(prefix="cache_a", adapter={"format": "int8-rot"}))
    second = node_server.run(digits_workflow(prefix="cache_b", adapter={"format": "int8-rot",
                                                                       "runtime_backend": "torch"}))
    converted = node_text(second, "4")[-1]
    n = int(converted.split(" layers converted")[0].rsplit(" ", 1)[1])
    assert f"({n} from cache)" in converted, converted
    assert torch.equal(node_server.latent(first), node_server.latent(second))


def test_two_adapters_with_different_settings_in_one_workflow(node_server: Any, float_latent: torch.Tensor) -> None:
    wf = digits_workflow(prefix="two_int8", adapter={"format": "int8"})
    wf["14"] = {"class_type": "INT8ModelAdapter", "inputs": {**wf["4"]["inputs"], "format": "fp8"}}
    wf["15"] = {"class_type": "KSampler", "inputs": {**wf["5"]["inputs"], "model": ["14", 0]}}
    wf["16"] = {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": "two_fp8"}}
    wf["25"] = {"class_type": "KSampler", "inputs": {**wf["5"]["inputs"], "model": ["1", 0]}}
    wf["26"] = {"class_type": "SaveLatent", "inputs": {"samples": ["25", 0], "filename_prefix": "two_float"}}
    entry = node_server.run(wf)
    a, b = node_server.latent(entry, "6"), node_server.latent(entry, "16")
    assert torch.equal(node_server.latent(entry, "26"), float_latent)
    assert 0 < rel_err(a, float_latent) < INT8_BOUND and 0 < rel_err(b, float_latent) < 2 * INT8_BOUND
    assert not torch.equal(a, b)
    assert "float8_e4m3fn" in " ".join(node_text(entry, "14")) or "fp8" in node_text(entry, "14")[-1]


def test_int4_rot_adapter(node_server: Any, float_latent: torch.Tensor) -> None:
    entry = node_server.run(digits_workflow(prefix="int4", adapter={"format": "int4-rot"}))
    assert "int4-rot" in node_text(entry, "4")[-1]
    # measured 8.4%: W4A4 (rotated) error through 8 steps, 7x the int8 error
    assert 0 < rel_err(node_server.latent(entry), float_latent) < 0.25


def test_auto_format_with_a_budget(node_server: Any, float_latent: torch.Tensor) -> None:
    entry = node_server.run(digits_workflow(prefix="auto", adapter={"format": "auto", "budget": "size=0.45"}))
    assert execution_error(entry) is None, execution_error(entry)
    text = node_text(entry, "4")
    assert text[0].startswith("comfyquant: auto (") and text[1].startswith("auto precision: budget size=0.45"), text
    # the plan is mostly int8 on this model (0.29% output error on one forward, int8's 0.32%)
    assert 0 < rel_err(node_server.latent(entry), float_latent) < INT8_BOUND


def test_loader_node_runs_an_int8_blockwise_file(node_server: Any, float_latent: torch.Tensor) -> None:
    entry = node_server.run(digits_workflow(unet_name="dit-int8-block.safetensors", prefix="block",
                                            loader={}))
    assert execution_error(entry) is None, execution_error(entry)
    assert "int8_blockwise" in node_text(entry, "1")[0]
    assert 0 < rel_err(node_server.latent(entry), float_latent) < INT8_BOUND


def test_stock_lora_before_and_after_the_adapter(node_server: Any, float_latent: torch.Tensor) -> None:
    from comfyui_server_fixtures import LORA_FILE

    lora = (LORA_FILE, 1.0)
    f_lora = node_server.latent(node_server.run(digits_workflow(prefix="f_lora", lora=lora)))
    effect = rel_err(f_lora, float_latent)
    assert effect > 0.1, effect  # the LoRA really changes the samples
    for after in (False, True):
        for bake in (True, False):
            entry = node_server.run(digits_workflow(prefix=f"q_lora_{after}_{bake}", lora=lora,
                                                    lora_after_adapter=after, adapter={"bake_loaded_loras": bake}))
            q_lora = node_server.latent(entry)
            assert rel_err(q_lora, f_lora) < INT8_BOUND, (after, bake, rel_err(q_lora, f_lora))


@pytest.mark.stock_comfy_int8_cpu
def test_save_node_writes_a_file_stock_comfyui_loads(node_server: Any, float_latent: torch.Tensor) -> None:
    wf = digits_workflow(prefix="before_save", adapter={})
    wf["7"] = {"class_type": "SaveQuantizedModel", "inputs": {"model": ["4", 0],
                                                             "filename_prefix": "diffusion_models/saved_int8"}}
    entry = node_server.run(wf)
    assert execution_error(entry) is None, execution_error(entry)
    assert "int8_tensorwise" in node_text(entry, "7")[0]
    saved = sorted((node_server.base / "output" / "diffusion_models").glob("saved_int8_*.safetensors"))
    assert len(saved) == 1
    target = node_server.models() / "saved-int8.safetensors"
    target.write_bytes(saved[0].read_bytes())
    stock = node_server.latent(node_server.run(digits_workflow(unet_name=target.name, prefix="saved_stock")))
    ours = node_server.latent(entry)
    assert rel_err(stock, ours) < INT8_BOUND
    reloaded = node_server.run(digits_workflow(unet_name=target.name, prefix="saved_ours", loader={}))
    assert rel_err(node_server.latent(reloaded), ours) < 1e-4


@pytest.mark.parametrize(("workflow", "node", "message"), [
    (lambda: digits_workflow(unet_name="bad-format.safetensors", loader={}), "1",
     "nvfp4_experimental"),
    (lambda: digits_workflow(unet_name="nonlinear-quant.safetensors", loader={}), "1",
     "only linear layers can be quantized"),
    (lambda: digits_workflow(adapter={"format": "fp8", "outlier_method": "hadamard"}), "4",
     "outlier_method 'hadamard' needs an int8 format"),
    (lambda: digits_workflow(adapter={"format": "auto", "budget": "size=0.01"}), "4",
     "--budget size=0.01 is below what this model allows"),
    (lambda: digits_workflow(adapter={"outlier_method": "smoothquant"}), "4",
     "outlier_method 'smoothquant' needs calibration statistics"),
    (lambda: digits_workflow(adapter={"outlier_method": "smoothquant", "calibration_file": "nowhere.safetensors"}),
     "4", "calibration_file 'nowhere.safetensors' not found"),
    (lambda: digits_lora_workflow(lora="other_model_lora.safetensors"), "7",
     "other_model_lora.safetensors: none of its 1 modules matches a layer of this MODEL's diffusion model"),
])
def test_bad_input_is_a_comfyui_error_and_the_server_keeps_running(node_server: Any, workflow: Any, node: str,
                                                                   message: str) -> None:
    entry = node_server.run(workflow())
    err = execution_error(entry)
    assert err is not None and err["node_id"] == node and message in err["exception_message"], err
    assert node_server.server.alive() and node_server.server.get_json("/system_stats")


def test_foreign_lora_leaves_the_quantized_model_unchanged(node_server: Any) -> None:
    from comfyui_server_fixtures import FOREIGN_LORA_FILE

    base = node_server.latent(node_server.run(digits_workflow(prefix="foreign_base", adapter={})))
    entry = node_server.run(digits_workflow(prefix="foreign", adapter={}, lora=(FOREIGN_LORA_FILE, 1.0),
                                            lora_after_adapter=True))
    assert torch.equal(node_server.latent(entry), base)
    assert "lora key not loaded" in node_server.server.log_text()


def test_capture_calibration_writes_a_file_the_converter_reads(node_server: Any, float_latent: torch.Tensor,
                                                               tmp_path: Path) -> None:
    from safetensors import safe_open

    from comfyquant.calibration import CalibrationFile, check_compatible
    from comfyquant.convert.api import convert
    from comfyquant.eval.workloads import DIT_FIXTURE

    # leave the shared model loaded with the adapter's layers swapped in: the capture must hook the float
    # layers ComfyUI swaps back for this run (a hook registered before the load missed them)
    node_server.run(digits_workflow(prefix="calib_before", adapter={}))
    wf = digits_workflow(prefix="calib_run")
    wf["8"] = {"class_type": "ComfyQuantCaptureCalibration",
               "inputs": {"model": ["1", 0], "filename_prefix": "calibration/digits", "reservoir": 64}}
    wf["5"]["inputs"]["model"] = ["8", 0]
    entry = node_server.run(wf)
    assert torch.equal(node_server.latent(entry), float_latent)  # recording does not change the samples
    files = sorted((node_server.base / "output" / "calibration").glob("digits_*.safetensors"))
    assert len(files) == 1, files
    calib = CalibrationFile(files[0])
    with safe_open(str(DIT_FIXTURE), "pt") as f:
        weights = {k[: -len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                   if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}
    assert set(calib) == set(weights)  # every linear layer of the DiT, under the checkpoint's names
    check_compatible(calib, weights, "captured in ComfyUI")
    assert all(calib.layer(n).count > 0 for n in calib)
    report = convert(DIT_FIXTURE, tmp_path / "gptq.safetensors", format="int8", optimizer="gptq",
                     calibration=files[0], progress=False)
    assert (tmp_path / "gptq.safetensors").is_file() and report is not None
    # the same file drives Enable INT8 on MODEL's smoothquant (path relative to the output folder)
    rel = str(files[0].relative_to(node_server.base / "output"))
    smooth = node_server.run(digits_workflow(prefix="smoothquant", adapter={"outlier_method": "smoothquant",
                                                                           "calibration_file": rel}))
    assert execution_error(smooth) is None, execution_error(smooth)
    assert "smoothquant (alpha 0.5" in node_text(smooth, "4")[-1]
    assert 0 < rel_err(node_server.latent(smooth), float_latent) < INT8_BOUND


def test_cuda_graphs_option_runs_eagerly_on_the_cpu_with_one_log_line(node_server: Any) -> None:
    line = "cuda_graphs: running ApplyModel eagerly: an input tensor is on cpu, not CUDA"
    before = node_server.server.log_text().count(line)
    wf = digits_workflow(prefix="graphs_adapter", adapter={"cuda_graphs": True}, seed=31)
    loader = {"unet_name": "dit-int8.safetensors", "compute_dtype": "default", "small_batch_fallback": True,
              "runtime_backend": "auto"}
    wf["30"] = {"class_type": "LoadQuantizedDiffusionModel", "inputs": {**loader, "cuda_graphs": True}}
    wf["31"] = {"class_type": "LoadQuantizedDiffusionModel", "inputs": loader}
    wf["32"] = {"class_type": "INT8ModelAdapter", "inputs": {**wf["4"]["inputs"], "cuda_graphs": False}}
    saves = [add_sampler(wf, [src, 0], 100 + 2 * i, f"graphs_{src}", seed=31)
             for i, src in enumerate(("30", "31", "32"))]
    entry = node_server.run(wf)
    assert execution_error(entry) is None, execution_error(entry)
    # one line per node that enabled graphs, however many steps (8 steps x cond/uncond batches) ran
    assert node_server.server.log_text().count(line) - before == 2
    graphed, loader_graphed, loader_plain, plain = (node_server.latent(entry, s) for s in ("6", *saves))
    assert torch.equal(graphed, plain) and torch.equal(loader_graphed, loader_plain)
