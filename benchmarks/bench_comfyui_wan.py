"""Step time and peak VRAM of a Wan 2.1/2.2 14B-shaped text-to-video model in ComfyUI's own Wan class: bf16
against the "Enable INT8 on MODEL" adapter (int8, fp8, int8 with each of the node's attention options) and
against ComfyUI's own int8 path (comfy-kitchen) on the converter's int8 file of the same weights; one process.

Real Wan 14B widths (hidden 5120, 40 heads of 128, ffn 13824, umT5 context 512 x 4096; Wan 2.2's 14B t2v experts
have the same shapes as Wan 2.1's 14B t2v); ``--depth`` picks how many blocks (default 4 of Wan 14B's 40: the
blocks carry the time, the embedders are negligible; ~0.35 B parameters a block, ~1.6 B in all at depth 4, 3.3 GB
of bf16 weights). The model is ComfyUI's ``comfy.ldm.wan.model.WanModel`` as ``comfy.sd.load_diffusion_model``
builds it from a state dict whose keys ComfyUI detects as Wan 2.1 t2v (``supported_models.WAN21_T2V``). Weights
are random with a 1/sqrt(fan_in) scale: speed and memory do not depend on their values. Eager mode, batch 1,
one model forward per "step" (the positive and the negative prompt are two such forwards in a CFG sampler), at
480p: 832x480, 81 frames -> latent [1, 16, 21, 60, 104] -> 32,760 tokens of self-attention. The bf16 model also
runs with each attention option that does not quantize (``cudnn``: the backend order alone), so the attention
backend's share of a quantized row's speed-up is visible. Results: ``--out``/bench_comfyui_wan.json and .md.
``--smoke``: tiny widths, 1 block and a few frames on the CPU in seconds (checks the mechanics, numbers mean
nothing).

    python benchmarks/bench_comfyui_wan.py --out bench_wan              # GPU, 480p
    python benchmarks/bench_comfyui_wan.py --smoke --out /tmp/wsmoke    # CPU check

On a GPU machine without network, pass ``--comfyui-cache DIR`` (a copy of ~/.cache/comfyquant/comfyui-0.30.0)
and install ComfyUI's requirements and comfy-kitchen 0.2.40's CUDA wheel in this Python beforehand.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import (
    STOCK,
    Result,
    _free,
    _import_comfy,
    add_speedups,
    bench_main,
    common_args,
    guarded_rows,
    kitchen_cuda_status,
    measure,
    merge_rounds,
    model_markdown,
    random_state_dict,
    run_env,
    stock_rows,
    timing_args,
    wanted,
    work_files,
    write_report,
)

HEAD_DIM = 128  # ComfyUI's Wan detection: num_heads = dim // 128
LATENT_CHANNELS = 16  # Wan 2.1 VAE (Wan 2.2's 14B experts use it too; only the 5B has 48)
FULL = {"dim": 5120, "ffn": 13824, "text_dim": 4096, "text_tokens": 512}
# text_dim stays 4096 in smoke mode: ComfyUI's detection does not read it, WanModel's default is umT5's 4096
SMOKE = {"dim": 256, "ffn": 512, "text_dim": 4096, "text_tokens": 8}
FULL_VIDEO = {"depth": 4, "frames": 81, "width": 832, "height": 480}
SMOKE_VIDEO = {"depth": 1, "frames": 5, "width": 64, "height": 48}


def latent_shape(frames: int, width: int, height: int) -> tuple[int, int, int, int, int]:
    """The latent [B, C, T, H, W] of a ``frames``-frame video (Wan's VAE: 4x in time after the first frame, 8x in
    space), as ComfyUI's empty Wan latent makes it."""
    return 1, LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8


def tokens(latent: tuple[int, ...]) -> int:
    """Self-attention sequence length of ``latent`` with Wan's (1, 2, 2) patches (ComfyUI pads odd sides)."""
    return latent[2] * math.ceil(latent[3] / 2) * math.ceil(latent[4] / 2)


