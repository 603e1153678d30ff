"""Step time and peak VRAM of a Flux.1-dev-shaped model in ComfyUI's own Flux class: bf16 against the
"Enable INT8 on MODEL" adapter (int8, int8-rot, fp8), against ComfyUI's own int8 path (comfy-kitchen) on the
converter's int8 file of the same weights, and against comfyquant's loader node on that file; one process.

Real Flux.1-dev widths (hidden 3072, 24 heads, T5 context 4096 x 512 tokens, pooled 768, guidance embedding);
``--depth`` / ``--depth-single`` pick how many double / single blocks (default 6 / 12, a third of Flux.1-dev:
the blocks carry the time, the embedders are negligible). Weights are random with a 1/sqrt(fan_in) scale: speed
and memory do not depend on their values. Eager mode, batch 1, one model forward per "step" (Flux-dev runs no
CFG batch), at 1024x1024 (4096 image tokens) and 512x512 (1024). Results: ``--out``/bench_comfyui_flux.json and
.md. ``--smoke``: tiny widths on the CPU in seconds (checks the mechanics, numbers mean nothing).

    python benchmarks/bench_comfyui_flux.py --out bench_flux            # GPU
    python benchmarks/bench_comfyui_flux.py --smoke --out /tmp/smoke    # CPU check

On a GPU machine without network, pass ``--comfyui-cache DIR`` (a copy of ~/.cache/comfyquant/comfyui-0.30.0)
and install ComfyUI's requirements and comfy-kitchen 0.2.40's CUDA wheel in this Python beforehand.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.bench.saved import read_saved_json
from comfyquant.nodes.attention import DEFAULT_MODE

FULL = {"hidden": 3072, "heads": 24, "context": 4096, "vec": 768, "txt_tokens": 512}
SMOKE = {"hidden": 256, "heads": 2, "context": 64, "vec": 32, "txt_tokens": 8}


@dataclass
class Result:
    """One variant at one resolution."""

    variant: str
    resolution: int | str  # image side in pixels (Flux), or a label: "832x480x81" (Wan: width x height x frames)
    step_ms: float | None = None
    step_ms_all: list[float] = field(default_factory=list)
    peak_vram_gib: float | None = None
    weights_gib: float | None = None
    speedup_vs_bf16: float | None = None
    # the same from each row's fast quartile of steps (fast_steps of step_ms_all): a noisy host's slow phases only
    # add time, so while a quarter of a variant's steps ran in steady phases this reads its steady speed
    speedup_fast_vs_bf16: float | None = None
    rel_err_vs_bf16: float | None = None  # relative L2 error of one step's output against bf16's
    note: str = ""
    # the host's share: the step call's wall time until it returns, before the sync (the GPU's queue may still run).
    # Near step_ms the step is host-bound (faster kernels cannot show; less host time per call can), well under it
    # GPU-bound: the regime a per-call cost model cannot see (runs 113 and 120-122)
    host_ms: float | None = None
    host_ms_all: list[float] = field(default_factory=list)


def _import_comfy(cache: str | None, device: str, dynamic: bool) -> Any:
    from comfyquant.testing.comfyui_env import ensure_comfyui, import_comfy

    root = ensure_comfyui(Path(cache) if cache else None)
    # normal VRAM mode: unloading a variant moves it to the CPU (--highvram would keep every earlier variant on
    # the GPU, and each variant's "peak VRAM" would include all the ones before it); each variant is still
    # loaded fully (force_full_load), the GPU holds any one of them many times over
    args = ("--disable-dynamic-vram",) if device == "cuda" and not dynamic else ()
    return import_comfy(root, args=args, installed_kitchen=device == "cuda")


def flux_state_dict(dims: dict[str, int], depth: int, depth_single: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with exactly ComfyUI's Flux key names and shapes (built on the meta device)."""
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    # ComfyUI's own detection turns the few keys it reads into the model config (version-proof)
    h = dims["hidden"]
    probe = {"img_in.weight": (h, 64), "txt_in.weight": (h, dims["context"]),
             "vector_in.in_layer.weight": (h, dims["vec"]), "guidance_in.in_layer.weight": (h, 256),
             **{f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(depth)},
             **{f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(depth_single)}}
    config = comfy.model_detection.detect_unet_config({k: torch.empty(v, device="meta") for k, v in probe.items()},
                                                      "")
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    return random_state_dict(model, seed)


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights for every entry of ``model``'s state dict (meta tensors will do): a 1/sqrt(fan_in) scale
    for weights of 2+ dims (fan_in: all but the first), small biases, ones for norm scales; any shape works."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.dim() >= 2:
            t = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
        elif k.endswith(".bias"):
            t = torch.randn(v.shape, generator=g) * 0.02
        else:
            t = torch.ones(v.shape)
        out[k] = t.to(torch.bfloat16)
    return out


