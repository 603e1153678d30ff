"""Wall time per encode and peak VRAM of a T5-XXL-shaped text encoder in ComfyUI's own T5 class: bf16 against
"Enable INT8 on CLIP" (int8, fp8) on the same CLIP, and against ComfyUI's own int8 path (comfy-kitchen) on the
converter's int8 file of the same weights; one process, so the ratios to bf16 come from one run.

ComfyUI's ``comfy.text_encoders.t5.T5`` inside ``comfy.sd1_clip.SDClipModel`` under ``comfy.sd.CLIP``, as a
T5-only stack named ``t5xxl`` (Flux's T5 and tokenizer, min_length 256, without CLIP-L), at real T5-XXL widths
(d_model 4096, d_ff 10240, 64 heads x 64, gated GELU, vocab 32128); ``--layers`` picks the encoder blocks
(default 6; T5-XXL has 24: the blocks carry the time). Weights are random with a 1/sqrt(fan_in) scale: speed and
memory do not depend on their values. Each encode is ``clip.encode_from_tokens`` on one 256-token prompt (batch 1),
eager, wall clock with CUDA synchronized around it; variants take turns over ``--rounds`` (each turn: unload all,
warm up, time ``--iters`` encodes), the median of the rounds' medians is reported, with the peak VRAM of a turn
and the largest per-token relative error of the conditioning against bf16. ComfyUI computes T5 in float32 and
runs an int8 text-encoder file weight-only (``full_precision_mm``: dequantize, float matmul); the adapter runs
its own kernels. Results: ``--out``/bench_comfyui_t5.json and .md. ``--smoke``: tiny widths on the CPU in
seconds (checks the mechanics, numbers mean nothing).

    python benchmarks/bench_comfyui_t5.py --out bench_t5                 # GPU
    python benchmarks/bench_comfyui_t5.py --smoke --out /tmp/t5smoke     # CPU check

On a GPU machine without network, pass ``--comfyui-cache DIR`` (a copy of ~/.cache/comfyquant/comfyui-0.30.0)
and install ComfyUI's requirements and comfy-kitchen 0.2.40's CUDA wheel in this Python beforehand.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import (
    _free,
    _import_comfy,
    _sync,
    cell,
    common_args,
    kitchen_cuda_status,
    run_env,
    time_steps,
)

TOKENS = 256
PROMPT = "a photo of a cat riding a bicycle through a sunny park, highly detailed"
SMOKE = {"d_model": 256, "d_ff": 512, "num_heads": 4, "d_kv": 64}  # the FULL widths: ComfyUI's t5_config_xxl.json


@dataclass
class Result:
    """One variant: its encode times, memory, speed against bf16 and error against bf16."""

    variant: str
    encode_ms: float | None = None
    round_ms: list[float] = field(default_factory=list)
    peak_vram_gib: float | None = None
    load_peak_gib: float | None = None
    weights_gib: float | None = None
    speedup_vs_bf16: float | None = None
    max_rel_err: float | None = None
    note: str = ""


def t5_config(smoke: bool, layers: int) -> dict[str, Any]:
    """ComfyUI's own T5-XXL config with ``layers`` encoder blocks (and tiny widths for ``smoke``)."""
    import comfy.text_encoders.t5

    path = Path(comfy.text_encoders.t5.__file__).with_name("t5_config_xxl.json")
    return {**json.loads(path.read_text()), **(SMOKE if smoke else {}), "num_layers": layers}


def t5_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly the key names and shapes of ComfyUI's T5 (built on the meta device)."""
    import comfy.ops
    import comfy.text_encoders.t5

    model = comfy.text_encoders.t5.T5(config, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1]) if v.dim() == 2 else torch.ones(v.shape)
        if k.endswith(".SelfAttention.q.weight"):  # T5's own init folds the 1/sqrt(d_kv) attention scale into q:
            t /= math.sqrt(config["d_kv"])  # without it the softmax saturates and the error means little
        out[k] = t.to(torch.bfloat16)
    return out


def t5_target(config: dict[str, Any], dtype_t5: torch.dtype | None = None, quant: dict | None = None) -> Any:
    """A CLIP target (stack + tokenizer) holding only ComfyUI's T5 as ``t5xxl``, as ``comfy.text_encoders.flux``
    builds its T5 (``T5XXLModel``) but with ``config`` instead of the 24-block json."""
    import comfy.model_management
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class T5Encoder(comfy.sd1_clip.SDClipModel):
        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            opts = {**(model_options or {}), "model_name": "t5xxl"}
            if quant is not None:
                opts["quantization_metadata"] = quant
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(config), model_options=opts,
                             special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5)

    class T5Stack(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            dt = comfy.model_management.pick_weight_dtype(dtype_t5, dtype, device)
            super().__init__(device=device, dtype=dt, model_options=model_options or {}, name="t5xxl",
                             clip_model=T5Encoder)

    class T5Tokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory: Any = None, tokenizer_data: dict | None = None) -> None:
            super().__init__(embedding_directory, tokenizer_data or {}, name="t5xxl",
                             tokenizer=comfy.text_encoders.flux.T5XXLTokenizer)

    class Target:
        params: ClassVar[dict] = {}
        clip = T5Stack
        tokenizer = T5Tokenizer

    return Target


