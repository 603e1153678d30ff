"""Step time and peak VRAM of Z-Image-, Qwen-Image- and LTX-Video-shaped models in ComfyUI's own classes: bf16 against the
"Enable INT8 on MODEL" adapter (int8 with the blocks' modulated norms handed to the layers they feed, the same
without that fold, fp8) and against ComfyUI's own int8 path (comfy-kitchen) on the converter's int8 file of the
same weights; one family a run (``--family``).

- ``zimage``: Z-Image's NextDiT (``comfy.ldm.lumina.model``): hidden 3840, 30 heads of 128, SwiGLU 10,240, Qwen3-4B
  context 2,560 wide, 2 noise- and 2 context-refiner blocks; ``--depth`` main layers (default 8 of 30, ~0.2 B
  parameters a layer); one forward a step (Z-Image Turbo samples without CFG), 128 text tokens.
- ``qwen_image``: Qwen-Image's MMDiT (``comfy.ldm.qwen_image.model``): hidden 3072, 24 heads of 128, Qwen2.5-VL
  context 3,584 wide; ``--depth`` blocks (default 8 of 60, ~0.34 B parameters a block); 128 text tokens.
- ``ltxv``: LTX-Video 2B's DiT (``comfy.ldm.lightricks.model``): hidden 2048, 32 heads of 64, T5-XXL context 4,096
  wide; ``--depth`` blocks (default 8 of 28); a square video of 97 frames, ``--res`` pixels a side (latent
  128 x 13 x res/32 x res/32: 7,488 tokens at 768), 128 text tokens.

Each model is ComfyUI's class as ``comfy.sd.load_diffusion_model`` builds it from a state dict whose keys ComfyUI
detects as that family; random weights with a 1/sqrt(fan_in) scale (speed and memory do not depend on their
values). Eager mode, batch 1, 1024x1024 (latent 16 x 128 x 128 -> 4,096 image tokens; LTX-Video: see above). Results:
``--out``/bench_comfyui_<family>.json, .md and .png. ``--smoke``: a tiny model on the CPU (built from the family's
config with small widths: detection fixes the real ones), no stock row, to check the mechanics.

    python benchmarks/bench_comfyui_dit.py --family zimage --out bench_zimage           # GPU, 1024x1024
    python benchmarks/bench_comfyui_dit.py --family qwen_image --smoke --out /tmp/qsmoke  # CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import (
    FOLD_VARIANTS,
    STOCK_ROPE,
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

LATENT_CHANNELS = 16  # Flux's VAE (Z-Image), Wan 2.1's (Qwen-Image)
TEXT_TOKENS = {"full": 128, "smoke": 8}


@dataclass(frozen=True)
class Family:
    """What differs between the families: ComfyUI's classes, the detection probe, the widths, the inputs."""

    title: str
    preset: str  # the adapter's model_type and the converter's model
    image_model: str  # what ComfyUI's detection calls it
    module: str  # ComfyUI's module and class of the diffusion model
    cls: str
    supported: str  # comfy.supported_models class (the smoke model's)
    total: int  # the real model's blocks (what --depth counts)
    probe: Callable[[int], dict[str, tuple[int, ...]]]  # keys ComfyUI's detection reads, for `depth` blocks
    smoke: dict[str, Any]  # config overrides for the tiny CPU model
    context: tuple[int, int]  # text context width (full, smoke)
    text_in: str  # the forward's name for the text context


def _zimage_probe(depth: int) -> dict[str, tuple[int, ...]]:
    return {"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,),
            **{f"layers.{i}.ffn_norm1.weight": (3840,) for i in range(depth)}}


def _qwen_probe(depth: int) -> dict[str, tuple[int, ...]]:
    return {"txt_norm.weight": (3584,), "proj_out.weight": (64, 3072), "img_in.weight": (3072, 64),
            **{f"transformer_blocks.{i}.img_mod.1.weight": (6 * 3072, 3072) for i in range(depth)}}


def _ltxv_probe(depth: int) -> dict[str, tuple[int, ...]]:
    return {"adaln_single.emb.timestep_embedder.linear_1.bias": (2048,),  # (32 heads of to_k's width / 32)
            **{f"transformer_blocks.{i}.attn2.to_k.weight": (2048, 2048) for i in range(depth)}}


FAMILIES = {
    "zimage": Family("Z-Image-shaped NextDiT", "zimage", "lumina2", "comfy.ldm.lumina.model", "NextDiT", "ZImage", 30,
                     _zimage_probe, {"dim": 256, "cap_feat_dim": 64, "n_heads": 2, "n_kv_heads": 2},
                     (2560, 64), "context"),
    "qwen_image": Family("Qwen-Image-shaped MMDiT", "qwen-image", "qwen_image", "comfy.ldm.qwen_image.model",
                         "QwenImageTransformer2DModel", "QwenImage", 60, _qwen_probe,
                         {"num_attention_heads": 2, "joint_attention_dim": 64}, (3584, 64), "context"),
    "ltxv": Family("LTX-Video-2B-shaped DiT", "ltxv", "ltxv", "comfy.ldm.lightricks.model", "LTXVModel", "LTXV", 28,
                   _ltxv_probe, {"num_attention_heads": 2, "attention_head_dim": 32, "cross_attention_dim": 64,
                                 "caption_channels": 64}, (4096, 64), "context"),
}
LTXV_CHANNELS, LTXV_FRAMES = 128, {"full": 13, "smoke": 2}  # LTXV's VAE: 128 channels, 97 frames -> 13 latent


