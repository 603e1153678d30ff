""""Load LoRA (quantized model)" in a real ComfyUI 0.30.0 server: API-format workflows posted to /prompt, latents
read back and compared with the same LoRAs on the float model (stock ``LoraLoaderModelOnly``).

Each prompt holds several branches (one KSampler each) so the server runs few prompts. Bounds: 8 Euler steps of
the digits DiT; int8 puts the samples 1.2% from float, one test LoRA moves them 16% (A) to 28% (A vs B), and the
quantized results with LoRAs land 1.3% (dynamic) to 2.1% (bake) from the float result with the same LoRAs
(measured), so each must be within 4% of it and more than 8% away from the float result with only one of them
(measured: 11% or more).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_server_fixtures import LORA_B_FILE, LORA_FILE, rel_err

from comfyquant.nodes.workflows import add_sampler, digits_lora_workflow, digits_workflow, lora_node
from comfyquant.testing.comfyui_server import execution_error, node_text

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.cpu_int8]  # the server runs our int8 layers
INT8_BOUND = 0.04
APART = 0.08


def _stock(model: list, lora: str) -> dict[str, Any]:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0}}


def test_lora_node_matches_the_lora_on_the_float_model(node_server: Any) -> None:
    wf = digits_workflow(prefix="ql_int8", adapter={})  # "1" UNETLoader, "4" adapter, "6" plain int8
    wf["30"] = {"class_type": "LoadQuantizedDiffusionModel",
                "inputs": {"unet_name": "dit-int8.safetensors", "compute_dtype": "default",
                           "small_batch_fallback": True, "runtime_backend": "auto"}}
    wf["40"], wf["41"] = _stock(["1", 0], LORA_FILE), _stock(["1", 0], LORA_B_FILE)
    wf["42"] = lora_node(["4", 0], LORA_FILE, mode="dynamic")
    wf["43"] = lora_node(["4", 0], LORA_FILE, mode="bake")
    wf["44"] = lora_node(["30", 0], LORA_B_FILE)  # on the loader node's int8 model
    wf["45"] = lora_node(["30", 0], LORA_B_FILE, mode="bake")
    saves = {name: add_sampler(wf, [src, 0], 100 + 2 * i, f"ql_{name}")
             for i, (name, src) in enumerate((("f_a", "40"), ("f_b", "41"), ("dyn", "42"), ("bake", "43"),
                                              ("loader_b", "44"),
                                              ("loader_bake", "45")))}
    entry = node_server.run(wf)
    assert execution_error(entry) is None, execution_error(entry)
    got = {name: node_server.latent(entry, save) for name, save in saves.items()}
    plain = node_server.latent(entry, "6")
    assert rel_err(plain, got["f_a"]) > APART  # the LoRA really changes the samples
    for name, ref in (("dyn", "f_a"), ("bake", "f_a"), ("loader_b", "f_b"),
                      ("loader_bake", "f_b")):
        assert rel_err(got[name], got[ref]) < INT8_BOUND, (name, rel_err(got[name], got[ref]))
    assert rel_err(got["dyn"], got["bake"]) < INT8_BOUND
    text = node_text(entry, "42")
    assert "20 of 20 modules matched" in text[0] and "20 quantized layers with a side path" in text[1], text
    assert "20 requantized" in node_text(entry, "43")[1]
    # the input MODELs are unchanged: fresh samples (a new seed) of both plain int8 models still agree
    after = digits_workflow(prefix="ql_after", adapter={}, seed=29)
    after["30"] = wf["30"]
    loader_save = add_sampler(after, ["30", 0], 100, "ql_after_loader", seed=29)
    entry = node_server.run(after)
    assert rel_err(node_server.latent(entry, "6"), node_server.latent(entry, loader_save)) < 1e-4


def test_lora_stacking_and_stock_lora_together(node_server: Any) -> None:
    wf = digits_workflow(prefix="qs_ab_float", lora=(LORA_FILE, 1.0))  # "10" stock A on the float model
    wf["11"] = _stock(["10", 0], LORA_B_FILE)
    wf["5"]["inputs"]["model"] = ["11", 0]  # "6": float with A and B
    wf["4"] = {"class_type": "INT8ModelAdapter", "inputs": digits_workflow(adapter={})["4"]["inputs"]}
    wf["50"] = lora_node(["4", 0], LORA_FILE)
    wf["51"] = lora_node(["50", 0], LORA_B_FILE)  # a chain of two nodes
    wf["52"] = lora_node(["4", 0], LORA_FILE, lora_name_2=LORA_B_FILE, strength_model_2=1.0)  # one node, two
    wf["53"] = _stock(["4", 0], LORA_B_FILE)
    wf["54"] = lora_node(["53", 0], LORA_FILE)  # stock B, then ours A
    wf["55"] = _stock(["1", 0], LORA_B_FILE)
    saves = {name: add_sampler(wf, [src, 0], 100 + 2 * i, f"qs_{name}")
             for i, (name, src) in enumerate((("chain", "51"), ("one", "52"), ("stock_ours", "54"),
                                              ("f_a", "10"), ("f_b", "55")))}
    entry = node_server.run(wf)
    assert execution_error(entry) is None, execution_error(entry)
    ref = node_server.latent(entry, "6")
    got = {name: node_server.latent(entry, save) for name, save in saves.items()}
    for name in ("chain", "one", "stock_ours"):
        assert rel_err(got[name], ref) < INT8_BOUND, (name, rel_err(got[name], ref))
        assert min(rel_err(got[name], got["f_a"]), rel_err(got[name], got["f_b"])) > APART, name
    assert rel_err(got["chain"], got["one"]) < 1e-4
    assert len(node_text(entry, "52")) >= 3  # one match line per LoRA, then the summary


def test_docs_lora_example_workflow_runs(node_server: Any) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "workflows" / "digits_int8_lora_api.json"
    workflow = json.loads(doc.read_text())
    assert workflow == digits_lora_workflow()
    entry = node_server.run(workflow)
    assert execution_error(entry) is None, execution_error(entry)
    assert node_server.latent(entry).shape == (1, 16, 8, 8)
