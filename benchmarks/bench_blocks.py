"""Whole-block figure (GPU): one Flux double block and one Wan 14B block at real width, bf16 vs W8A8 / FP8,
eager and ``torch.compile``: steady-state forward time (do_bench median) and peak memory.

The blocks are minimal re-implementations with the real layer shapes (joint attention through
``F.scaled_dot_product_attention``; RoPE omitted). Quantized variants go through the product path
``comfyquant.runtime.quantize_`` (QuantizedTensor weights in ``QuantLinear``) and, as a control, a plain
module calling ``kernels.dispatch`` directly (no tensor-subclass dispatch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels import dispatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=1e-6)


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class FluxStream(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(d, 6 * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = RMSNorm(d // heads), RMSNorm(d // heads)
        self.proj = nn.Linear(d, d)
        self.mlp0 = nn.Linear(d, 4 * d)
        self.mlp2 = nn.Linear(4 * d, d)


class FluxDoubleBlock(nn.Module):
    """Flux double-stream block: per-stream modulation, qkv, joint attention over txt+img, proj, MLP."""

    def __init__(self, d: int = 3072, heads: int = 24) -> None:
        super().__init__()
        self.img, self.txt = FluxStream(d, heads), FluxStream(d, heads)
        self.heads = heads

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = img.shape[0], self.heads
        qs, ks, vs, mods = [], [], [], []
        for s, x in ((self.txt, txt), (self.img, img)):
            m = s.mod(F.silu(vec))[:, None, :].chunk(6, dim=-1)
            mods.append(m)
            qkv = s.qkv((1 + m[1]) * _ln(x) + m[0]).view(b, x.shape[1], 3, h, -1).permute(2, 0, 3, 1, 4)
            qs.append(s.q_norm(qkv[0]))
            ks.append(s.k_norm(qkv[1]))
            vs.append(qkv[2])
        att = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        att = att.transpose(1, 2).reshape(b, -1, h * att.shape[-1])
        n_txt = txt.shape[1]
        outs = []
        for s, x, a, m in ((self.txt, txt, att[:, :n_txt], mods[0]), (self.img, img, att[:, n_txt:], mods[1])):
            x = x + m[2] * s.proj(a)
            x = x + m[5] * s.mlp2(F.gelu(s.mlp0((1 + m[4]) * _ln(x) + m[3]), approximate="tanh"))
            outs.append(x)
        return outs[1], outs[0]


class WanBlock(nn.Module):
    """Wan 2.x 14B block: modulated self-attention (q/k/v/o 5120), cross-attention to text, FFN 13824."""

    def __init__(self, d: int = 5120, heads: int = 40, ffn: int = 13824) -> None:
        super().__init__()
        self.heads = heads
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d), RMSNorm(d)
        self.cq, self.ck, self.cv, self.co = (nn.Linear(d, d) for _ in range(4))
        self.norm_cq, self.norm_ck = RMSNorm(d), RMSNorm(d)
        self.ffn0, self.ffn2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = (self.modulation.to(x.dtype) + e).chunk(6, dim=1)
        y = _ln(x) * (1 + m[1]) + m[0]
        q, k, v = self._heads(self.norm_q(self.q(y))), self._heads(self.norm_k(self.k(y))), self._heads(self.v(y))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.o(a) * m[2]
        y = _ln(x)
        q, k, v = self._heads(self.norm_cq(self.cq(y))), self._heads(self.norm_ck(self.ck(ctx))), self._heads(self.cv(ctx))
        x = x + self.co(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        y = _ln(x) * (1 + m[4]) + m[3]
        return x + self.ffn2(F.gelu(self.ffn0(y), approximate="tanh")) * m[5]


class DirectQuantLinear(nn.Module):
    """Control: int8 / fp8 weights as plain buffers, forward calls ``kernels.dispatch`` (no tensor subclass)."""

    def __init__(self, lin: nn.Linear, fmt: str) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        self.fmt = fmt
        q, s = quantize_rowwise(w) if fmt == "int8" else quantize_fp8(w)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("bias", lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "int8":
            return dispatch.int8_linear(x, self.q, self.s, self.bias)
        return dispatch.fp8_linear(x, self.q, self.s, self.bias)


def swap_direct(model: nn.Module, fmt: str) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, DirectQuantLinear(child, fmt))
        else:
            swap_direct(child, fmt)
    return model


def measure(model: nn.Module, args: tuple, compiled: bool) -> dict:
    fn = torch.compile(model) if compiled else model
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ms = triton.testing.do_bench(lambda: fn(*args), warmup=50, rep=300, return_mode="median")
    return {"ms": ms, "peak_gib": peak / 2**30, "weights_and_inputs_gib": base / 2**30}


def build(kind: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    dev = "cuda"
    if kind == "flux_double":
        blk = FluxDoubleBlock()
        args = (torch.randn(1, 4096, 3072), torch.randn(1, 512, 3072), torch.randn(1, 3072))
    else:
        blk = WanBlock()
        args = (torch.randn(1, 8192, 5120), torch.randn(1, 512, 5120), torch.randn(1, 6, 5120) * 0.1)
    for mod in blk.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=mod.in_features**-0.5)
    return blk.to(dev, torch.bfloat16), tuple(a.to(dev, torch.bfloat16) for a in args)


def variants(kind: str):
    """Yield (name, model, args); each model is built fresh so memory figures are per variant."""
    yield "bf16", *build(kind)
    for fmt, cfg_fmt in (("int8", "int8"), ("fp8", "fp8")):
        model, args = build(kind)
        yield f"{fmt} direct", swap_direct(model, fmt), args
        model, args = build(kind)
        from comfyquant.runtime.quantize import QuantizeConfig, quantize_

        quantize_(model, QuantizeConfig(format=cfg_fmt, min_features=1))
        yield f"{fmt} quantize_", model, args


def profile(kind: str, variant: str) -> None:
    """Kernel-time breakdown of one variant, eager and compiled (torch.profiler), to explain a regression."""
    for name, model, args in variants(kind):
        if name != variant:
            continue
        with torch.no_grad():
            ex = torch._dynamo.explain(model)(*args)
        print(f"graphs={ex.graph_count} graph_breaks={ex.graph_break_count}")
        for br in ex.break_reasons[:5]:
            print("  break:", str(br.reason)[:300])
        torch._dynamo.reset()
        for compiled in (False, True):
            fn = torch.compile(model) if compiled else model
            with torch.no_grad():
                for _ in range(5):
                    fn(*args)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn(*args)
                    torch.cuda.synchronize()
            print(f"=== {kind} {variant} compiled={compiled}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--blocks", default="flux_double,wan")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", default=None, help="block:variant to profile eager vs compiled (no tables)")
    a = p.parse_args()
    if a.profile:
        profile(*a.profile.split(":"))
        return
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for kind in a.blocks.split(","):
        for name, model, args in variants(kind):
            for compiled in (False,) if a.no_compile else (False, True):
                try:
                    r = measure(model, args, compiled)
                except Exception as e:  # recorded in the table (e.g. a compile failure), never hidden
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                row = {"block": kind, "variant": name, "compiled": compiled, **r}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            del model, args
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    lines = ["| block | variant | mode | ms | × bf16 (same mode) | peak GiB |", "|---|---|---|---|---|---|"]
    base = {(r["block"], r["compiled"]): r.get("ms") for r in results["rows"] if r["variant"] == "bf16"}
    for r in results["rows"]:
        mode = "compiled" if r["compiled"] else "eager"
        if "error" in r:
            lines.append(f"| {r['block']} | {r['variant']} | {mode} | error: {r['error']} | - | - |")
            continue
        b = base.get((r["block"], r["compiled"]))
        ratio = f"{b / r['ms']:.2f}" if b else "-"
        lines.append(f"| {r['block']} | {r['variant']} | {mode} | {r['ms']:.2f} | {ratio} | {r['peak_gib']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "blocks.json").write_text(json.dumps(results, indent=1))
        Path(a.out, "blocks.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
