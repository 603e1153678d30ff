"""Step time and peak VRAM of a Z-Image-shaped model in ComfyUI's own NextDiT class: bf16 against the "Enable INT8
on MODEL" adapter (int8 with its blocks' modulated RMSNorms handed to the layers they feed, the same without that
fold, fp8) and against ComfyUI's own int8 path (comfy-kitchen) on the converter's int8 file of the same weights.

Real Z-Image widths (hidden 3840, 30 heads of 128, SwiGLU 10,240, Qwen3-4B context 2,560 wide; 2 noise- and 2
context-refiner blocks); ``--depth`` main layers (default 8 of Z-Image's 30: the layers carry the time; ~0.2 B
parameters a layer). The model is ComfyUI's ``comfy.ldm.lumina.model.NextDiT`` as ``comfy.sd.load_diffusion_model``
builds it from a state dict whose keys ComfyUI detects as Z-Image (``supported_models.ZImage``); random weights
with a 1/sqrt(fan_in) scale (speed and memory do not depend on their values). Eager mode, batch 1, one forward a
step (Z-Image Turbo samples without CFG), 1024x1024 (latent 16 x 128 x 128 -> 4,096 image tokens) with 128 text
tokens. Results: ``--out``/bench_comfyui_zimage.json, .md and .png. ``--smoke``: a tiny NextDiT on the CPU (built
from the detected config with small widths: ComfyUI's detection sets heads and rotary axes for Z-Image's 3,840
only), no stock row, to check the mechanics.

    python benchmarks/bench_comfyui_zimage.py --out bench_zimage              # GPU, 1024x1024
    python benchmarks/bench_comfyui_zimage.py --smoke --out /tmp/zsmoke       # CPU check
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_comfyui_flux import (
    Result,
    _free,
    _import_comfy,
    add_speedups,
    common_args,
    guarded_rows,
    kitchen_cuda_status,
    measure,
    merge_rounds,
    plot_only,
    random_state_dict,
    results_table,
    run_env,
    stock_rows,
    timing_args,
    work_files,
    write_report,
)

FULL = {"dim": 3840, "cap_feat_dim": 2560, "text_tokens": 128}
SMOKE = {"dim": 256, "cap_feat_dim": 64, "text_tokens": 8, "n_heads": 2, "n_kv_heads": 2}
LATENT_CHANNELS = 16  # Flux's VAE
VARIANTS = (("adapter int8", "int8", True), ("adapter int8 (norms in torch)", "int8", False),
            ("adapter fp8", "fp8", True))


def zimage_config(dims: dict[str, int], depth: int) -> dict[str, Any]:
    """ComfyUI's detected NextDiT config for a Z-Image state dict of these widths (its own detection on the keys
    it reads, at Z-Image's 3,840; smaller widths override what it fixes for 3,840)."""
    import comfy.model_detection

    probe = {"cap_embedder.1.weight": (FULL["dim"], dims["cap_feat_dim"]),
             "noise_refiner.0.attention.k_norm.weight": (128,),
             **{f"layers.{i}.ffn_norm1.weight": (FULL["dim"],) for i in range(depth)}}
    config = comfy.model_detection.detect_unet_config({k: torch.empty(v, device="meta") for k, v in probe.items()},
                                                      "")
    if not config.get("z_image_modulation"):
        raise RuntimeError(f"ComfyUI did not detect the probe as Z-Image: {config}")
    return {**config, **{k: v for k, v in dims.items() if k != "text_tokens"}}


def zimage_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly the key names and shapes of ComfyUI's NextDiT built from ``config``."""
    import comfy.ldm.lumina.model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.ldm.lumina.model.NextDiT(**config, operations=comfy.ops.disable_weight_init,
                                               dtype=torch.bfloat16)
    return random_state_dict(model, seed)