def _inputs(dims: dict[str, int], res: int, device: str, dtype: torch.dtype,
            apply_model: bool = False) -> dict[str, torch.Tensor]:
    """One step's inputs: the diffusion model's keyword arguments, or ``BaseModel.apply_model``'s (``sigma`` 0.5
    is timestep 0.5 of the direct call: Flux's flow sampling scales it by 1000 on the way, as the model's own
    embedding expects)."""
    g = torch.Generator().manual_seed(1)
    lat = res // 8
    x = torch.randn(1, 16, lat, lat, generator=g).to(device, dtype)
    context = torch.randn(1, dims["txt_tokens"], dims["context"], generator=g).to(device, dtype)
    y = torch.randn(1, dims["vec"], generator=g).to(device, dtype)
    if apply_model:
        return {"x": x.float(), "sigma": torch.tensor([0.5], device=device), "context": context, "y": y,
                "guidance": torch.tensor([3.5], device=device)}
    return {"x": x, "timestep": torch.tensor([0.5], device=device, dtype=dtype), "context": context, "y": y,
            "guidance": torch.tensor([3.5], device=device, dtype=dtype)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(fn: Callable[[], Any], device: str, warmup: int, iters: int,
               host: list[float] | None = None) -> list[float]:
    """Milliseconds per call (CUDA events on the GPU, wall clock on the CPU) after ``warmup`` calls; ``host``
    receives each call's wall time until it returned, before the sync (on the CPU the same as the call's)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        out = []
        for _ in range(iters):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                fn()
                b.record()
                if host is not None:
                    host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
                if host is not None:
                    host.append(out[-1])
    return out


def _free(device: str) -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, patcher: Any, inputs: Callable[[Any], dict[str, torch.Tensor]], resolutions: list[Any],
            device: str, warmup: int, iters: int, dynamic: bool = False,
            outputs: dict[tuple[str, Any], torch.Tensor] | None = None, apply_model: bool = False) -> list[Result]:
    """Load ``patcher`` fully on the device and time one forward per resolution, ``diffusion_model(**inputs(res))``
    (with the patcher's transformer options, as ComfyUI's sampler passes them: attention overrides apply); one
    output per resolution goes to ``outputs`` (on the CPU) and its error against bf16's, when bf16's is there, to
    the result. ``apply_model``: one ``BaseModel.apply_model`` call per step instead, with the patcher's wrappers
    merged into the transformer options as ComfyUI's sampler merges them (the node's CUDA graphs are such a
    wrapper); ``inputs`` then holds ``x``, ``sigma``, ``context`` and the model's extra conditions."""
    import comfy.model_management
    import comfy.patcher_extension

    _free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    comfy.model_management.load_models_gpu([patcher], force_full_load=not dynamic)  # dynamic VRAM refuses it
    weights = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    dm = patcher.model.diffusion_model
    opts = patcher.model_options.get("transformer_options", {})
    if apply_model:
        opts = dict(opts)
        opts["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers)
    out = []
    for res in resolutions:
        inp = inputs(res)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step(inp: dict[str, torch.Tensor] = inp) -> torch.Tensor:
            if apply_model:
                rest = {k: v for k, v in inp.items() if k not in ("x", "sigma", "context")}
                return patcher.model.apply_model(inp["x"], inp["sigma"], c_crossattn=inp["context"],
                                                 transformer_options=opts, **rest)
            return dm(**inp, transformer_options=opts)

        host: list[float] = []
        times = time_steps(step, device, warmup, iters, host)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        row = Result(name, res, statistics.median(times), times, peak, weights, host_ms=statistics.median(host),
                     host_ms_all=host)
        if outputs is not None:
            with torch.inference_mode():
                y = step().float().cpu()
            outputs[(name, res)] = y
            ref = outputs.get(("bf16", res))
            if ref is not None:
                row.rel_err_vs_bf16 = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
        out.append(row)
        print(f"  {name:28s} {res}{'px' if isinstance(res, int) else ''}: {statistics.median(times):9.2f} ms/step"
              f" (host {row.host_ms:.2f})" + (f", peak {peak:.2f} GiB" if peak is not None else ""), file=sys.stderr,
              flush=True)
    return out


def kitchen_cuda_status() -> str | None:
    """None when comfy-kitchen's CUDA backend is available here, else why not."""
    try:
        import comfy_kitchen
    except ImportError as e:
        return f"comfy_kitchen not importable: {e}"
    info = comfy_kitchen.list_backends().get("cuda", {})
    if info.get("available") and not info.get("disabled"):
        return None
    return f"comfy-kitchen CUDA backend unavailable: {info.get('unavailable_reason') or 'disabled'}"


def run(a: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dims = SMOKE if a.smoke else FULL
    depth, depth_single = (1, 1) if a.smoke else (a.depth, a.depth_single)
    resolutions = [64] if a.smoke else a.resolutions
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    _import_comfy(a.comfyui_cache, device, a.dynamic_vram)
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert

    out_dir, src, int8_file = work_files(a, "flux_shaped")
    t0 = time.perf_counter()
    sd = flux_state_dict(dims, depth, depth_single)
    n_params = sum(v.numel() for v in sd.values())
    save_file(sd, str(src))
    del sd
    convert(src, int8_file, format="int8", model="flux", device=device, force=True, progress=False)
    print(f"model: {n_params / 1e9:.2f} B parameters, files written in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    dtype = torch.bfloat16
    base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    inputs = functools.partial(_inputs, dims, device=device, dtype=dtype, apply_model=a.graphs)
    rounds = [one_round(a, base, inputs, resolutions, device, warmup, iters, outputs, int8_file)
              for _ in range(max(1, a.rounds))]
    results, why_not = merge_rounds([r for r, _ in rounds]), rounds[0][1]
    del base
    _free(device)
    add_speedups(results)
    env = {**run_env(device, a.smoke), "params_billion": n_params / 1e9, "depth": depth, "depth_single": depth_single,
           "dims": dims, "warmup": warmup, "iters": iters, "rounds": max(1, a.rounds), "apply_model": bool(a.graphs),
           "comfy_kitchen_cuda": why_not or "available", "dynamic_vram": bool(a.dynamic_vram)}
    return write_report(out_dir, "bench_comfyui_flux", env, results, to_markdown)


def merge_rounds(rounds: list[list[Result]]) -> list[Result]:
    """One row per (variant, resolution) from several rounds of the whole variant list (each round measures every
    variant once, so slow phases of a noisy host spread over all of them): every step time pooled, the median of
    the pool reported, each round's median kept in the note."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[tuple[str, Any], Result] = {}
    per_round: dict[tuple[str, Any], list[float]] = {}
    for rows in rounds:
        for r in rows:
            key = (r.variant, r.resolution)
            per_round.setdefault(key, []).append(r.step_ms)
            m = merged.setdefault(key, r)
            if m is not r:
                m.step_ms_all = [*m.step_ms_all, *r.step_ms_all]
                m.host_ms_all = [*m.host_ms_all, *r.host_ms_all]
                m.peak_vram_gib = max(m.peak_vram_gib or 0.0, r.peak_vram_gib or 0.0) or None
    for key, m in merged.items():
        if not m.step_ms_all:  # a row that was not timed (failed, or not run): its first round's note says why
            continue
        m.step_ms = statistics.median(m.step_ms_all)
        m.host_ms = statistics.median(m.host_ms_all) if m.host_ms_all else m.host_ms
        m.note = (m.note + "; " if m.note else "") + "round medians " + "/".join(
            "-" if v is None else f"{v:.1f}" for v in per_round[key])
    return list(merged.values())


def wanted(only: str | None) -> Callable[[str], bool]:
    """``--only``'s test: whether a variant named so is measured (every variant where ``only`` names none)."""
    names = {v.strip() for v in (only or "").split(",") if v.strip()}
    return lambda name: not names or name in names


def one_round(a: argparse.Namespace, base: Any, inputs: Callable[[Any], dict[str, torch.Tensor]],
              resolutions: list[int], device: str, warmup: int, iters: int,
              outputs: dict[tuple[str, Any], torch.Tensor], int8_file: Path) -> tuple[list[Result], str | None]:
    """Every variant measured once, in the table's order: (rows, why comfy-kitchen's CUDA backend is not used).
    ``a.graphs`` adds the node's CUDA-graph option on bf16 and on int8 with cuDNN attention (every variant then
    steps through ``apply_model``, where the option's wrapper sits); ``a.only`` keeps the named variants."""
    import comfy.sd

    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.attention import enable_quantized_attention
    from comfyquant.nodes.graphs import enable_cuda_graphs
    from comfyquant.nodes.loader import load_quantized_model
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    want = wanted(a.only)
    results: list[Result] = []

    def run(name: str, patcher: Any, note: str = "") -> None:
        rows = measure(name, patcher, inputs, resolutions, device, warmup, iters, a.dynamic_vram, outputs,
                       apply_model=a.graphs)
        for r in rows:
            r.note = note
        results.extend(rows)

    run("bf16", base)  # always: every row's speed-up and error are against it
    extra = [(BF16_LEAN, DEFAULT_MODE, False), ("bf16 + attention sdpa", "sdpa", False),
             ("bf16 + attention cudnn", "cudnn", False)] + (
        [("bf16 + cuda graphs", None, True)] if a.graphs else [])
    for name, attention, graphs in extra:  # the options alone on the bf16 model: their share of any speed-up
        if want(name):
            clone = base.clone()
            if attention:
                enable_quantized_attention(clone, attention)
            if graphs:
                enable_cuda_graphs(clone)
            run(name, clone)
            del clone
    # (format, attention, graphs, fold_norms, fuse_rope): the node's options on the quantized models; the blocks'
    # modulated LayerNorms are folded into the quantized layers (nodes.flux_blocks) unless fold_norms is off, their
    # q / k norms and RoPE one kernel (nodes.flux_rope) unless fuse_rope is
    d = DEFAULT_MODE
    variants = [("int8", d, False, True, True), ("int8", "sdpa", False, True, True),
                ("int8", "comfyui", False, True, True), ("int8", d, False, True, False), ("int8", d, False, False, True),
                ("int8-rot", d, False, True, True), ("fp8", d, False, True, True),
                ("fp8", d, False, False, True), ("int8", "cudnn", False, True, True),
                ("int8", "int8-fp8", False, True, True), ("fp8", "cudnn", False, True, True)] + (
        [("int8", "cudnn", True, True, True), ("int8", d, True, True, True)] if a.graphs else [])
    for fmt, attention, graphs, fold, rope in variants:
        name = f"adapter {fmt}" + ("" if attention == d else f" + attention {attention}") + (
            " + cuda graphs" if graphs else "") + ("" if fold else " (norms in torch)") + (
            "" if rope or not fold else " (stock RoPE)")
        if not want(name):
            continue
        _free(device)
        t1 = time.perf_counter()
        patched, report = adapt_model(base, AdapterSettings(format=fmt, model_type="flux", runtime=RuntimeOptions(
            attention=attention, cuda_graphs=graphs, fold_norms=fold, fuse_rope=rope)))
        run(name, patched, f"{len(report.converted)} layers converted in {time.perf_counter() - t1:.1f} s")
        del patched
    why_not = kitchen_cuda_status() if device == "cuda" else "CPU smoke run: comfy-kitchen eager backend"
    if want(STOCK):
        stock = comfy.sd.load_diffusion_model(str(int8_file))
        run(STOCK, stock, why_not or "comfy-kitchen CUDA backend")
        del stock
    if want("comfyquant loader (same file)"):
        ours, _ = load_quantized_model(int8_file, RuntimeOptions())
        run("comfyquant loader (same file)", ours)
        del ours
    return results, why_not


STOCK = "ComfyUI int8 (same file)"  # ComfyUI's own int8 path (comfy-kitchen) on the converter's file


def failed_row(name: str, label: Any, e: BaseException) -> Result:
    """A row for a variant that raised (its error's first line as the note), so the other rows still report."""
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0]
    print(f"  {name}: failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
    return Result(name, label, note=f"failed: {type(e).__name__}: {first}")


def guarded_rows(name: str, label: Any, timed: Callable[[], list[Result]]) -> list[Result]:
    """``timed()``'s rows, or the variant's :func:`failed_row` where it raised."""
    try:
        return timed()
    except Exception as e:  # a variant that fails to build or run is a row of the report, not its end
        return [failed_row(name, label, e)]


def stock_rows(int8_file: Path, label: Any, why_not: str | None, run: bool,
               timed: Callable[[str, Any, str], list[Result]]) -> list[Result]:
    """The :data:`STOCK` rows: ComfyUI's loader on ``int8_file``, timed by ``timed(name, patcher, note)`` (the note:
    ``why_not`` comfy-kitchen's CUDA backend is not used, else that it is), or one row saying ``why_not`` it
    did not run."""
    if not run:
        return [Result(STOCK, label, note=f"not run: {why_not}")]
    import comfy.sd

    return guarded_rows(STOCK, label, lambda: timed(STOCK, comfy.sd.load_diffusion_model(str(int8_file)),
                                                    why_not or "comfy-kitchen CUDA backend"))


# (row, format, fold_norms[, cuda_graphs[, attention[, fuse_rope]]]): the model benches' rows; the default attention
# is the node's (DEFAULT_MODE "auto": per call shape the faster of ComfyUI's kernel and cuDNN's, measured), "sdpa"
# ComfyUI's kernel choice without its per-call backend-order scope (the default before), "comfyui" ComfyUI's own
FOLD_VARIANTS = (("adapter int8", "int8", True), ("adapter int8 (norms in torch)", "int8", False),
                 ("adapter fp8", "fp8", True), ("adapter int8 + attention sdpa", "int8", True, False, "sdpa"),
                 ("adapter int8 + attention comfyui", "int8", True, False, "comfyui"))
# the node's defaults with a budget for 16-bit copies of the layers where int8 loses (runtime.kernels.dense_copy)
HOLD = ("adapter int8 + dense_copy_mb", "int8", True, False, DEFAULT_MODE, True, 8192)
STOCK_ROPE = ("adapter int8 (stock RoPE)", "int8", True, False, DEFAULT_MODE, False)  # the fused q / k norm + RoPE off
BF16_GRAPHS = "bf16 + cuda graphs"
BF16_LEAN = f"bf16 + attention {DEFAULT_MODE}"  # the node's default attention alone on bf16: its share of a speed-up


def adapter_rounds(a: argparse.Namespace, base: Any, inputs: Callable[[Any], dict[str, Any]], label: Any,
                   device: str, model_type: str, note: Callable[[Any], str], int8_file: Path,
                   why_not: str | None, variants: tuple = FOLD_VARIANTS, apply_model: bool = False) -> list[Result]:
    """bf16, the adapter's ``variants`` on ``base`` (``note(report)`` in each row) and the stock row, timed in
    ``a.rounds`` pooled rounds at one resolution ``label``, with speed-ups; ``base`` stays loaded. A variant with
    the node's ``cuda_graphs`` (a fourth item, True) adds bf16 with the same option; a fifth item names the
    ``attention`` mode (default the node's, which bf16 gets a row with too); ``apply_model``: every row steps through
    ``BaseModel.apply_model`` (where the graphs option's wrapper sits; ``inputs`` gives its arguments)."""
    warmup, iters = (1, 2) if a.smoke else (a.warmup, a.iters)
    outputs: dict[tuple[str, Any], torch.Tensor] = {}
    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.attention import enable_quantized_attention
    from comfyquant.nodes.graphs import enable_cuda_graphs
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    def timed(name: str, patcher: Any, text: str = "") -> list[Result]:
        rows = measure(name, patcher, inputs, [label], device, warmup, iters, a.dynamic_vram, outputs, apply_model)
        for r in rows:
            r.note = text
        return rows

    def adapter(name: str, fmt: str, fold: bool, graphs: bool = False, attention: str = DEFAULT_MODE,
                rope: bool = True, copy_mb: int = 0) -> list[Result]:
        _free(device)
        runtime = RuntimeOptions(fold_norms=fold, fold_layer_norms=fold, cuda_graphs=graphs, attention=attention,
                                 fuse_rope=rope, dense_copy_mb=copy_mb)
        patched, report = adapt_model(base, AdapterSettings(format=fmt, model_type=model_type, runtime=runtime))
        rows = timed(name, patched, note(report))
        if runtime.copy_budget is not None:  # the copies are made at the first step: read after timing
            for r in rows:
                r.note += f"; dense copies: {runtime.copy_budget.summary()}"
        return rows

    def bf16_graphs() -> list[Result]:
        clone = base.clone()
        enable_cuda_graphs(clone)
        return timed(BF16_GRAPHS, clone, "the node's cuda_graphs option on the bf16 model")

    def bf16_lean() -> list[Result]:
        clone = base.clone()
        enable_quantized_attention(clone, DEFAULT_MODE)
        return timed(BF16_LEAN, clone, "the node's default attention on the bf16 model")

    keep = wanted(getattr(a, "only", ""))  # --only: these rows

    def one_round() -> list[Result]:
        results = timed("bf16", base) + (guarded_rows(BF16_LEAN, label, bf16_lean) if keep(BF16_LEAN) else [])
        if any(v[3:] and v[3] for v in variants) and keep(BF16_GRAPHS):
            results += guarded_rows(BF16_GRAPHS, label, bf16_graphs)
        for name, fmt, fold, *graphs in variants:
            if keep(name):
                results += guarded_rows(name, label, functools.partial(adapter, name, fmt, fold, *graphs))
        return results + (stock_rows(int8_file, label, why_not, why_not is None, timed) if keep(STOCK) else [])

    results = merge_rounds([one_round() for _ in range(max(1, a.rounds))])
    add_speedups(results)
    return results


def work_files(a: argparse.Namespace, stem: str) -> tuple[Path, Path, Path]:
    """(the report folder, the bf16 model file, the int8 file converted from it), folders made: ``--out`` and
    ``--work`` (default ``OUT/work``)."""
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    return out_dir, work / f"{stem}_bf16.safetensors", work / f"{stem}_int8.safetensors"


def fast_steps(times: list[float]) -> float | None:
    """The lower quartile of step times (linear between neighbours: ``statistics.quantiles``' inclusive method),
    the step time a row's fast-quartile speed-up compares; None without steps."""
    if len(times) < 2:
        return times[0] if times else None
    return statistics.quantiles(times, n=4, method="inclusive")[0]


def add_speedups(results: list[Result]) -> None:
    """Fill each timed row's speed-up against the bf16 row of its resolution (the ratio every table reports), from
    the median step and from the fast quartile of steps (:func:`fast_steps`)."""
    bf16 = {r.resolution: r for r in results if r.variant == "bf16"}
    for r in results:
        base = bf16.get(r.resolution)
        if r.step_ms and base is not None and base.step_ms:
            r.speedup_vs_bf16 = base.step_ms / r.step_ms
        fast, fast_base = fast_steps(r.step_ms_all), fast_steps(base.step_ms_all) if base is not None else None
        if fast and fast_base:
            r.speedup_fast_vs_bf16 = fast_base / fast


def run_env(device: str, smoke: bool) -> dict[str, Any]:
    """The run's setting every report starts with (device name, versions, date, command line), to read it later."""
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": bool(smoke)}


def write_report(out_dir: Path, stem: str, env: dict[str, Any], results: list[Result],
                 markdown: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Write ``stem``.json, ``stem``.md (``markdown`` of the report) and ``stem``.png (the speed-ups as bars)
    under ``out_dir``; returns the report."""
    report = {"env": env, "results": [asdict(r) for r in results]}
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(report))
    plot_report(report, out_dir / f"{stem}.png")
    return report


def plot_report(report: dict[str, Any], png: Path) -> Path | None:
    """Each resolution's variants as bars of their speed-up over bf16 (PNG); without matplotlib, a line on stderr
    says why there is no picture (the json and md are written either way)."""
    from comfyquant.bench.plot import plot_bars
    from comfyquant.errors import UserError

    groups: dict[str, dict[str, float]] = {}
    for r in report["results"]:
        if r.get("speedup_vs_bf16"):
            res = r["resolution"]
            groups.setdefault(f"{res}²" if isinstance(res, int) else str(res), {})[r["variant"]] = r["speedup_vs_bf16"]
    env = report["env"]
    title = (f"{png.stem.replace('bench_', '')}: step time, x stock ComfyUI bf16 (same run; {env['device']}, "
             f"{env['date'][:10]})")
    try:
        return plot_bars(groups, png, title, xlabel="x bf16 step time (higher is faster)")
    except UserError as e:
        print(f"no plot: {e}", file=sys.stderr)
        return None


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the run's setup above it."""
    env = report["env"]
    return model_markdown(report, "Flux.1-dev-shaped model in ComfyUI: step time and peak VRAM",
                          f"{env['params_billion']:.2f} B parameters ({env['depth']} double + {env['depth_single']} "
                          f"single blocks, hidden {env['dims']['hidden']}, context {env['dims']['txt_tokens']} x "
                          f"{env['dims']['context']}); eager, batch 1")


def model_markdown(report: dict[str, Any], title: str, setup: str) -> str:
    """A model benchmark's report: ``title`` and the date, the device, ``setup`` (the model and the call), the timing
    the benches share (median steps after warm-up, pooled rounds), comfy-kitchen's state, the command and
    :func:`results_table`."""
    env = report["env"]
    rounds = env.get("rounds", 1)
    pooled = "" if rounds == 1 else f", pooled over {rounds} rounds of all variants"
    smoke = " SMOKE RUN: numbers mean nothing;" if env["smoke"] else ""
    lines = [f"# {title} ({env['date']})", "",
             f"Device: {env['device']}; torch {env['torch']};{smoke} {setup}; median of {env['iters']} steps after "
             f"{env['warmup']} warm-up{pooled}. comfy-kitchen CUDA: {env['comfy_kitchen_cuda']}.", "",
             f"Command: `{env['command']}`", "",
             "host ms / step: the step call's wall time until it returned, before the sync; near ms / step the step "
             "is host-bound, well under it GPU-bound.", "",
             "x bf16, fast quartile: each row's 25th-percentile step against bf16's (a noisy host's slow phases only "
             "add time, so this reads the steady speed while a quarter of the steps ran steady).", "",
             *results_table(report["results"])]
    return "\n".join(lines) + "\n"


def bench_main(argv: list[str] | None, parser: argparse.ArgumentParser, stem: Callable[[argparse.Namespace], str],
               run: Callable[[argparse.Namespace], Any]) -> int:
    """A model benchmark's command line: parse ``argv``, then draw a saved report's picture (``--plot-from``, into
    ``--out``/``stem(args)``.png) or ``run`` the benchmark."""
    a = parser.parse_args(argv)
    if not plot_only(a, stem(a)):
        run(a)
    return 0


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """The markdown table of a report's result rows (one line each, header first), shared by the model benches."""
    lines = ["| variant | resolution | ms / step | host ms / step | x bf16 | x bf16, fast quartile | peak VRAM GiB | "
             "weights GiB | rel err vs bf16 | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['resolution']} | {cell(r['step_ms'], '.2f')} | "
                     f"{cell(r.get('host_ms'), '.2f')} | "
                     f"{cell(r['speedup_vs_bf16'], '.2f')} | {cell(r.get('speedup_fast_vs_bf16'), '.2f')} | "
                     f"{cell(r['peak_vram_gib'], '.2f')} | "
                     f"{cell(r['weights_gib'], '.2f')} | {cell(r.get('rel_err_vs_bf16'), '.4f')} | {r['note']} |")
    return lines


def cell(v: float | None, spec: str) -> str:
    """A markdown table cell: ``v`` formatted, or "-" for a missing value."""
    return "-" if v is None else format(v, spec)


def common_args(p: argparse.ArgumentParser, json_name: str) -> None:
    """The arguments the ComfyUI benchmarks share: output and work folders, the ComfyUI cache, smoke mode."""
    p.add_argument("--out", required=True, help=f"folder for {json_name}.json / .md")
    p.add_argument("--work", default=None, help="folder for the generated model files (default OUT/work)")
    p.add_argument("--comfyui-cache", default=None, help="ComfyUI 0.30.0 cache folder (see comfyui_env)")
    p.add_argument("--smoke", action="store_true", help="tiny widths on the CPU, seconds: checks the mechanics")
    p.add_argument("--plot-from", default=None, help=f"only draw OUT/{json_name}.png from this saved json (or json.gz)")


def timing_args(p: argparse.ArgumentParser) -> None:
    """The timing arguments the model benchmarks share: warm-up and timed steps, pooled rounds, the loader."""
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="measure the whole variant list this many times, pooled")
    p.add_argument("--dynamic-vram", action="store_true",
                   help="keep ComfyUI's default dynamic-VRAM loader on the GPU (default: classic loader, full load)")


def plot_only(a: argparse.Namespace, stem: str) -> bool:
    """``--plot-from``: draw the saved report's picture into ``--out`` and say so; False when not asked."""
    if not a.plot_from:
        return False
    Path(a.out).mkdir(parents=True, exist_ok=True)
    print(plot_report(read_saved_json(a.plot_from), Path(a.out) / f"{stem}.png"))
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "bench_comfyui_flux")
    p.add_argument("--depth", type=int, default=6, help="double blocks (Flux.1-dev: 19)")
    p.add_argument("--depth-single", type=int, default=12, help="single blocks (Flux.1-dev: 38)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--graphs", action="store_true",
                   help="add the node's cuda_graphs option (bf16; int8 + cuDNN attention); all variants via apply_model")
    p.add_argument("--only", default="", help="comma-separated variant names to measure (default: all; bf16 always)")
    timing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line (or only draw a saved report's picture)."""
    return bench_main(argv, build_parser(), lambda a: "bench_comfyui_flux", run)


if __name__ == "__main__":
    sys.exit(main())
