"""Dynamic-LoRA overhead (GPU; ``--smoke`` runs tiny sizes on the CPU): a Flux-shaped double block, single Flux
linears and a Wan-shaped self-attention (also with its q / k / v fused: ``runtime.siblings``), quantized (``comfyquant.runtime.quantize_``), with 0, 1 and 3 dynamic LoRAs of rank 16-64 applied
through the product path (``comfyquant.lora.apply(..., mode="dynamic")`` on LoRA files), against the same
quantized model without LoRA and against bf16 ``nn.Linear`` in the same run.

Per variant: eager wall time per forward (``--iters`` forwards back to back, synchronized per round, median of 5
rounds: host and GPU overlapped as in a model) and, on CUDA, the GPU
time of one forward replayed from a CUDA graph (median over replays, CUDA events). Writes ``lora_bench.json``
and ``lora_bench.md`` under ``--out``. Target (docs/PERFORMANCE.md): < 15% over the no-LoRA quantized block for
one rank-32 LoRA at M = 4096.

    python benchmarks/bench_lora.py --out $OUT                 # H200: Flux block + linears, int8 and fp8
    python benchmarks/bench_lora.py --out /tmp/lb --smoke      # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

import comfyquant.lora as cql
from comfyquant.runtime.dispatch_report import describe_dispatch
from comfyquant.runtime.quantize import QuantizeConfig, quantize_
from comfyquant.runtime.siblings import fuse_sibling_projections


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class Stream(nn.Module):
    """One stream of a Flux double block: modulation, qkv, proj, MLP (real layer shapes at d = 3072)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mod = nn.Linear(d, 6 * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp0 = nn.Linear(d, 4 * d)
        self.mlp2 = nn.Linear(4 * d, d)


class FluxDoubleBlock(nn.Module):
    """Joint attention over txt + img tokens with per-stream weights (RMS QK-norm and RoPE left out)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.img, self.txt = Stream(d), Stream(d)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = img.shape[0], self.heads
        qs, ks, vs, mods = [], [], [], []
        for s, x in ((self.txt, txt), (self.img, img)):
            m = s.mod(F.silu(vec))[:, None, :].chunk(6, dim=-1)
            mods.append(m)
            qkv = s.qkv((1 + m[1]) * _ln(x) + m[0]).view(b, x.shape[1], 3, h, -1).permute(2, 0, 3, 1, 4)
            qs.append(qkv[0])
            ks.append(qkv[1])
            vs.append(qkv[2])
        att = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        att = att.transpose(1, 2).reshape(b, -1, h * att.shape[-1])
        n_txt, outs = txt.shape[1], []
        for s, x, a, m in ((self.txt, txt, att[:, :n_txt], mods[0]), (self.img, img, att[:, n_txt:], mods[1])):
            x = x + m[2] * s.proj(a)
            x = x + m[5] * s.mlp2(F.gelu(s.mlp0((1 + m[4]) * _ln(x) + m[3]), approximate="tanh"))
            outs.append(x)
        return outs[1], outs[0]


class SelfAttention(nn.Module):
    """Self-attention with separate q / k / v / o projections (Wan's, SD's attn1, T5's layout): sibling
    projections that ``fuse_sibling_projections`` runs as one GEMM, their LoRAs as one low-rank term."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape[0], x.shape[1], self.heads
        q, k, v = (p(x).view(b, t, h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class OneLinear(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def write_lora(model: nn.Module, rank: int, seed: int, folder: Path) -> Path:
    """A LoRA file (PEFT names = the model's own layer names) on every linear layer of ``model``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            sd[f"{name}.lora_A.weight"] = (torch.randn(rank, mod.in_features, generator=g) * 0.02).to(torch.bfloat16)
            sd[f"{name}.lora_B.weight"] = (torch.randn(mod.out_features, rank, generator=g) * 0.02).to(torch.bfloat16)
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    path = folder / f"lora_r{rank}_s{seed}.safetensors"
    save_file(sd, str(path))
    return path


def eager_ms(fn: Callable[[], object], iters: int, device: torch.device, rounds: int = 5) -> float:
    """Wall time per call in ms, as a model's layers run: ``iters`` calls back to back (the host queues the next
    call's launches while the GPU runs the last), synchronized once per round; the median over ``rounds``.
    Synchronizing around every single call (the earlier timing) added each call's whole host time to its GPU
    time, which no model sees, and swung 0.32-0.42 ms on one row (run 28)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], iters: int) -> float:
    """Median GPU time of one replay of a CUDA graph holding one call, in ms (CUDA events)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times)


def workloads(smoke: bool, m: int) -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    d, heads, txt = (256, 2, 16) if smoke else (3072, 24, 512)
    m = 64 if smoke else m
    g = torch.Generator().manual_seed(0)
    out: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
        (f"flux double block d={d} img={m} txt={txt}", FluxDoubleBlock(d, heads),
         (torch.randn(1, m, d, generator=g), torch.randn(1, txt, d, generator=g), torch.randn(1, d, generator=g)))]
    for name, k, n in (("flux qkv", d, 3 * d), ("flux mlp0", d, 4 * d), ("flux proj", d, d)):
        out.append((f"{name} {k}->{n} M={m}", OneLinear(k, n), (torch.randn(1, m, k, generator=g),)))
    wd, wheads = (256, 2) if smoke else (5120, 40)
    out.append((f"{SIBLINGS} d={wd} M={m}", SelfAttention(wd, wheads), (torch.randn(1, m, wd, generator=g),)))
    return out


SIBLINGS = "wan self-attention q/k/v/o"  # the workload also timed with its q / k / v fused (runtime.siblings)


def run(args: argparse.Namespace) -> list[dict]:
    """Every workload's rows; the LoRA files it writes live in a temporary folder removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as folder:
        return _run(args, Path(folder))


def _run(args: argparse.Namespace, tmp: Path) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for wname, model, inputs in workloads(args.smoke, args.m):
        if not wname.startswith(args.only):
            continue
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
        ref = model.to(device, dtype).eval()
        xs = tuple(x.to(device, dtype) for x in inputs)
        files = {(r, i): write_lora(ref, r, 10 * r + i, tmp) for r in args.ranks for i in range(max(args.counts))}

        def timed(mdl: nn.Module, xs: tuple[torch.Tensor, ...] = xs) -> tuple[float, float | None]:
            with torch.inference_mode():
                def call() -> object:
                    return mdl(*xs)

                call()
                eager = eager_ms(call, args.iters, device)
                graph = graph_ms(call, args.iters) if device.type == "cuda" and not args.no_graph else None
            return eager, graph

        bf16 = timed(ref)
        for fmt, fused in ((f, u) for f in args.formats for u in ((False, True) if wname.startswith(SIBLINGS)
                                                                   else (False,))):
            q = copy.deepcopy(ref)
            quantize_(q, QuantizeConfig(format=fmt, min_features=1))
            groups = fuse_sibling_projections(q) if fused else []
            if fused and not groups:
                raise RuntimeError(f"{wname}: no sibling projections to fuse")
            base = timed(q)
            for rank in args.ranks:
                for count in args.counts:
                    handles = [cql.apply(q, files[(rank, i)], 1.0, "dynamic") for i in range(count)]
                    t = timed(q) if count else base
                    backends = backends_used(q, xs)
                    for h in handles:
                        cql.remove(q, h)
                    row = {"workload": wname + (" (q/k/v fused)" if fused else ""), "format": fmt, "rank": rank,
                           "loras": count, "eager_ms": t[0], "graph_ms": t[1], "quant_eager_ms": base[0],
                           "quant_graph_ms": base[1], "bf16_eager_ms": bf16[0], "bf16_graph_ms": bf16[1],
                           "backends": backends, "fused_groups": groups}
                    rows.append(row)
                    print(_line(row), flush=True)
            del q
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def backends_used(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """How many of ``model``'s quantized linear calls run on each kernel backend (the eager choice, LoRA low-rank
    terms included: with one, fp8 layers should be on the fusing ``triton`` GEMM, not ``scaled_mm``)."""
    rows = describe_dispatch(model, *xs)
    return dict(sorted(Counter(r.backend for r in rows).items()))


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or a == 0 else f"{b / a:.3f}"


def _line(r: dict) -> str:
    return (f"{r['workload']:<40} {r['format']:<5} r={r['rank']:<3} x{r['loras']} eager {r['eager_ms']:.3f} ms "
            f"(no-LoRA/this {_ratio(r['eager_ms'], r['quant_eager_ms'])}, bf16/this "
            f"{_ratio(r['eager_ms'], r['bf16_eager_ms'])}) graph {r['graph_ms'] or '-'} ms "
            f"(no-LoRA/this {_ratio(r['graph_ms'], r['quant_graph_ms'])}) backends {r['backends']}")


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "Overhead = this / (quantized, no LoRA) - 1. Speed-up vs bf16 = bf16 time / this time.", "",
             "| workload | format | LoRAs x rank | eager ms | eager overhead | eager vs bf16 | graph ms | "
             "graph overhead | graph vs bf16 | backends (eager choice) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["loras"] == 0 and r["rank"] != rows[0]["rank"]:
            continue  # the no-LoRA row is the same for every rank

        def over(t: float | None, base: float | None) -> str:
            return "-" if t is None or base is None else f"{(t / base - 1) * 100:+.1f}%"

        g = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
        lines.append(f"| {r['workload']} | {r['format']} | {r['loras']} x {r['rank'] if r['loras'] else '-'} | "
                     f"{r['eager_ms']:.3f} | {over(r['eager_ms'], r['quant_eager_ms'])} | "
                     f"{_ratio(r['eager_ms'], r['bf16_eager_ms'])} | {g} | {over(r['graph_ms'], r['quant_graph_ms'])} | "
                     f"{_ratio(r['graph_ms'], r['bf16_graph_ms'])} | "
                     f"{', '.join(f'{b} x{c}' for b, c in r['backends'].items())} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--m", type=int, default=4096, help="image tokens (rows of the activations)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 3])
    p.add_argument("--formats", nargs="+", default=["int8", "fp8"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timing")
    p.add_argument("--only", default="", help="time only the workloads whose name starts with this")
    args = p.parse_args(argv)
    if args.smoke:
        args.iters = min(args.iters, 3)
        args.formats = args.formats[:1] if args.device == "cpu" else args.formats
    if 0 not in args.counts:
        args.counts = [0, *args.counts]
    start = time.time()
    rows = run(args)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "seconds": round(time.time() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "lora_bench.md").write_text(to_markdown(rows, f"# dynamic LoRA overhead ({meta['device']}, "
                                                              f"{meta['date']}, torch {meta['torch']})"))
    print(f"wrote {args.out / 'lora_bench.json'} and lora_bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
