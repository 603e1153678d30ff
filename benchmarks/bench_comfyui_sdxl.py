"""Step time and peak VRAM of SDXL's UNet in ComfyUI's own class: bf16 against the "Enable INT8 on MODEL" adapter
(int8 with its transformer blocks' LayerNorms folded into the layers they feed, the same without that fold, fp8)
and against ComfyUI's own int8 path (comfy-kitchen) on the converter's int8 file of the same weights; one process.

The whole SDXL base UNet (2.57 B parameters, ComfyUI's ``UNetModel`` with SDXL's config, built on the meta device
and given random bf16 weights with a 1/sqrt(fan_in) scale: speed and memory do not depend on their values),
loaded by ``comfy.sd.load_diffusion_model`` as ComfyUI loads an SDXL UNet file. Eager mode, one UNet forward per
step at batch 2 (a CFG sampler's positive and negative prompt, as ComfyUI batches them), 1024x1024 (latent
128x128; ``--res`` for others), 77 tokens of 2,048-wide text context and SDXL's 2,816-wide pooled / size vector.
Results: ``--out``/bench_comfyui_sdxl.json, .md and .png. ``--smoke``: a tiny UNet on the CPU (built from its
detected config: ComfyUI's detection matches only SDXL's real sizes) and no stock row, to check the mechanics.

    python benchmarks/bench_comfyui_sdxl.py --out bench_sdxl              # GPU, 1024x1024
    python benchmarks/bench_comfyui_sdxl.py --smoke --out /tmp/xsmoke     # CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import (
    FOLD_VARIANTS,
    HOLD,
    _free,
    _import_comfy,
    adapter_rounds,
    bench_main,
    common_args,
    kitchen_cuda_status,
    model_markdown,
    random_state_dict,
    run_env,
    timing_args,
    work_files,
    write_report,
)

# SDXL base's UNet as ComfyUI's model detection configures it (comfy/model_detection.py, its SDXL entry)
SDXL = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 2048, "num_head_channels": 64,
        "adm_in_channels": 2816, "use_linear_in_transformer": True, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "use_checkpoint": False,
        "use_temporal_attention": False, "use_temporal_resblock": False}
SMOKE = {**SDXL, "model_channels": 64, "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
         "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "context_dim": 256, "num_head_channels": 32,
         "adm_in_channels": 256}


def sdxl_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly the key names and shapes of ComfyUI's UNetModel built from ``config``."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops

    with torch.device("meta"):
        model = openaimodel.UNetModel(**config, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    return random_state_dict(model, seed)


def _smoke_patcher(sd: dict[str, torch.Tensor]) -> Any:
    """The tiny UNet as ComfyUI's SDXL model class, from its detected config (no file detection: see above)."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(sd, "")).get_model(sd)
    model.diffusion_model.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def sdxl_inputs(config: dict[str, Any], res: int, device: str, dtype: torch.dtype,
                apply_model: bool = False) -> dict[str, torch.Tensor]:
    """One step's keyword inputs of ``UNetModel.forward`` at batch 2: latent, timesteps, text context, the
    pooled text / size vector ``y``; ``apply_model``: ``BaseModel.apply_model``'s (a float32 latent as samplers
    keep it, and sigmas, which SDXL's EPS sampling turns into timesteps on the way)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, res // 8, res // 8, generator=g)
    context = torch.randn(2, 77, config["context_dim"], generator=g).to(device, dtype)
    y = torch.randn(2, config["adm_in_channels"], generator=g).to(device, dtype)
    if apply_model:
        return {"x": x.to(device), "sigma": torch.tensor([1.0, 1.0], device=device), "context": context, "y": y}
    return {"x": x.to(device, dtype), "timesteps": torch.tensor([500.0, 500.0], device=device), "context": context,
            "y": y}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Write the files, time every variant in turn against bf16 (a failure becomes its row's note), report."""
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    config = SMOKE if a.smoke else SDXL
    res = 64 if a.smoke else a.res
    dtype = torch.float32 if a.smoke else torch.bfloat16  # (the smoke UNet is ComfyUI's fp32 build)
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, a.dynamic_vram)
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert

    out_dir, src, int8_file = work_files(a, "sdxl_unet")
    why_not = "CPU smoke run" if device == "cpu" else kitchen_cuda_status()
    t0 = time.perf_counter()
    sd = sdxl_state_dict(config)
    n_params = sum(v.numel() for v in sd.values())
    if a.smoke:
        base = _smoke_patcher(sd)
    else:
        save_file(sd, str(src))
        if why_not is None:
            convert(src, int8_file, format="int8", model="sdxl", device=device, force=True, progress=False)
        base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    del sd
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in base.model.diffusion_model.modules())
    print(f"model: {n_params / 1e9:.2f} B parameters, {blocks} transformer blocks, ready in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    variants = FOLD_VARIANTS + ((("adapter int8 + cuda graphs", "int8", True, True),) if a.graphs else (HOLD,))
    results = adapter_rounds(a, base, lambda r: sdxl_inputs(config, r, device, dtype, a.graphs), res, device, "sdxl",
                             lambda rep: f"{len(rep.converted)} layers converted, "
                                         f"{sum('->' in f for f in rep.folded)} norms folded", int8_file, why_not,
                             variants, apply_model=a.graphs)
    base = None  # the bf16 model leaves the device before the report
    _free(device)
    env = {**run_env(device, a.smoke), "params_billion": n_params / 1e9, "transformer_blocks": blocks,
           "resolution": res, "batch": 2, "warmup": warmup, "iters": iters, "rounds": max(1, a.rounds),
           "comfy_kitchen_cuda": why_not or "available", "dynamic_vram": bool(a.dynamic_vram),
           "apply_model": bool(a.graphs)}
    return write_report(out_dir, "bench_comfyui_sdxl", env, results, to_markdown)


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env = report["env"]
    return model_markdown(report, "SDXL UNet in ComfyUI: step time and peak VRAM",
                          f"{env['params_billion']:.2f} B parameters, {env['transformer_blocks']} transformer blocks; "
                          f"{env['resolution']}x{env['resolution']}, batch {env['batch']} (CFG); eager, one UNet "
                          "forward per step")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_sdxl")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--graphs", action="store_true",
                   help="add the node's cuda_graphs option (bf16; adapter int8); every row steps through apply_model")
    p.add_argument("--only", default="", help="comma-separated variant names to measure (default: all; bf16 always)")
    timing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (or only draw a saved report's picture)."""
    return bench_main(argv, build_parser(), lambda a: "bench_comfyui_sdxl", run)


if __name__ == "__main__":
    sys.exit(main())