def family_config(fam: Family, depth: int, smoke: bool) -> dict[str, Any]:
    """ComfyUI's detected config of the family's state dict with ``depth`` blocks (its own detection on the keys it
    reads), with the smoke widths over it for ``smoke``."""
    import comfy.model_detection

    probe = {k: torch.empty(v, device="meta") for k, v in fam.probe(depth).items()}
    config = comfy.model_detection.detect_unet_config(probe, "")
    if config.get("image_model") != fam.image_model:
        raise RuntimeError(f"ComfyUI did not detect the probe as {fam.title}: {config}")
    return {**config, **fam.smoke} if smoke else config


def family_state_dict(fam: Family, config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly the key names and shapes of the family's class built from ``config``."""
    import importlib

    import comfy.ops

    cls = getattr(importlib.import_module(fam.module), fam.cls)
    with torch.device("meta"):
        model = cls(**config, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    return random_state_dict(model, seed)


def _smoke_patcher(fam: Family, config: dict[str, Any], sd: dict[str, torch.Tensor]) -> Any:
    """The tiny model as ComfyUI's model class of the family, from the config (no file detection: see above)."""
    import comfy.model_patcher
    import comfy.supported_models

    model = getattr(comfy.supported_models, fam.supported)(config).get_model(sd)
    model.diffusion_model.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def family_inputs(fam: Family, smoke: bool, res: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """One step's keyword inputs of the model's forward at batch 1: latent, timestep, text context (its length)."""
    g = torch.Generator().manual_seed(1)
    n, width = TEXT_TOKENS["smoke" if smoke else "full"], fam.context[1 if smoke else 0]
    ctx = torch.randn(1, n, width, generator=g).to(device, dtype)
    if fam.preset == "ltxv":  # a square video of 97 frames (LTXV's VAE: 32x32 pixels and 8 frames a latent cell)
        frames = LTXV_FRAMES["smoke" if smoke else "full"]
        return {"x": torch.randn(1, LTXV_CHANNELS, frames, res // 32, res // 32, generator=g).to(device, dtype),
                "timestep": torch.tensor([0.5], device=device), "context": ctx, "attention_mask": None}
    if fam.preset == "zimage":
        return {"x": torch.randn(1, LATENT_CHANNELS, res // 8, res // 8, generator=g).to(device, dtype),
                "timesteps": torch.tensor([0.5], device=device), "context": ctx, "num_tokens": n}
    return {"x": torch.randn(1, LATENT_CHANNELS, 1, res // 8, res // 8, generator=g).to(device, dtype),
            "timestep": torch.tensor([0.5], device=device), "context": ctx}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Write the files, time every variant in turn against bf16 (a failure becomes its row's note), report."""
    fam = FAMILIES[a.family]
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    depth = a.depth or (2 if a.smoke else 8)
    res = 64 if a.smoke else a.res
    dtype = torch.float32 if a.smoke else torch.bfloat16  # (the smoke model is ComfyUI's fp32 build)
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, a.dynamic_vram)
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert

    out_dir, src, int8_file = work_files(a, a.family)
    why_not = "CPU smoke run" if device == "cpu" else kitchen_cuda_status()
    t0 = time.perf_counter()
    config = family_config(fam, depth, a.smoke)
    sd = family_state_dict(fam, config)
    n_params = sum(v.numel() for v in sd.values())
    if a.smoke:
        base = _smoke_patcher(fam, config, {k: v.float() for k, v in sd.items()})
    else:
        save_file(sd, str(src))
        if why_not is None:
            convert(src, int8_file, format="int8", model=fam.preset, device=device, force=True, progress=False)
        base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    del sd
    if type(base.model.diffusion_model).__name__ != fam.cls:
        raise RuntimeError(f"ComfyUI loaded {type(base.model.diffusion_model).__name__}, not {fam.cls}")
    print(f"model: {n_params / 1e9:.2f} B parameters, {depth} blocks, ready in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    results = adapter_rounds(a, base, lambda r: family_inputs(fam, a.smoke, r, device, dtype), res, device,
                             fam.preset, lambda rep: f"{len(rep.converted)} layers converted, {len(rep.modulated)} "
                                                     f"blocks' modulated norms folded", int8_file, why_not,
                             FOLD_VARIANTS + ((STOCK_ROPE,) if a.family == "qwen_image" else ()))
    base = None  # the bf16 model leaves the device before the report
    _free(device)
    env = {**run_env(device, a.smoke), "family": a.family, "title": fam.title, "params_billion": n_params / 1e9,
           "blocks": depth, "total_blocks": fam.total, "resolution": res, "batch": 1,
           "text_tokens": TEXT_TOKENS["smoke" if a.smoke else "full"], "warmup": warmup, "iters": iters,
           "rounds": max(1, a.rounds), "comfy_kitchen_cuda": why_not or "available",
           "dynamic_vram": bool(a.dynamic_vram)}
    return write_report(out_dir, f"bench_comfyui_{a.family}", env, results, to_markdown)


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env = report["env"]
    return model_markdown(report, f"{env['title']} in ComfyUI: step time and peak VRAM",
                          f"{env['params_billion']:.2f} B parameters ({env['blocks']} of the model's "
                          f"{env['total_blocks']} blocks, {env['text_tokens']} text tokens); "
                          f"{env['resolution']}x{env['resolution']}, batch 1; eager, one forward per step")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_<family>")
    p.add_argument("--family", choices=sorted(FAMILIES), default="zimage", help="the model family (default zimage)")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--depth", type=int, default=None, help="blocks (Z-Image 30, Qwen-Image 60; default 8, --smoke 2)")
    timing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (or only draw a saved report's picture)."""
    return bench_main(argv, build_parser(), lambda a: f"bench_comfyui_{a.family}", run)


if __name__ == "__main__":
    sys.exit(main())
