"""The ComfyUI node classes (V1 node API). ComfyUI modules are imported inside methods, so this module imports
without ComfyUI (for ``/object_info``-style introspection in tests and docs)."""

from __future__ import annotations

import logging
import os
from typing import Any

from comfyquant.formats.registry import GPU_GENERATIONS
from comfyquant.nodes.attention import MODES as ATTENTION_MODES
from comfyquant.nodes.settings import (
    AUTO,
    DEFAULT_ALPHA,
    DEFAULT_BUDGET,
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


def _optional_runtime_inputs() -> dict[str, Any]:
    return {
        "use_triton": _bool(True, "Off: never use the Triton kernels (when runtime_backend is auto)."),
        "cuda_graphs": _bool(False, "Replay the model's forward from CUDA graphs, one per input shape (GPU only; "
                                    "the CPU runs eagerly). Cuts per-step launch overhead."),
        "fold_activations": _bool(True, "Let a quantized layer apply the GELU/SiLU (and, in T5 / Llama-style text "
                                        "encoders, the RMSNorm; in CLIP and SDXL blocks, the LayerNorm; in Flux / SD3 "
                                        "blocks, the modulated LayerNorm) before it "
                                        "while reading its input (fewer kernels and memory passes per block)."),
        "measure_backends": _bool(False, "Time each candidate kernel once per layer shape on this GPU and keep "
                                         "the fastest (cached; the first run compiles and times them)."),
        "fuse_projections": _bool(True, "Run sibling projections that read one input (attention q/k/v, a gated "
                                        "MLP's two halves) as one quantized GEMM: one activation quantization "
                                        "and launch instead of two or three (same numbers)."),
        "dense_copy_mb": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64,
                                 "tooltip": "0: off. Else up to this many MiB of 16-bit copies of the layers "
                                            "where no quantized kernel beats bf16 on this GPU (narrow layers "
                                            "such as SDXL's and CLIP's attention projections at large "
                                            "batches): each runs at bf16's speed on its own and uses 3 bytes "
                                            "per weight instead of 1. Measured: SDXL's whole step ran 4% "
                                            "slower with it on an H100 (the copies save GPU time but cost "
                                            "host time, which SDXL is short of), so time it on your model."}),
    }


def _attention_input() -> dict[str, Any]:
    return {"attention": (list(ATTENTION_MODES), {
        "default": "auto", "tooltip": "auto: per call shape the faster of ComfyUI's kernel and cuDNN's (both exact "
                                      "attention; timed on the first call of a shape, host time counted, cached "
                                      "per GPU; cuDNN was 1.5-2x faster on every diffusion shape timed on an "
                                      "H100). cudnn: attention of 1,024+ tokens on cuDNN's kernel always (auto "
                                      "takes it where it pays). int8: calls as auto runs them, except "
                                      "self-attention of 16,384+ tokens at head size 128 (video models) with q "
                                      "and k in int8 (~1.05x cuDNN, ~1.3% error); int8-fp8: p and v in fp8 too "
                                      "(~1.26x cuDNN, ~3.9% error); sdpa: ComfyUI's own choice of kernel, without "
                                      "its per-call backend setup where it picks the same kernel (same output, "
                                      "less host time); comfyui: ComfyUI's attention untouched."})}


