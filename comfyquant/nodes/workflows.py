"""API-format ComfyUI workflows for the bundled digits DiT (the docs' example, the server tests).

``UNETLoader`` (or "Load Quantized Diffusion Model") -> optional LoRA / "Enable INT8 on MODEL" -> ``KSampler``
(positive/negative from "Digits DiT Conditioning", 16-channel latent from ``EmptySD3LatentImage``) ->
``SaveLatent``. Node ids are strings, as ComfyUI's API format has them.
"""

from __future__ import annotations

from typing import Any

EXAMPLE_MODEL = "comfyquant_digits_dit.safetensors"

ADAPTER_DEFAULTS: dict[str, Any] = {
    "enable_int8": True,
    "format": "int8",
    "model_type": "auto",
    "outlier_method": "none",
    "small_batch_fallback": True,
    "runtime_backend": "auto",
    "prepack_int8_weights": True,
    "bake_loaded_loras": True,
    "log_progress": False,
}


ADAPTER_OPTIONAL = ("use_triton", "cuda_graphs", "budget", "calibration_file", "alpha", "attention",
                    "fuse_projections", "dense_copy_mb")
EXAMPLE_LORA = "digits_example_lora.safetensors"


def adapter_inputs(model: list, **overrides: Any) -> dict[str, Any]:
    """Inputs of an INT8ModelAdapter node fed by ``model`` (a ``[node_id, output_index]`` link)."""
    unknown = set(overrides) - set(ADAPTER_DEFAULTS) - set(ADAPTER_OPTIONAL)
    if unknown:
        raise KeyError(f"unknown INT8ModelAdapter inputs: {sorted(unknown)}")
    return {"model": model, **ADAPTER_DEFAULTS, **overrides}


def digits_workflow(*, unet_name: str = EXAMPLE_MODEL, digit: int = 3, seed: int = 7, steps: int = 8,
                    cfg: float = 3.0, prefix: str = "digits", adapter: dict[str, Any] | None = None,
                    lora: tuple[str, float] | None = None, lora_after_adapter: bool = False,
                    loader: dict[str, Any] | None = None) -> dict[str, Any]:
    """One sampling run of the digits DiT; ``adapter`` (INT8ModelAdapter overrides) inserts the adapter,
    ``lora`` = (file, strength) a stock ``LoraLoaderModelOnly`` before (or after) it, ``loader`` (inputs of
    LoadQuantizedDiffusionModel) replaces UNETLoader."""
    wf: dict[str, Any] = {}
    if loader is not None:
        wf["1"] = {"class_type": "LoadQuantizedDiffusionModel",
                   "inputs": {"unet_name": unet_name, "compute_dtype": "default", "small_batch_fallback": True,
                              "runtime_backend": "auto", **loader}}
    else:
        wf["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}
    model: list = ["1", 0]

    def add_lora(src: list) -> list:
        assert lora is not None
        wf["10"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": src, "lora_name": lora[0], "strength_model": lora[1]}}
        return ["10", 0]

    if lora is not None and not lora_after_adapter:
        model = add_lora(model)
    if adapter is not None:
        wf["4"] = {"class_type": "INT8ModelAdapter", "inputs": adapter_inputs(model, **adapter)}
        model = ["4", 0]
    if lora is not None and lora_after_adapter:
        model = add_lora(model)
    wf["2"] = {"class_type": "ComfyQuantDigitsConditioning", "inputs": {"digit": digit}}
    wf["3"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    wf["5"] = {"class_type": "KSampler",
               "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                          "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 1],
                          "latent_image": ["3", 0], "denoise": 1.0}}
    wf["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return wf


def lora_node(model: list, lora: str, strength: float = 1.0, mode: str = "dynamic",
              **more: Any) -> dict[str, Any]:
    """A "Load LoRA (quantized model)" node on ``model``; ``more``: ``lora_name_2``, ``strength_model_2`` ..."""
    return {"class_type": "ComfyQuantLoraLoader",
            "inputs": {"model": model, "lora_name": lora, "strength_model": strength, "mode": mode, **more}}


def add_sampler(wf: dict[str, Any], model: list, node_id: int, prefix: str, *, seed: int = 7, steps: int = 8,
                cfg: float = 3.0) -> str:
    """Add a KSampler (id ``node_id``) on ``model`` with the workflow's conditioning and latent, and a SaveLatent
    (id ``node_id + 1``) writing ``prefix``; returns the SaveLatent's id."""
    sampler, save = str(node_id), str(node_id + 1)
    wf[sampler] = {"class_type": "KSampler",
                   "inputs": {**wf["5"]["inputs"], "model": model, "seed": seed, "steps": steps, "cfg": cfg}}
    wf[save] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return save


def digits_lora_workflow(*, lora: str = EXAMPLE_LORA, strength: float = 1.0, mode: str = "dynamic",
                         prefix: str = "comfyquant_digits_int8_lora") -> dict[str, Any]:
    """The docs' LoRA example: UNETLoader -> Enable INT8 on MODEL -> Load LoRA (quantized model) -> KSampler."""
    wf = digits_workflow(adapter={}, prefix=prefix)
    wf["7"] = lora_node(["4", 0], lora, strength, mode)
    wf["5"]["inputs"]["model"] = ["7", 0]
    return wf
