"""The ComfyUI node classes (V1 node API). ComfyUI modules are imported inside methods, so this module imports
without ComfyUI (for ``/object_info``-style introspection in tests and docs)."""

from __future__ import annotations

import logging
import os
from typing import Any

from comfyquant.nodes.settings import (
    NODE_FORMATS,
    OUTLIER_METHODS,
    AdapterSettings,
    RuntimeOptions,
    model_types,
    runtime_backends,
)

logger = logging.getLogger("comfyquant.nodes")
CATEGORY = "comfyquant"
COMPUTE_DTYPES = {"default": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _bool(default: bool, tooltip: str) -> tuple[str, dict[str, Any]]:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def _runtime_inputs() -> dict[str, Any]:
    return {
        "small_batch_fallback": _bool(True, "Let small batches run a weight-only kernel (faster at low token counts)."),
        "runtime_backend": (list(runtime_backends()), {"default": "auto",
                                                       "tooltip": "Kernel backend for quantized layers."}),
    }


def _runtime(small_batch_fallback: bool, runtime_backend: str, use_triton: bool | None = None,
             prepack: bool = True) -> RuntimeOptions:
    return RuntimeOptions(backend=runtime_backend, small_batch_fallback=small_batch_fallback, use_triton=use_triton,
                          prepack=prepack)


class INT8ModelAdapter:
    """Enable INT8 on MODEL: quantize the loaded diffusion model's eligible linear layers on the fly."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model_patcher",)
    FUNCTION = "apply"
    DESCRIPTION = ("Quantizes the diffusion model's linear layers (int8 W8A8, rotated int8, fp8, rotated int4) as "
                   "object patches on a copy of the MODEL; the input MODEL is left unchanged.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "enable_int8": _bool(True, "Off: the MODEL passes through untouched."),
                "format": (list(NODE_FORMATS), {"default": "int8"}),
                "model_type": (list(model_types()), {"default": "auto",
                                                     "tooltip": "Model family whose preset keeps sensitive layers "
                                                                "in high precision."}),
                "outlier_method": (list(OUTLIER_METHODS), {"default": "none",
                                                           "tooltip": "hadamard: rotated int8 (int8-rot)."}),
                **_runtime_inputs(),
                "prepack_int8_weights": _bool(True, "Kept for the runtime's prepacked layouts; today's kernels read the "
                                                    "[N, K] int8 weights as stored, so it changes nothing yet."),
                "bake_loaded_loras": _bool(True, "Merge LoRAs applied before this node into the float weights "
                                                 "before quantizing (one rounding instead of two)."),
                "log_progress": _bool(False, "Log every layer's decision."),
            },
            "optional": {
                "use_triton": _bool(True, "Off: never use the Triton kernels (when runtime_backend is auto)."),
            },
        }

    def apply(self, model: Any, enable_int8: bool, format: str, model_type: str, outlier_method: str,
              small_batch_fallback: bool, runtime_backend: str, prepack_int8_weights: bool,
              bake_loaded_loras: bool, log_progress: bool, use_triton: bool | None = None) -> dict[str, Any]:
        import comfy.utils

        from comfyquant.nodes.adapter import MSG_NOT_CONVERTED, adapt_model

        if not enable_int8:
            logger.warning(MSG_NOT_CONVERTED)
            return {"ui": {"text": [MSG_NOT_CONVERTED]}, "result": (model,)}
        settings = AdapterSettings(format=format, model_type=model_type, outlier_method=outlier_method,
                                   bake_loaded_loras=bake_loaded_loras, log_progress=log_progress,
                                   runtime=_runtime(small_batch_fallback, runtime_backend, use_triton,
                                                    prepack_int8_weights))
        out, report = adapt_model(model, settings, progress=comfy.utils.ProgressBar(1))
        text = [*report.messages, report.summary()] if report.converted else report.messages
        return {"ui": {"text": text}, "result": (out,)}


class LoadQuantizedDiffusionModel:
    """Load a quantized diffusion-model file (any format comfyquant reads, int8_blockwise included)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a comfyquant / ComfyUI quantized diffusion model; quantized layers run on comfyquant's kernels."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import folder_paths

        return {
            "required": {
                "unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                "compute_dtype": (list(COMPUTE_DTYPES), {"default": "default"}),
                **_runtime_inputs(),
            },
            "optional": {"use_triton": _bool(True, "Off: never use the Triton kernels (when runtime_backend is auto).")},
        }

    def load(self, unet_name: str, compute_dtype: str, small_batch_fallback: bool, runtime_backend: str,
             use_triton: bool | None = None) -> dict[str, Any]:
        import folder_paths
        import torch

        from comfyquant.nodes.loader import load_quantized_model

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        dtype_name = COMPUTE_DTYPES[compute_dtype]
        dtype = getattr(torch, dtype_name) if dtype_name else None
        patcher, summary = load_quantized_model(path, _runtime(small_batch_fallback, runtime_backend, use_triton),
                                                dtype)
        return {"ui": {"text": [summary.line()]}, "result": (patcher,)}


class SaveQuantizedModel:
    """Save the MODEL's diffusion model (quantized layers included, LoRAs baked) as a safetensors file."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = "Writes output/<prefix>_NNNNN_.safetensors, loadable by UNETLoader for ComfyUI's own formats."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",),
                             "filename_prefix": ("STRING", {"default": "diffusion_models/comfyquant"})}}

    def save(self, model: Any, filename_prefix: str) -> dict[str, Any]:
        import folder_paths

        from comfyquant.nodes.save import save_quantized_model

        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        file = f"{name}_{counter:05}_.safetensors"
        formats = save_quantized_model(model, os.path.join(folder, file))
        summary = ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
        return {"ui": {"text": [f"saved {os.path.join(subfolder, file)} ({summary})"]}, "result": ()}


class ComfyQuantDigitsConditioning:
    """Conditioning for comfyquant's bundled digits DiT (a tiny Flux-layout model): positive and negative."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    DESCRIPTION = "The class-label conditioning the digits DiT was trained with (negative: the unconditional label)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"digit": ("INT", {"default": 3, "min": 0, "max": 9})}}

    def encode(self, digit: int) -> tuple[list, list]:
        from comfyquant.nodes.digits import digits_conditioning

        return digits_conditioning(int(digit))


class ComfyQuantCaptureCalibration:
    """Capture Calibration: the next sampling runs of the returned MODEL record calibration statistics."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    DESCRIPTION = ("Every sampling run of the returned MODEL writes output/<prefix>_NNNNN_.safetensors: per-layer "
                   "input statistics for comfyquant convert --calibration (GPTQ, SmoothQuant, fp8 input scales).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "filename_prefix": ("STRING", {"default": "calibration/comfyquant"}),
            "reservoir": ("INT", {"default": 512, "min": 16, "max": 65536,
                                  "tooltip": "Input rows kept per layer (for the optimizers that need samples)."}),
        }}

    def wrap(self, model: Any, filename_prefix: str, reservoir: int) -> dict[str, Any]:
        import folder_paths

        from comfyquant.calibration import CalibrationConfig
        from comfyquant.nodes.calibration import CaptureSettings, capture_calibration

        settings = CaptureSettings(folder_paths.get_output_directory(), filename_prefix,
                                   CalibrationConfig(reservoir=int(reservoir)))
        out, _ = capture_calibration(model, settings)
        text = f"the next sampling runs of this MODEL write calibration files to output/{filename_prefix}_NNNNN_"
        return {"ui": {"text": [text]}, "result": (out,)}


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "INT8ModelAdapter": INT8ModelAdapter,
    "LoadQuantizedDiffusionModel": LoadQuantizedDiffusionModel,
    "SaveQuantizedModel": SaveQuantizedModel,
    "ComfyQuantDigitsConditioning": ComfyQuantDigitsConditioning,
    "ComfyQuantCaptureCalibration": ComfyQuantCaptureCalibration,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "INT8ModelAdapter": "Enable INT8 on MODEL",
    "LoadQuantizedDiffusionModel": "Load Quantized Diffusion Model",
    "SaveQuantizedModel": "Save Quantized Model",
    "ComfyQuantDigitsConditioning": "Digits DiT Conditioning",
    "ComfyQuantCaptureCalibration": "Capture Calibration",
}
