"""Where the SDXL UNet's step time goes in ComfyUI's class with the transformer blocks' LayerNorms folded, against
the same adapter without the fold: torch's profiler over a few eager steps of each (ops by count and by device
time, host-to-device syncs), and how often the fold re-derived its norm rows or added dispatch memo entries.

Run 86 (H200, 2026-12-05) timed the folded int8 adapter at 0.73x bf16 against 0.94x without the fold (+20 ms a
step, ~95 µs per folded norm); this says which ops, syncs or re-derivations carry that. Run 87 found the step
host-bound (90 ms of host per 41 ms of GPU), so each variant, bf16 too, also gets its host time a step (the
forward's wall time without a sync, the GPU keeping up) and Python's own profile (cProfile: which of our functions
and ComfyUI's take the host time, by self time). Writes ``--out``/profile_comfyui_sdxl.txt and .json.
``--smoke``: the tiny UNet on the CPU. ``--family flux``: ComfyUI's Flux class instead (6 double + 12 single
blocks of Flux.1-dev's widths at 1024², bf16 against the adapter's int8 with its defaults): where the step time
goes besides the GEMMs (RoPE, the q / k norms, the joins of the two streams), which the bench's own Flux class
leaves out. Writes ``profile_comfyui_flux.txt`` / ``.json`` then. ``--family qwen_image``: ComfyUI's Qwen-Image
class (8 blocks at 1024², as ``bench_comfyui_dit.py``), the adapter's int8 defaults (its fused q / k norms and
RoPE) against the stock ops (``fuse_rope=False``). Run 110's profile found the fused path running its torch
fallback: the kernel refused the bf16 rotations Qwen-Image's forward passes.

    python benchmarks/profile_comfyui_sdxl.py --out prof_sdxl [--smoke] [--family flux|qwen_image]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import FULL, _free, _import_comfy, _inputs, flux_state_dict, wanted, work_files
from bench_comfyui_flux import SMOKE as FLUX_SMOKE
from bench_comfyui_sdxl import SDXL, SMOKE, _smoke_patcher, sdxl_inputs, sdxl_state_dict

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "aten::is_nonzero")


def _bound_calls(dm: torch.nn.Module) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(weight, bound call)`` once per bound call of ``dm``'s quantized weights, fused sibling weights included."""
    seen: set[int] = set()
    for m in dm.modules():
        for p in m.__dict__.get("_parameters", {}).values():
            for w in (p, getattr(getattr(p, "_comfyquant_fused", None), "weight", None)):
                bound = getattr(w, "_comfyquant_bound", None)
                if bound is not None and id(bound) not in seen:
                    seen.add(id(bound))
                    yield w, bound[1]


def _memo_entries(dm: torch.nn.Module) -> int:
    """Entries of every quantized weight's bound-call memo (one per call signature: a growing count is a key
    that changes from call to call)."""
    return sum(len(getattr(call, "memo", {})) for _, call in _bound_calls(dm))


def memo_backends(dm: torch.nn.Module) -> dict[str, int]:
    """``"backend NxK M=rows" -> layers`` over every quantized weight's bound-call memo (``dense_copy`` for a layer
    on its 16-bit copy): which path each layer's signatures run, by shape (the dispatch report asks the chooser
    again; this reads what the calls memoized)."""
    from comfyquant.runtime.kernels import dense_copy
    from comfyquant.runtime.kernels.registry import kernel_kind, kinds

    names = {id(b): name for kind in kinds() for name, b in kernel_kind(kind).backends.items()}
    names.update({id(b): dense_copy.NAME for b in dense_copy._BACKENDS.values()})
    tally: dict[str, int] = {}
    for w, call in _bound_calls(dm):
        for sig, e in getattr(call, "memo", {}).items():
            shape = sig[0]
            key = f"{names.get(id(e[0]), '?')} {int(w.shape[0])}x{int(shape[-1])} M={shape.numel() // shape[-1]}" + (
                "" if e[1] else " (no plan)")
            tally[key] = tally.get(key, 0) + 1
    return dict(sorted(tally.items()))