def _smoke_patcher(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> Any:
    """The tiny NextDiT as ComfyUI's Z-Image model class, from the config (no file detection: see above)."""
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.ZImage(config).get_model(sd)
    model.diffusion_model.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def zimage_inputs(dims: dict[str, int], res: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """One step's keyword inputs of ``NextDiT.forward`` at batch 1: latent, timestep, Qwen3 context, its length."""
    g = torch.Generator().manual_seed(1)
    n = dims["text_tokens"]
    return {"x": torch.randn(1, LATENT_CHANNELS, res // 8, res // 8, generator=g).to(device, dtype),
            "timesteps": torch.tensor([0.5], device=device),
            "context": torch.randn(1, n, dims["cap_feat_dim"], generator=g).to(device, dtype), "num_tokens": n}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Write the files, time every variant in turn against bf16 (a failure becomes its row's note), report."""
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dims = SMOKE if a.smoke else FULL
    depth = a.depth or (2 if a.smoke else 8)
    res = 64 if a.smoke else a.res
    dtype = torch.float32 if a.smoke else torch.bfloat16  # (the smoke model is ComfyUI's fp32 build)
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, a.dynamic_vram)
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert
    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    out_dir, src, int8_file = work_files(a, "zimage")
    why_not = "CPU smoke run" if device == "cpu" else kitchen_cuda_status()
    t0 = time.perf_counter()
    config = zimage_config(dims, depth)
    sd = zimage_state_dict(config)
    n_params = sum(v.numel() for v in sd.values())
    if a.smoke:
        base = _smoke_patcher(config, {k: v.float() for k, v in sd.items()})
    else:
        save_file(sd, str(src))
        if why_not is None:
            convert(src, int8_file, format="int8", model="zimage", device=device, force=True, progress=False)
        base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    del sd
    if type(base.model.diffusion_model).__name__ != "NextDiT":
        raise RuntimeError(f"ComfyUI loaded {type(base.model.diffusion_model).__name__}, not NextDiT")
    print(f"model: {n_params / 1e9:.2f} B parameters, {depth} layers, ready in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    outputs: dict[tuple[str, Any], torch.Tensor] = {}

    def inputs(r: int) -> dict[str, Any]:
        return zimage_inputs(dims, r, device, dtype)

    def timed(name: str, patcher: Any, note: str = "") -> list[Result]:
        rows = measure(name, patcher, inputs, [res], device, warmup, iters, a.dynamic_vram, outputs)
        for r in rows:
            r.note = note
        return rows

    def adapter(name: str, fmt: str, fold: bool) -> list[Result]:
        _free(device)
        patched, report = adapt_model(base, AdapterSettings(format=fmt, model_type="zimage",
                                                            runtime=RuntimeOptions(fold_norms=fold)))
        return timed(name, patched, f"{len(report.converted)} layers converted, {len(report.modulated)} blocks' "
                                    f"modulated norms folded")

    def one_round() -> list[Result]:
        """Every variant timed once, in the table's order."""
        results = timed("bf16", base)
        for name, fmt, fold in VARIANTS:
            results += guarded_rows(name, res, functools.partial(adapter, name, fmt, fold))
        return results + stock_rows(int8_file, res, why_not, why_not is None, timed)

    results = merge_rounds([one_round() for _ in range(max(1, a.rounds))])
    base = None  # the bf16 model leaves the device before the report
    _free(device)
    add_speedups(results)
    env = {**run_env(device, a.smoke), "params_billion": n_params / 1e9, "layers": depth, "resolution": res,
           "batch": 1, "dims": dims, "warmup": warmup, "iters": iters, "rounds": max(1, a.rounds),
           "comfy_kitchen_cuda": why_not or "available", "dynamic_vram": bool(a.dynamic_vram)}
    return write_report(out_dir, "bench_comfyui_zimage", env, results, to_markdown)


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env, d = report["env"], report["env"]["dims"]
    lines = [f"# Z-Image-shaped NextDiT in ComfyUI: step time and peak VRAM ({env['date']})", "",
             f"Device: {env['device']}; torch {env['torch']}; {env['params_billion']:.2f} B parameters "
             f"({env['layers']} of Z-Image's 30 layers, hidden {d['dim']}, context {d['text_tokens']} x "
             f"{d['cap_feat_dim']}){' SMOKE RUN: numbers mean nothing' if env['smoke'] else ''}; "
             f"{env['resolution']}x{env['resolution']}, batch 1; eager, one forward per step; median of "
             f"{env['iters']} steps after {env['warmup']} warm-up"
             f"{'' if env.get('rounds', 1) == 1 else ', pooled over ' + str(env['rounds']) + ' rounds'}. "
             f"comfy-kitchen CUDA: {env['comfy_kitchen_cuda']}.", "", f"Command: `{env['command']}`", "",
             *results_table(report["results"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_zimage")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--depth", type=int, default=None, help="main layers (Z-Image: 30; default 8, --smoke 2)")
    timing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (or only draw a saved report's picture)."""
    a = build_parser().parse_args(argv)
    if not plot_only(a, "bench_comfyui_zimage"):
        run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