def wan_state_dict(dims: dict[str, int], depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly ComfyUI's Wan t2v key names and shapes (built on the meta device)."""
    import comfy.ldm.wan.model
    import comfy.model_detection
    import comfy.ops

    # ComfyUI's own detection turns the few keys it reads into the model config (version-proof); no img_emb: t2v
    d, patch = dims["dim"], 1 * 2 * 2
    probe = {"patch_embedding.weight": (d, LATENT_CHANNELS, 1, 2, 2), "head.modulation": (1, 2, d),
             "head.head.weight": (LATENT_CHANNELS * patch, d),
             **{f"blocks.{i}.ffn.0.weight": (dims["ffn"], d) for i in range(depth)}}
    config = comfy.model_detection.detect_unet_config({k: torch.empty(v, device="meta") for k, v in probe.items()},
                                                      "")
    if config.get("image_model") != "wan2.1" or config.get("model_type") != "t2v":
        raise RuntimeError(f"ComfyUI did not detect the probe as Wan 2.1 t2v: {config}")
    with torch.device("meta"):
        model = comfy.ldm.wan.model.WanModel(**config, operations=comfy.ops.disable_weight_init,
                                             dtype=torch.bfloat16)
    return random_state_dict(model, seed)


def wan_inputs(dims: dict[str, int], latent: tuple[int, ...], device: str,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One step's keyword inputs of ``WanModel.forward``, as ComfyUI's sampler passes them for t2v: the noisy
    latent and the umT5 context in the model dtype, the timestep in float32 on Wan's 0-1000 scale."""
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(latent, generator=g).to(device, dtype),
            "timestep": torch.tensor([500.0], device=device),
            "context": torch.randn(1, dims["text_tokens"], dims["text_dim"], generator=g).to(device, dtype)}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Write the files, time every variant in turn against bf16 (a failure becomes its row's note), report."""
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dims = SMOKE if a.smoke else FULL
    video = {k: v if getattr(a, k) is None else getattr(a, k)
             for k, v in (SMOKE_VIDEO if a.smoke else FULL_VIDEO).items()}
    latent = latent_shape(video["frames"], video["width"], video["height"])
    label = f"{video['width']}x{video['height']}x{video['frames']}"
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, a.dynamic_vram)
    import comfy.ldm.wan.model
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert
    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.attention import DEFAULT_MODE, MODES, enable_quantized_attention, policy_for
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    out_dir, src, int8_file = work_files(a, "wan_shaped")
    why_not = kitchen_cuda_status() if device == "cuda" else "CPU smoke run: comfy-kitchen eager backend"
    # stock ComfyUI's int8 only with kitchen's CUDA backend on a GPU (its eager fallback times nothing useful);
    # on the CPU smoke run, with the eager backend, to check the mechanics
    run_stock = device == "cpu" or why_not is None
    t0 = time.perf_counter()
    sd = wan_state_dict(dims, video["depth"])
    n_params = sum(v.numel() for v in sd.values())
    save_file(sd, str(src))
    del sd
    if run_stock:
        convert(src, int8_file, format="int8", model="wan", device=device, force=True, progress=False)
    print(f"model: {n_params / 1e9:.2f} B parameters, latent {list(latent)} = {tokens(latent)} tokens, files "
          f"written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    dtype = torch.bfloat16
    base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    if type(base.model.diffusion_model) is not comfy.ldm.wan.model.WanModel:
        raise RuntimeError(f"ComfyUI loaded {type(base.model.diffusion_model).__name__}, not WanModel")

    def inputs(_label: Any) -> dict[str, torch.Tensor]:  # one resolution, the label: the same latent every time
        return wan_inputs(dims, latent, device, dtype)

    outputs: dict[tuple[str, Any], torch.Tensor] = {}

    def timed(name: str, patcher: Any, note: str = "") -> list[Result]:
        rows = measure(name, patcher, inputs, [label], device, warmup, iters, a.dynamic_vram, outputs)
        for r in rows:
            r.note = note
        return rows

    def with_attention(name: str, mode: str) -> list[Result]:
        patched = base.clone()
        enable_quantized_attention(patched, mode)
        return timed(name, patched)

    def adapter(name: str, fmt: str, attention: str, fold: bool = True) -> list[Result]:
        _free(device)
        t1 = time.perf_counter()
        runtime = RuntimeOptions(attention=attention, fold_norms=fold)
        patched, report = adapt_model(base, AdapterSettings(format=fmt, model_type="wan", runtime=runtime))
        return timed(name, patched, f"{len(report.converted)} layers converted in {time.perf_counter() - t1:.1f} s, "
                                    f"{len(report.modulated)} blocks' modulated norms folded")

    want = wanted(a.only)

    def rows(name: str, fn: Callable[[], list[Result]]) -> list[Result]:  # a variant, unless --only leaves it out
        return guarded_rows(name, label, fn) if want(name) else []

    def one_round() -> list[Result]:
        """Every variant timed once (those ``--only`` names, and bf16), in the table's order."""
        results = timed("bf16", base)
        attentions = [m for m in MODES if m != DEFAULT_MODE]
        # the attention options that do not quantize (ComfyUI's own aside: the bf16 row), alone on the bf16 model:
        # the attention backend's share
        for mode in (m for m in MODES if m != "comfyui" and not getattr(policy_for(m), "quantize", False)):
            name = f"bf16 + attention {mode}"
            results += rows(name, functools.partial(with_attention, name, mode))
        # (format, attention): the node's formats, then each of its attention options on int8
        for fmt, attention in (("int8", DEFAULT_MODE), ("fp8", DEFAULT_MODE), *(("int8", m) for m in attentions)):
            name = f"adapter {fmt}" + ("" if attention == DEFAULT_MODE else f" + attention {attention}")
            results += rows(name, functools.partial(adapter, name, fmt, attention))
        # the blocks' modulated norms in torch (the fold off): what handing them to the layers saves
        name = "adapter int8 (norms in torch)"
        results += rows(name, functools.partial(adapter, name, "int8", DEFAULT_MODE, False))
        return results + (stock_rows(int8_file, label, why_not, run_stock, timed) if want(STOCK) else [])

    results = merge_rounds([one_round() for _ in range(max(1, a.rounds))])
    base = None  # the bf16 model leaves the device before the report
    _free(device)
    add_speedups(results)
    env = {**run_env(device, a.smoke), "params_billion": n_params / 1e9, **video, "latent": list(latent),
           "tokens": tokens(latent), "dims": {**dims, "heads": dims["dim"] // HEAD_DIM, "head_dim": HEAD_DIM},
           "warmup": warmup, "iters": iters, "rounds": max(1, a.rounds), "attention_modes": list(MODES),
           "comfy_kitchen_cuda": why_not or "available", "dynamic_vram": bool(a.dynamic_vram),
           "output_shapes": {name: list(y.shape) for (name, _), y in outputs.items()}}
    return write_report(out_dir, "bench_comfyui_wan", env, results, to_markdown)


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env, d = report["env"], report["env"]["dims"]
    return model_markdown(report, "Wan 2.x 14B-shaped text-to-video model in ComfyUI: step time and peak VRAM",
                          f"{env['params_billion']:.2f} B parameters ({env['depth']} of Wan 14B's 40 blocks, hidden "
                          f"{d['dim']}, {d['heads']} heads x {d['head_dim']}, ffn {d['ffn']}, context "
                          f"{d['text_tokens']} x {d['text_dim']}); {env['width']}x{env['height']}, {env['frames']} "
                          f"frames -> latent {env['latent']} -> {env['tokens']} tokens; eager, batch 1, one forward "
                          "per step")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_wan")
    p.add_argument("--depth", type=int, default=None, help="blocks (Wan 14B: 40; default 4, --smoke 1)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81, --smoke 5)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default 832, --smoke 64)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default 480, --smoke 48)")
    p.add_argument("--only", default="", help="comma-separated variant names to measure (default: all; bf16 always)")
    timing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (or only draw a saved report's picture)."""
    return bench_main(argv, build_parser(), lambda a: "bench_comfyui_wan", run)


if __name__ == "__main__":
    sys.exit(main())
