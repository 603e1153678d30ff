"""Whole-model speed (GPU): stacks of real-width blocks (``bench.blocks``), bf16 vs quantized, eager and with
CUDA graphs.

Flux (2 double + 4 single blocks: Flux.1's 19:38 ratio) at 1024x1024 (4096 image + 512 text tokens) and 512x512
(1024 + 512); Flux.2 (1 double + 2 single blocks, 6144 wide, SwiGLU MLPs whose double-block activation module
folds into the down projection) at 1024x1024; Wan 2.x 14B (2 blocks) at 480p, 81 frames (32760 tokens); SDXL's
transformer stacks (4 blocks at 1280 wide / 1024 tokens, 2 at 640 / 4096 tokens, 77 text tokens); T5-XXL
encoder (4 layers, 256 tokens; ComfyUI's T5 module tree); a Qwen3-4B-shaped LLM text encoder (Z-Image's; 4 of
its 36 blocks, 256 tokens; ComfyUI's Llama module tree). Every ``nn.Linear`` is quantized through the product path (``quantize_``,
automatic per-layer backend); ``ck_int8`` swaps in comfy-kitchen's ``int8_linear`` on the same int8 weights.
Time = wall time per forward over back-to-back calls (host and GPU overlap as in ComfyUI), median of rounds in
which every variant of a model takes its turn (a drift of the host's speed during the run hits them alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from comfyquant.bench.blocks import T5, ClipL, Flux, Flux2, Gemma3, Qwen3, Sdxl, Wan, fold_modulation
from comfyquant.bench.timing import interleaved_ms
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels import dispatch
from comfyquant.runtime.norms import foldable_norms


def build(name: str) -> tuple[nn.Module, tuple]:
    """A fresh bf16 model and its inputs (batch 1), created and initialized on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        if name in ("flux_1024", "flux_512"):
            img = 4096 if name == "flux_1024" else 1024
            model, args = Flux(), (torch.randn(1, img, 3072), torch.randn(1, 512, 3072), torch.randn(1, 3072))
        elif name == "flux2_1024":
            model, args = Flux2(), (torch.randn(1, 4096, 6144), torch.randn(1, 512, 6144),
                                    torch.randn(1, 6 * 6144) * 0.1)
        elif name == "wan_480p":
            model, args = Wan(), (torch.randn(1, 32760, 5120), torch.randn(1, 512, 5120),
                                  torch.randn(1, 6, 5120) * 0.1)
        elif name == "sdxl_1024":
            model, args = Sdxl(), (torch.randn(1, 4096, 640), torch.randn(1, 1024, 1280), torch.randn(1, 77, 2048))
        elif name == "t5xxl_256":
            model, args = T5(), (torch.randn(1, 256, 4096),)
        elif name == "qwen3_4b_256":
            model, args = Qwen3(), (torch.randn(1, 256, 2560),)
        elif name == "gemma3_12b_256":
            model, args = Gemma3(), (torch.randn(1, 256, 3840),)
        elif name == "clip_l_77":
            model, args = ClipL(), (torch.randn(1, 77, 768),)
        else:
            raise ValueError(name)
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=mod.in_features**-0.5)
            elif getattr(mod, "add", False) is True:  # Gemma's 1 + weight norms: weights around 0
                nn.init.uniform_(mod.weight, -0.5, 0.5)
    return model.to(torch.bfloat16).eval(), tuple(a.to(torch.bfloat16) for a in args)


MODELS = ("flux_1024", "flux_512", "flux2_1024", "wan_480p", "sdxl_1024", "t5xxl_256", "qwen3_4b_256",
          "gemma3_12b_256", "clip_l_77")