def host_profile(dm: torch.nn.Module, inputs: dict, opts: dict, device: str, steps: int) -> dict[str, Any]:
    """Host time a step (the forward's wall time, no sync inside; GPU-bound steps would show the GPU's time) and
    with a sync, then Python's profile over ``steps`` more steps: the top functions by self time, a step's share."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    host, wall = [], []
    with torch.inference_mode():
        for _ in range(max(3, steps)):
            sync()
            t0 = time.perf_counter()
            dm(**inputs, transformer_options=opts)
            t1 = time.perf_counter()
            sync()
            host.append((t1 - t0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            dm(**inputs, transformer_options=opts)
        prof.disable()
        sync()
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, fn), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(Path(path).parts[-2:]) if path != "~" else ""
        rows.append({"function": f"{short}:{line}({fn})" if short else fn, "calls": calls // steps,
                     "self_ms": tt * 1e3 / steps, "cum_ms": ct * 1e3 / steps})
    rows.sort(key=lambda r: -r["self_ms"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
    return {"host_ms": sorted(host)[len(host) // 2], "wall_ms": sorted(wall)[len(wall) // 2],
            "cprofile_top": rows[:40], "cprofile_ms": sum(r["self_ms"] for r in rows), "cprofile_text": buf.getvalue()}


def profile(name: str, patcher: Any, inputs: dict, device: str, steps: int, budget: Any = None) -> dict[str, Any]:
    """Warm-up steps, then ``steps`` profiled ones: the top ops by device and by host time, sync counts, which
    backend each layer's memo holds, and the dense copies' budget (``budget``, the variant's ``CopyBudget``)."""
    import comfy.model_management
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from comfyquant.runtime import nn as rnn

    derived = {"n": 0}
    original = rnn.NormSource._derive

    def counting(self: Any, w: Any, b: Any) -> Any:
        derived["n"] += 1
        return original(self, w, b)

    rnn.NormSource._derive = counting  # type: ignore[method-assign]
    try:
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        dm = patcher.model.diffusion_model
        opts = patcher.model_options.get("transformer_options", {})
        with torch.inference_mode():
            for _ in range(3):
                dm(**inputs, transformer_options=opts)
            if device == "cuda":
                torch.cuda.synchronize()
            memo0, derived0 = _memo_entries(dm), derived["n"]
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with torch_profile(activities=acts) as prof:
                for _ in range(steps):
                    dm(**inputs, transformer_options=opts)
                if device == "cuda":
                    torch.cuda.synchronize()
            memo1, derived1 = _memo_entries(dm), derived["n"]
            backends = memo_backends(dm)
        hosted = host_profile(dm, inputs, opts, device, steps)
    finally:
        rnn.NormSource._derive = original  # type: ignore[method-assign]
    events = prof.key_averages()
    dev_attr = "device_time_total" if device == "cuda" else "cpu_time_total"
    # kernel: a device-side event (a CUDA kernel, memcpy, memset). An aten op's device time is its kernels', which
    # appear as events of their own, while a Triton launch has no aten op: summing every row counted cuBLAS-heavy
    # variants twice (run 122: bf16 "90 ms" a step of ~45), so the device total sums the kernels only
    from torch.autograd import DeviceType

    rows = [{"op": e.key, "count": e.count // steps, "host_us": e.self_cpu_time_total / steps,
             "device_us": (getattr(e, "self_device_time_total", 0.0) if device == "cuda"
                           else e.self_cpu_time_total) / steps,
             "kernel": device == "cuda" and getattr(e, "device_type", None) == DeviceType.CUDA} for e in events]
    by_device = sorted(rows, key=lambda r: -r["device_us"])[:25]
    by_count = sorted(rows, key=lambda r: -r["count"])[:25]
    syncs = {r["op"]: r["count"] for r in rows if r["op"] in SYNC_OPS}
    table = events.table(sort_by=f"self_{dev_attr}" if device == "cuda" else "self_cpu_time_total", row_limit=30)
    return {"variant": name, "memo_entries_after_warmup": memo0, "memo_entries_added_while_profiled": memo1 - memo0,
            "memo_backends": backends, "copy_budget": None if budget is None else budget.summary(),
            "norm_rows_derived_while_profiled": derived1 - derived0, "norm_rows_derived_in_warmup": derived0,
            "syncs_per_step": syncs,
            "device_total_us": sum(r["device_us"] for r in rows if r["kernel"] or device != "cuda"),
            "top_by_device": by_device, "top_by_count": by_count, "table": table,
            **hosted}


def _sdxl(a: argparse.Namespace, device: str, dtype: torch.dtype, src: Path) -> tuple[Any, dict, list]:
    """(bf16 patcher, inputs, [(variant, settings)]) of the SDXL UNet: the fold against norms in torch, and the
    node's default attention (``auto``) against ``sdpa`` (runs 104 / 105 / 110 timed them apart by more than the
    host's noise, either way)."""
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.nodes.attention import DEFAULT_MODE
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    config = SMOKE if a.smoke else SDXL
    sd = sdxl_state_dict(config)
    if a.smoke:
        base = _smoke_patcher(sd)
    else:
        save_file(sd, str(src))
        base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    variants = [(name, AdapterSettings(format="int8", model_type="sdxl", runtime=RuntimeOptions(
                    fold_norms=fold, fold_layer_norms=fold, attention=attention)))
                for name, fold, attention in (("adapter int8", True, DEFAULT_MODE),
                                              ("adapter int8 (norms in torch)", False, DEFAULT_MODE),
                                              ("adapter int8 + attention sdpa", True, "sdpa"))]
    # dense copies of the layers the cost model puts over bf16 (runtime.kernels.dense_copy): 4% slower than the
    # defaults in SDXL's step (run 120) where the sweep times those layers faster alone (run 122: less GPU time,
    # more host time in a host-bound step)
    variants.append(("adapter int8 + dense_copy_mb", AdapterSettings(format="int8", model_type="sdxl",
                                                                     runtime=RuntimeOptions(dense_copy_mb=8192))))
    return base, sdxl_inputs(config, 64 if a.smoke else 1024, device, dtype), variants


def _flux(a: argparse.Namespace, device: str, dtype: torch.dtype, src: Path) -> tuple[Any, dict, list]:
    """(bf16 patcher, inputs, [(variant, settings)]) of ComfyUI's Flux class: the adapter's int8 defaults."""
    import comfy.sd
    from safetensors.torch import save_file

    from comfyquant.nodes.settings import AdapterSettings

    dims = FLUX_SMOKE if a.smoke else FULL
    save_file(flux_state_dict(dims, 1 if a.smoke else 6, 1 if a.smoke else 12), str(src))
    base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    inputs = _inputs(dims, 64 if a.smoke else 1024, device, dtype)
    return base, inputs, [("adapter int8", AdapterSettings(format="int8", model_type="flux"))]


def _qwen(a: argparse.Namespace, device: str, dtype: torch.dtype, src: Path) -> tuple[Any, dict, list]:
    """(bf16 patcher, inputs, [(variant, settings)]) of ComfyUI's Qwen-Image class: the int8 defaults against the
    fused attention."""
    import comfy.sd
    from bench_comfyui_dit import FAMILIES, family_config, family_inputs, family_state_dict
    from bench_comfyui_dit import _smoke_patcher as dit_smoke_patcher
    from safetensors.torch import save_file

    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    fam = FAMILIES["qwen_image"]
    config = family_config(fam, 2 if a.smoke else 8, a.smoke)
    sd = family_state_dict(fam, config)
    if a.smoke:
        base = dit_smoke_patcher(fam, config, {k: v.float() for k, v in sd.items()})
    else:
        save_file(sd, str(src))
        base = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": dtype})
    variants = [(name, AdapterSettings(format="int8", model_type=fam.preset, runtime=RuntimeOptions(fuse_rope=rope)))
                for name, rope in (("adapter int8", True), ("adapter int8 (stock RoPE)", False))]
    return base, family_inputs(fam, a.smoke, 64 if a.smoke else 1024, device, dtype), variants


FAMILY_MODELS = {"sdxl": _sdxl, "flux": _flux, "qwen_image": _qwen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None)
    p.add_argument("--comfyui-cache", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--family", choices=tuple(FAMILY_MODELS), default="sdxl")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated adapter variants to profile (default: all; bf16 always)")
    a = p.parse_args(argv)
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    _import_comfy(a.comfyui_cache, device, False)
    from comfyquant.nodes.adapter import adapt_model

    stem = f"profile_comfyui_{a.family}"
    out_dir, src, _ = work_files(a, f"{a.family}_model")
    base, inputs, variants = FAMILY_MODELS[a.family](a, device, dtype, src)
    want = wanted(a.only)
    results = [profile("bf16", base, inputs, device, a.steps)]
    for name, settings in variants:
        if not want(name):
            continue
        _free(device)
        patched, _ = adapt_model(base, settings)
        results.append(profile(name, patched, inputs, device, a.steps, settings.runtime.copy_budget))
        patched = None
    text = []
    for r in results:
        text += [f"== {r['variant']}: memo entries {r['memo_entries_after_warmup']} (+{r['memo_entries_added_while_profiled']}"
                 f" while profiled), norm rows derived {r['norm_rows_derived_in_warmup']} in warm-up, "
                 f"{r['norm_rows_derived_while_profiled']} while profiled; syncs per step {r['syncs_per_step']}; "
                 f"host {r['host_ms']:.1f} ms a step, with a sync {r['wall_ms']:.1f} ms, device "
                 f"{r['device_total_us'] / 1e3:.1f} ms",
                 "-- memo backends (layers): " + "; ".join(f"{k}: {v}" for k, v in r["memo_backends"].items()),
                 r.pop("table"), "", f"-- Python's profile ({r['variant']}, per {a.steps} steps)",
                 r.pop("cprofile_text"), ""]
    Path(out_dir, f"{stem}.txt").write_text("\n".join(text))
    Path(out_dir, f"{stem}.json").write_text(json.dumps({"device": device, "family": a.family, "results": results},
                                                        indent=1))
    print("\n".join(line for line in text if line.startswith("==")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