def _runtime(small_batch_fallback: bool, runtime_backend: str, use_triton: bool | None = None,
             prepack: bool = True, cuda_graphs: bool | None = None,
             fold_activations: bool | None = None, measure_backends: bool | None = None,
             attention: str = "auto", fuse_projections: bool | None = None,
             dense_copy_mb: int | None = None) -> RuntimeOptions:
    return RuntimeOptions(backend=runtime_backend, small_batch_fallback=small_batch_fallback, use_triton=use_triton,
                          prepack=prepack, cuda_graphs=bool(cuda_graphs),
                          fold_activations=True if fold_activations is None else bool(fold_activations),
                          measure_backends=bool(measure_backends), attention=attention,
                          fuse_projections=True if fuse_projections is None else bool(fuse_projections),
                          dense_copy_mb=int(dense_copy_mb or 0))


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
                                                           "tooltip": "hadamard: rotated int8 (int8-rot). smoothquant "
                                                                      "(int8, fp8): per-channel input smoothing from "
                                                                      "calibration_file's statistics."}),
                **_runtime_inputs(),
                "prepack_int8_weights": _bool(True, "Kept for the runtime's prepacked layouts; today's kernels read the "
                                                    "[N, K] int8 weights as stored, so it changes nothing yet."),
                "bake_loaded_loras": _bool(True, "Merge LoRAs applied before this node into the float weights "
                                                 "before quantizing (one rounding instead of two)."),
                "log_progress": _bool(False, "Log every layer's decision."),
            },
            "optional": {
                **_optional_runtime_inputs(),
                **_attention_input(),
                "budget": ("STRING", {"default": DEFAULT_BUDGET,
                                      "tooltip": "format auto only: the budget the per-layer plan meets. size=0.5: "
                                                 "at most half the model's bytes; sqnr=30: every layer's output "
                                                 "SQNR at least 30 dB; both: size=0.5,sqnr=30."}),
                "target_gpu": (["auto", *GPU_GENERATIONS], {
                    "default": "auto", "tooltip": "format auto only: the GPU generation to plan for (auto: the one "
                                                  "this model runs on); nvfp4 / mxfp8 are candidates on blackwell."}),
                "calibration_file": ("STRING", {"default": "",
                                                "tooltip": "outlier_method smoothquant: a calibration file from "
                                                           "Capture Calibration or `comfyquant calibrate` (absolute, "
                                                           "or relative to ComfyUI's output folder)."}),
                "alpha": ("FLOAT", {"default": DEFAULT_ALPHA, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "outlier_method smoothquant: how much of the activation outliers "
                                               "move into the weights (s = max|x|^alpha / max|W|^(1-alpha))."}),
            },
        }

    def apply(self, model: Any, enable_int8: bool, format: str, model_type: str, outlier_method: str,
              small_batch_fallback: bool, runtime_backend: str, prepack_int8_weights: bool,
              bake_loaded_loras: bool, log_progress: bool, use_triton: bool | None = None,
              cuda_graphs: bool | None = None, budget: str = DEFAULT_BUDGET, calibration_file: str = "",
              alpha: float = DEFAULT_ALPHA, fold_activations: bool | None = None,
              target_gpu: str = "auto", measure_backends: bool | None = None,
              attention: str = "auto", fuse_projections: bool | None = None,
              dense_copy_mb: int | None = None) -> dict[str, Any]:
        import comfy.utils
        import folder_paths

        from comfyquant.nodes.adapter import MSG_NOT_CONVERTED, adapt_model
        from comfyquant.nodes.smoothing import resolve_calibration_path

        if not enable_int8:
            logger.warning(MSG_NOT_CONVERTED)
            return {"ui": {"text": [MSG_NOT_CONVERTED]}, "result": (model,)}
        if outlier_method == "smoothquant" and calibration_file.strip():  # Capture Calibration writes to output/
            calibration_file = str(resolve_calibration_path(calibration_file, [folder_paths.get_output_directory()]))
        settings = AdapterSettings(format=format, model_type=model_type, outlier_method=outlier_method,
                                   bake_loaded_loras=bake_loaded_loras, log_progress=log_progress, budget=budget,
                                   calibration_file=calibration_file, alpha=float(alpha), target_gpu=target_gpu,
                                   runtime=_runtime(small_batch_fallback, runtime_backend, use_triton,
                                                    prepack_int8_weights, cuda_graphs, fold_activations,
                                                    measure_backends, attention, fuse_projections,
                                                    dense_copy_mb))
        out, report = adapt_model(model, settings, progress=comfy.utils.ProgressBar(1))
        return {"ui": {"text": report.lines()}, "result": (out,)}