class _SwapLinear(nn.Module):
    """comfy-kitchen's int8_linear on a layer's per-row int8 weight (bench only: the peer's kernel, same weights)."""

    def __init__(self, lin: nn.Linear, ck_fn: Callable) -> None:
        super().__init__()
        self.ck_fn = ck_fn
        self.bias = None if lin.bias is None else lin.bias.detach()
        self.q, self.s = quantize_rowwise(lin.weight.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ck_fn(x, self.q, self.s, self.bias, out_dtype=x.dtype)


class _WithAttention(nn.Module):
    """A model run inside ``runtime.attention.QuantizedAttention`` (its long self-attention on the int8 kernel)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> object:
        from comfyquant.runtime.attention import QuantizedAttention

        with QuantizedAttention():
            return self.model(*args)


def _swap(model: nn.Module, ck_fn: Callable) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, _SwapLinear(child, ck_fn))
        else:
            _swap(child, ck_fn)
    return model


def variants(name: str, ck_fn: Callable | None,
             only: tuple[str, ...] | None = None) -> Iterator[tuple[str, nn.Module, tuple]]:
    """(variant, model, args) for one model; each built fresh (``only``: just these variants)."""
    from comfyquant.runtime.quantize import QuantizeConfig, quantize_

    def want(v: str) -> bool:
        return only is None or v in only

    if want("bf16"):
        yield "bf16", *build(name)
    derived = {"int8": ("int8_measured", "int8_nofold", "int8_fused", "int8_modfold"), "fp8": ("fp8_modfold",)}
    for fmt in ("int8", "fp8"):
        if not (want(fmt) or any(want(v) for v in derived[fmt])):
            continue
        model, args = build(name)
        summary = quantize_(model, QuantizeConfig(format=fmt, min_features=1))
        if want(fmt):
            yield fmt, model, args
        if want(f"{fmt}_modfold") and name.startswith("flux"):  # the blocks' modulated norms in the quantizers
            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1))
            if fold_modulation(model):
                yield f"{fmt}_modfold", model, args
        if fmt == "int8" and want("int8_measured"):  # measured dispatch (every candidate timed once per shape)
            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1,
                                            backend=dispatch.DispatchPolicy(measure=True)))
            yield "int8_measured", model, args
        if fmt == "int8" and name == "wan_480p" and want("int8_attn"):  # the one model past min_tokens
            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1))
            yield "int8_attn", _WithAttention(model), args
        if fmt == "int8" and want("int8_fused"):  # sibling projections (q / k / v, wi_0 / wi_1) as one GEMM
            from comfyquant.runtime.siblings import fuse_sibling_projections

            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1))
            if fuse_sibling_projections(model):
                yield "int8_fused", model, args
        if fmt == "int8" and summary.folded and want("int8_nofold"):  # without folding the MLP's GELU
            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1, fold_activations=False))
            yield "int8_nofold", model, args
        if fmt == "int8" and any("->" in f for f in summary.folded):  # RMSNorms folded: the same without them
            for variant, fuse in (("int8_nonorm", False), ("int8_fused_nonorm", True)):
                if want(variant):
                    from comfyquant.runtime.siblings import fuse_sibling_projections

                    model, args = build(name)
                    quantize_(model, QuantizeConfig(format=fmt, min_features=1, fold_norms=False))
                    if not fuse or fuse_sibling_projections(model):
                        yield variant, model, args
    # the rotated formats through the product's path (QuantLinear, bound calls, eager plans): int8 convrot and
    # the W4A8 kernel (before 2026-12-04 the W4A8 variant called the kernel directly, without plans)
    # (int8-rot folds RMSNorms into its rotating quantizer since 2026-12-04: ``int8_rot_nonorm`` is without that)
    for variant, fmt, fold in (("int8_rot", "int8-rot", True), ("int8_rot_nonorm", "int8-rot", False),
                               ("int4_rot", "int4-rot", True)):
        if want(variant):
            model, args = build(name)
            quantize_(model, QuantizeConfig(format=fmt, min_features=1, fold_norms=fold))
            if fold or foldable_norms(model):  # the no-fold variant only where there are norms to fold
                yield variant, model, args
    if ck_fn is not None and want("ck_int8"):
        model, args = build(name)
        yield "ck_int8", _swap(model, ck_fn), args


def dispatch_counts(model: nn.Module) -> dict[str, int]:
    """``"backend planned|general|captured M=.."`` -> number of quantized layers, from each layer's bound memo
    (what the eager calls ran: the chosen backend per input signature and whether a plan replays it; "captured":
    the signature seen while a CUDA graph was captured, where plans never apply)."""
    from comfyquant.runtime.kernels.registry import kernel_kind, kinds
    from comfyquant.runtime.nn import QuantLinear, bound_linear

    names = {id(b): n for k in kinds() for n, b in kernel_kind(k).backends.items()}
    counts: dict[str, int] = {}
    for mod in model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        memo = getattr(bound_linear(mod.qweight, mod.bias), "memo", None)
        if memo is None:
            counts["unbound"] = counts.get("unbound", 0) + 1
            continue
        for sig, e in memo.items():
            m = 1
            for d in sig[0][:-1]:
                m *= int(d)
            how = "captured" if sig[3] else "planned" if callable(e[1]) else "general"  # sig[3]: CUDA graph capture
            key = f"{names.get(id(e[0]), '?')} {how} M={m}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def host_profile(fn: Callable[[], object], calls: int = 5, top: int = 14) -> str:
    """cProfile of ``calls`` eager forwards: the top functions by own time (where the host time goes)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()[-4000:]


def run_models(names: tuple[str, ...], ck_fn: Callable | None, deadline: float = float("inf")) -> list[dict]:
    """Eager wall ms per forward for every variant (and with ``cuda_graphs.capture`` for bf16/int8/fp8), all
    variants of a model timed in turns (:func:`interleaved_ms`), with ratios to the same rounds' bf16 (eager and
    graphs). Stops before a model once ``time.perf_counter()`` passes ``deadline``."""
    from comfyquant.runtime.cuda_graphs import capture

    rows: list[dict] = []
    for name in names:
        if time.perf_counter() > deadline:
            print(f"models: out of time before {name}", flush=True)
            return rows
        built = list(variants(name, ck_fn))
        fns: dict[str, Callable[[], object]] = {}
        graphs = {}
        for variant, model, args in built:
            fns[variant] = lambda m=model, a=args: m(*a)
            if variant in ("bf16", "int8", "fp8", "int8_fused"):
                graphs[variant] = capture(model)
                fns[variant + "@graphs"] = lambda g=graphs[variant], a=args: g(*a)
        times = interleaved_ms(fns)
        model_rows = []
        for variant, model, args in built:
            row: dict = {"model": name, "variant": variant}
            for key, fn_name in (("eager_ms", variant), ("graph_ms", variant + "@graphs")):
                t = times.get(fn_name)
                if isinstance(t, float):
                    row[key] = t
                elif t is not None:
                    row["error"] = t
            if variant in graphs:
                row["graphs"] = graphs[variant].graphs
            if variant in ("int8", "int8_measured", "fp8", "int8_fused") and "eager_ms" in row:
                row["dispatch"] = dispatch_counts(model)
                row["profile"] = host_profile(lambda m=model, a=args: m(*a))
            model_rows.append(row)
        base = model_rows[0]  # bf16
        for row in model_rows:
            for key in ("eager_ms", "graph_ms"):
                if key in row and key in base:
                    row[key.replace("_ms", "_x")] = base[key] / row[key]
            if "graph_ms" in row and "eager_ms" in base:
                row["graph_vs_bf16_eager_x"] = base["eager_ms"] / row["graph_ms"]
            print(row, flush=True)
        rows.extend(model_rows)
        del built, fns, graphs
        torch.cuda.empty_cache()
    return rows


def models_markdown(rows: list[dict]) -> str:
    """Table of :func:`run_models` rows."""
    def f(v: object) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| model | variant | eager ms | × bf16 eager | graphs ms | × bf16 graphs | graphs × bf16 eager |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {f(r.get('eager_ms'))} | {f(r.get('eager_x'))} | "
                     f"{f(r.get('graph_ms'))} | {f(r.get('graph_x'))} | {f(r.get('graph_vs_bf16_eager_x'))} |"
                     + (f" error: {r['error']}" if "error" in r else ""))
    return "\n".join(lines) + "\n"