def load_t5(path: Path, config: dict[str, Any]) -> Any:
    """A ``comfy.sd.CLIP`` from a T5 file, read the way ``comfy.sd.load_clip`` reads one (old-quant conversion,
    ComfyUI's T5 dtype / layer-quantization detection); load_clip itself detects T5-XXL by its 24th block."""
    import comfy.sd
    import comfy.text_encoders.sd3_clip
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    sd, _ = comfy.utils.convert_old_quants(sd, model_prefix="", metadata=metadata)
    found = comfy.text_encoders.sd3_clip.t5_xxl_detect(sd)
    target = t5_target(config, found.get("dtype_t5"), found.get("t5_quantization_metadata"))
    return comfy.sd.CLIP(target, parameters=comfy.utils.calculate_parameters(sd), state_dict=[sd])


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-token relative L2 error of a conditioning against the reference."""
    out, ref = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    return float(((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max())


def _fail(row: Result, what: str, e: BaseException) -> None:
    """Record a variant's failure in its row (the error's first line) and print the traceback."""
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0]
    row.note = f"{what} failed: {type(e).__name__}: {first}"
    print(f"  {row.variant}: {row.note}", file=sys.stderr, flush=True)


def turn(row: Result, clip: Any, tokens: Any, device: str, warmup: int, iters: int) -> torch.Tensor:
    """One variant's turn: unload everything, load it, warm up, time ``iters`` encodes; returns one more cond."""
    import comfy.model_management

    _free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # loaded fully outside inference mode, as bench_comfyui_flux does: ComfyUI's load of a quantized layer (its
    # own or comfyquant's) under torch.inference_mode fails ("Cannot set version_counter for inference tensor")
    comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
    if device == "cuda":  # loading (and the adapter's conversion) apart from encoding
        row.load_peak_gib = max(row.load_peak_gib or 0.0, torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()

    def encode() -> torch.Tensor:  # wall clock: time_steps on "cpu" times each call, the sync ends it
        cond = clip.encode_from_tokens(tokens)
        _sync(device)
        return cond

    times = time_steps(encode, "cpu", warmup, iters)
    row.round_ms.append(statistics.median(times))
    if device == "cuda":
        row.weights_gib = torch.cuda.memory_allocated() / 2**30
        row.peak_vram_gib = max(row.peak_vram_gib or 0.0, torch.cuda.max_memory_allocated() / 2**30)
    print(f"  {row.variant:16s} {row.round_ms[-1]:9.2f} ms/encode"
          + (f", peak {row.peak_vram_gib:.2f} GiB" if row.peak_vram_gib is not None else ""), file=sys.stderr,
          flush=True)
    with torch.inference_mode():
        return encode().float()


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Write the files, build every variant (a failure becomes its row's note), time them in turns, report."""
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    layers = 2 if a.smoke else a.layers
    rounds, warmup, iters = (2, 1, 2) if a.smoke else (a.rounds, a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, False)
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert
    from comfyquant.nodes.clip_adapter import adapt_clip
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    src, int8_file = work / "t5_shaped_bf16.safetensors", work / "t5_shaped_int8.safetensors"
    t0 = time.perf_counter()
    config = t5_config(a.smoke, layers)
    sd = t5_state_dict(config)
    n_params = sum(v.numel() for v in sd.values())
    save_file(sd, str(src))
    del sd
    print(f"model: {n_params / 1e9:.2f} B parameters, bf16 file in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    why_not = kitchen_cuda_status() if device == "cuda" else "CPU smoke run: comfy-kitchen eager backend"
    rows = {n: Result(n) for n in ("bf16", "comfyquant_int8", "comfyquant_int8_unfused", "comfyquant_int8_nonorm",
                                    "comfyquant_int8_rot", "comfyquant_int8_rot_nonorm", "comfyquant_fp8",
                                    "stock_ck_int8")}
    clips: dict[str, Any] = {}
    base = clips["bf16"] = load_t5(src, config)
    tokens = base.tokenize(PROMPT)
    if len(tokens["t5xxl"][0]) != TOKENS:
        raise RuntimeError(f"ComfyUI's T5 tokenizer gave {len(tokens['t5xxl'][0])} tokens, not {TOKENS}")
    # the node's default (q / k / v and wi_0 / wi_1 as one GEMM each, the RMSNorms folded into them), without
    # that sibling fusion, and without the norms' fold (runtime.norms); rotated int8 (the node's hadamard option)
    # with the norms in its rotating quantizer and without
    for variant, fmt, fuse, norms in (("comfyquant_int8", "int8", True, True),
                                      ("comfyquant_int8_unfused", "int8", False, True),
                                      ("comfyquant_int8_nonorm", "int8", True, False),
                                      ("comfyquant_int8_rot", "int8-rot", True, True),
                                      ("comfyquant_int8_rot_nonorm", "int8-rot", True, False),
                                      ("comfyquant_fp8", "fp8", True, True)):
        row = rows[variant]
        try:
            _free(device)
            t1 = time.perf_counter()
            settings = AdapterSettings(format=fmt, runtime=RuntimeOptions(fuse_projections=fuse, fold_norms=norms))
            clips[row.variant], reports = adapt_clip(base, settings)
            row.note = (f"{sum(len(r.converted) for _, r in reports)} layers converted in "
                        f"{time.perf_counter() - t1:.1f} s")
        except Exception as e:
            _fail(row, "adapt_clip", e)
    row = rows["stock_ck_int8"]
    try:
        convert(src, int8_file, format="int8", model="t5xxl", device=device, force=True, progress=False)
        clips[row.variant] = load_t5(int8_file, config)
        row.note = f"{why_not or 'comfy-kitchen CUDA backend'}; ComfyUI runs TE int8 weight-only (full_precision_mm)"
    except Exception as e:
        _fail(row, "convert / load", e)
    ref = None
    for _ in range(rounds):
        for name, clip in list(clips.items()):
            try:
                cond = turn(rows[name], clip, tokens, device, warmup, iters)
                ref = cond if ref is None and name == "bf16" else ref
                if ref is not None and rows[name].max_rel_err is None:
                    rows[name].max_rel_err = max_rel_err(cond, ref)
            except Exception as e:
                _fail(rows[name], "encode", e)
                del clips[name]
    del clips, base
    _free(device)
    for r in rows.values():
        r.encode_ms = statistics.median(r.round_ms) if r.round_ms else None
        if r.encode_ms and rows["bf16"].encode_ms:
            r.speedup_vs_bf16 = rows["bf16"].encode_ms / r.encode_ms
    env = {**run_env(device, a.smoke), "params_billion": n_params / 1e9, "layers": layers, "tokens": TOKENS,
           "dims": {k: config[k] for k in ("d_model", "d_ff", "num_heads", "d_kv", "vocab_size")},
           "rounds": rounds, "warmup": warmup, "iters": iters, "comfy_kitchen_cuda": why_not or "available"}
    report = {"env": env, "results": [asdict(r) for r in rows.values()]}
    (out_dir / "bench_comfyui_t5.json").write_text(json.dumps(report, indent=1))
    (out_dir / "bench_comfyui_t5.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env, d = report["env"], report["env"]["dims"]
    lines = [f"# T5-XXL-shaped text encoder in ComfyUI: encode time and peak VRAM ({env['date']})", "",
             f"Device: {env['device']}; torch {env['torch']}; {env['params_billion']:.2f} B parameters "
             f"({env['layers']} blocks, d_model {d['d_model']}, d_ff {d['d_ff']}, {d['num_heads']} heads x "
             f"{d['d_kv']}){' SMOKE RUN: numbers mean nothing' if env['smoke'] else ''}; "
             f"`clip.encode_from_tokens`, {env['tokens']} tokens, batch 1, eager, wall clock; median of "
             f"{env['rounds']} rounds (variants take turns; each turn {env['warmup']} warm-up + {env['iters']} "
             f"timed encodes). Max rel err: largest per-token relative L2 error of the conditioning vs bf16. "
             f"comfy-kitchen CUDA: {env['comfy_kitchen_cuda']}.", "", f"Command: `{env['command']}`", "",
             "| variant | ms / encode | x bf16 | peak VRAM GiB while loading | while encoding | weights GiB | "
             "max rel err | note |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    for r in report["results"]:
        lines.append(f"| {r['variant']} | {cell(r['encode_ms'], '.2f')} | {cell(r['speedup_vs_bf16'], '.2f')} | "
                     f"{cell(r['load_peak_gib'], '.2f')} | {cell(r['peak_vram_gib'], '.2f')} | "
                     f"{cell(r['weights_gib'], '.2f')} | {cell(r['max_rel_err'], '.2e')} | {r['note']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_t5")
    p.add_argument("--layers", type=int, default=6, help="T5 encoder blocks (T5-XXL: 24)")
    p.add_argument("--rounds", type=int, default=5, help="rounds in which every variant takes one turn")
    p.add_argument("--warmup", type=int, default=2, help="untimed encodes at the start of each turn")
    p.add_argument("--iters", type=int, default=5, help="timed encodes per turn")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