class INT8ClipAdapter:
    """Enable INT8 on CLIP: quantize the loaded text encoders' linear layers on the fly (T5, CLIP-L/G, LLMs)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    FUNCTION = "apply"
    DESCRIPTION = ("Quantizes each text encoder of the CLIP (T5-XXL, CLIP-L/G, LLM encoders; each with its own "
                   "preset) as object patches on a copy of the CLIP, and runs them on comfyquant's kernels; the "
                   "input CLIP is left unchanged.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "clip": ("CLIP",),
                "enable_int8": _bool(True, "Off: the CLIP passes through untouched."),
                # no auto: a size budget counts a text encoder's large token embedding (kept in 16 bits)
                "format": ([f for f in NODE_FORMATS if f != AUTO], {"default": "int8"}),
                "outlier_method": ([m for m in OUTLIER_METHODS if m != "smoothquant"],
                                   {"default": "none", "tooltip": "hadamard: rotated int8 (int8-rot)."}),
                **_runtime_inputs(),
                "bake_loaded_loras": _bool(True, "Merge LoRAs applied before this node into the float weights "
                                                 "before quantizing (one rounding instead of two)."),
                "log_progress": _bool(False, "Log every layer's decision."),
            },
            "optional": {
                "use_triton": _optional_runtime_inputs()["use_triton"],
                "measure_backends": _optional_runtime_inputs()["measure_backends"],
                "fuse_projections": _optional_runtime_inputs()["fuse_projections"],
                "dense_copy_mb": _optional_runtime_inputs()["dense_copy_mb"],
            },
        }

    def apply(self, clip: Any, enable_int8: bool, format: str, outlier_method: str, small_batch_fallback: bool,
              runtime_backend: str, bake_loaded_loras: bool, log_progress: bool, use_triton: bool | None = None,
              measure_backends: bool | None = None, fuse_projections: bool | None = None,
              dense_copy_mb: int | None = None) -> dict[str, Any]:
        import comfy.utils

        from comfyquant.nodes.adapter import MSG_NOT_CONVERTED
        from comfyquant.nodes.clip_adapter import MSG_NO_ENCODERS, adapt_clip

        if not enable_int8:
            logger.warning(MSG_NOT_CONVERTED)
            return {"ui": {"text": [MSG_NOT_CONVERTED]}, "result": (clip,)}
        settings = AdapterSettings(format=format, outlier_method=outlier_method, bake_loaded_loras=bake_loaded_loras,
                                   log_progress=log_progress,
                                   runtime=_runtime(small_batch_fallback, runtime_backend, use_triton,
                                                    measure_backends=measure_backends,
                                                    fuse_projections=fuse_projections, dense_copy_mb=dense_copy_mb))
        out, reports = adapt_clip(clip, settings, progress=comfy.utils.ProgressBar(1))
        lines = [f"{name}: {line}" for name, report in reports for line in report.lines()] or [MSG_NO_ENCODERS]
        return {"ui": {"text": lines}, "result": (out,)}


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
            "optional": {**_optional_runtime_inputs(), **_attention_input()},
        }

    def load(self, unet_name: str, compute_dtype: str, small_batch_fallback: bool, runtime_backend: str,
             use_triton: bool | None = None, cuda_graphs: bool | None = None,
             fold_activations: bool | None = None, measure_backends: bool | None = None,
             attention: str = "auto", fuse_projections: bool | None = None,
             dense_copy_mb: int | None = None) -> dict[str, Any]:
        import folder_paths
        import torch

        from comfyquant.nodes.loader import load_quantized_model

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        dtype_name = COMPUTE_DTYPES[compute_dtype]
        dtype = getattr(torch, dtype_name) if dtype_name else None
        runtime = _runtime(small_batch_fallback, runtime_backend, use_triton, cuda_graphs=cuda_graphs,
                           fold_activations=fold_activations, measure_backends=measure_backends,
                           attention=attention, fuse_projections=fuse_projections, dense_copy_mb=dense_copy_mb)
        patcher, summary = load_quantized_model(path, runtime, dtype)
        return {"ui": {"text": [summary.line()]}, "result": (patcher,)}


LORA_SLOTS = 3  # LoRAs one node takes (more: chain nodes)
_STRENGTH = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})


class ComfyQuantLoraLoader:
    """Load LoRA (quantized model): LoRAs on an INT8/FP8/int4 MODEL, as a low-rank side path or baked."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora"
    DESCRIPTION = ("Applies up to three LoRA files (every format comfyquant reads) to a copy of the MODEL: on "
                   "quantized layers as a low-rank side path (dynamic, the quantized weights untouched) or baked "
                   "(dequantize, add, requantize); float layers are patched as ComfyUI patches them.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import folder_paths

        from comfyquant.nodes.loras import MODES

        loras = folder_paths.get_filename_list("loras")
        optional: dict[str, Any] = {}
        for i in range(2, LORA_SLOTS + 1):
            optional[f"lora_name_{i}"] = (["None", *loras], {"default": "None"})
            optional[f"strength_model_{i}"] = _STRENGTH
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (loras,),
                "strength_model": _STRENGTH,
                "mode": (list(MODES), {"default": "dynamic",
                                       "tooltip": "dynamic: a low-rank side path next to the quantized product "
                                                  "(weights untouched, no requantization); bake: dequantize, add, "
                                                  "requantize (no runtime cost, one more rounding)."}),
            },
            "optional": optional,
        }

    def load_lora(self, model: Any, lora_name: str, strength_model: float, mode: str,
                  **more: Any) -> dict[str, Any]:
        import folder_paths

        from comfyquant.nodes.loras import LoraRequest, apply_loras

        picks = [(lora_name, strength_model)]
        picks += [(more.get(f"lora_name_{i}", "None"), more.get(f"strength_model_{i}", 1.0))
                  for i in range(2, LORA_SLOTS + 1)]
        requests = [LoraRequest(folder_paths.get_full_path_or_raise("loras", name), float(strength))
                    for name, strength in picks if name and name != "None"]
        out, report = apply_loras(model, requests, mode)
        return {"ui": {"text": report.lines()}, "result": (out,)}


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
    "INT8ClipAdapter": INT8ClipAdapter,
    "LoadQuantizedDiffusionModel": LoadQuantizedDiffusionModel,
    "ComfyQuantLoraLoader": ComfyQuantLoraLoader,
    "SaveQuantizedModel": SaveQuantizedModel,
    "ComfyQuantDigitsConditioning": ComfyQuantDigitsConditioning,
    "ComfyQuantCaptureCalibration": ComfyQuantCaptureCalibration,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "INT8ModelAdapter": "Enable INT8 on MODEL",
    "INT8ClipAdapter": "Enable INT8 on CLIP",
    "LoadQuantizedDiffusionModel": "Load Quantized Diffusion Model",
    "ComfyQuantLoraLoader": "Load LoRA (quantized model)",
    "SaveQuantizedModel": "Save Quantized Model",
    "ComfyQuantDigitsConditioning": "Digits DiT Conditioning",
    "ComfyQuantCaptureCalibration": "Capture Calibration",
}
