"""The warp-specialized Gluon W8A8 GEMM (``kernels.gluon_gemm``) against the Triton kernel the runtime picks today,
cuBLAS bf16, cuBLASLt int8 (``torch._int_mm``) and cuBLAS fp8 (``torch._scaled_mm``), GEMM alone, on the Flux and
Wan 14B linear shapes at M >= 1024 (GPU time by ``triton.testing.do_bench``, which clears L2 between runs;
median). Accuracy first: every Gluon variant is compared bit for bit with the Triton kernel's output (same
epilogue arithmetic) and with a float64 reference.

    python benchmarks/bench_gemm_ws.py --out results/   # an H100/H200 with triton >= 3.6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

SHAPES = {  # (model, layer): (K, N)
    ("flux", "qkv"): (3072, 9216), ("flux", "proj"): (3072, 3072), ("flux", "mlp0"): (3072, 12288),
    ("flux", "mlp2"): (12288, 3072), ("flux", "linear1"): (3072, 21504), ("flux", "linear2"): (15360, 3072),
    ("wan14b", "attn"): (5120, 5120), ("wan14b", "ffn0"): (5120, 13824), ("wan14b", "ffn2"): (13824, 5120),
}
# narrower layers: SDXL / CLIP / T5 widths (run 29 timed them: ``configs.ws_shape``)
NARROW = {
    ("sdxl", "attn"): (1280, 1280), ("sdxl", "ff0"): (1280, 10240), ("sdxl", "ff2"): (5120, 1280),
    ("sdxl", "attn640"): (640, 640), ("clip_l", "mlp0"): (768, 3072), ("clip_l", "mlp2"): (3072, 768),
    ("t5xxl", "ffn0"): (4096, 10240), ("t5xxl", "ffn2"): (10240, 4096),
}
GLUON = {"ws 128x256 s3": dict(block_n=256, stages=3), "ws 128x128 s4": dict(block_n=128, stages=4),
         "ws 128x128 s5": dict(block_n=128, stages=5)}
# where a 128x128 grid has few tiles per SM (below 1,024 rows, or under two waves of them at any row count),
# narrower column tiles are the candidate (configs.ws_config)
SMALL_M = {"ws 128x64 s6": dict(block_n=64, stages=6), "ws 128x64 s8": dict(block_n=64, stages=8)}
EXPERIMENTAL = {"ws pingpong 128x128 s4": dict(block_n=128, stages=4, pingpong=True)}  # with --experimental


def n64_candidate(m: int, n: int, sms: int) -> bool:
    """Whether 128x64 tiles are timed on ``[m, *] x [*, n]``: below 1,024 rows (where ``configs.ws_config`` may
    pick them), or where 128x128 tiles fill under two waves of ``sms`` (1,024 rows and more: one partial wave idles
    SMs, as below 1,024 rows, where 128x64 won by up to 1.7x; untimed there so far)."""
    return m < 1024 or -(-m // 128) * -(-n // 128) < 2 * sms


def _bench(fn, reps: int, graph: bool = False) -> float:
    """µs per call: ``do_bench`` (L2 cleared between calls; a call shorter than its host time measures the host),
    or with ``graph`` the GPU time of calls replayed from a CUDA graph (no host time; L2 not cleared)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")) * 1e3
    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")) * 1e3  # µs


def _error(e: Exception) -> dict:
    """A variant that failed to compile or run: reported in the checks, left out of the timing."""
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _compare(got: torch.Tensor, want: torch.Tensor, ref: torch.Tensor, r: int) -> dict:
    """A Gluon output against the Triton kernel's (bit equality, largest difference) and the float64 reference
    of its first ``r`` rows."""
    return {"bit_equal_to_triton": bool(torch.equal(got, want)),
            "max_abs_diff": float((got.float() - want.float()).abs().max()),
            "rel_err_f64": float((got[:r].double() - ref).norm() / ref.norm())}


def run_shape(m: int, k: int, n: int, reps: int, experimental: bool = False, graph: bool = False) -> dict:
    """Check and time every variant on one ``[M, K] x [N, K]^T`` problem (``experimental``: also the Gluon
    kernel's variants the runtime does not pick: ping-pong, fp8 operands, a LoRA term in the epilogue)."""
    from comfyquant.runtime.kernels.configs import fit_stages, gemm_config, hopper_w8a8_config
    from comfyquant.runtime.kernels.gluon_gemm import gluon_w8a8
    from comfyquant.runtime.kernels.triton_int8 import _low_rank_args, gemm_w8a8, int8_linear

    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s_x = torch.rand(m, device=dev) * 1e-2 + 1e-3
    s_w = torch.rand(n, device=dev) * 1e-3 + 1e-4
    r = min(m, 512)  # float64 reference on the first rows (bit equality with the Triton kernel covers all)
    ref = ((q[:r].double() @ w_q.double().T) * s_x[:r].double()[:, None] * s_w.double()[None, :] + bias.double())
    # the Triton kernel the runtime picked before the Gluon kernel (run 23's "today"; the persistent tile included)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    gluon = {**GLUON, **(SMALL_M if n64_candidate(m, n, sms) else {}), **(EXPERIMENTAL if experimental else {})}
    tri_cfg = fit_stages(hopper_w8a8_config(gemm_config(m, n, k, sms, hopper=True)), 1, 1)
    per_tile = dataclasses.replace(tri_cfg, persistent=0)  # the Triton kernels with an fp8 or low-rank term
    base = gemm_w8a8(q, s_x, w_q, s_w, bias, torch.bfloat16, cfg=tri_cfg)
    row: dict = {"M": m, "K": k, "N": n, "checks": {"triton": float((base[:r].double() - ref).norm() / ref.norm())},
                 "us": {}}
    fp8_x, fp8_w = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sx8, sw8 = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    variants = {
        "bf16": lambda: torch.nn.functional.linear(x, w, bias),
        "triton (today)": lambda: gemm_w8a8(q, s_x, w_q, s_w, bias, torch.bfloat16, cfg=tri_cfg),
        # the whole W8A8 layer on bf16 x: activation quantization, then the GEMM the runtime picks
        "layer int8 (quant + picked GEMM)": lambda: int8_linear(x, w_q, s_w, bias, None, torch.bfloat16),
        "cublas int8 (_int_mm, raw)": lambda: torch._int_mm(q, w_q.T),
        "cublas fp8 (_scaled_mm rowwise)": lambda: torch._scaled_mm(fp8_x, fp8_w.T, sx8, sw8, bias=bias,
                                                                   out_dtype=torch.bfloat16),
    }
    for name, kw in gluon.items():
        try:
            out = gluon_w8a8(q, s_x, w_q, s_w, bias, **kw)
            torch.cuda.synchronize()
            row["checks"][name] = _compare(out, base, ref, r)
            variants[name] = (lambda kw=kw: gluon_w8a8(q, s_x, w_q, s_w, bias, **kw))
        except Exception as e:
            row["checks"][name] = _error(e)
    if experimental:
        # the Gluon kernel on the same fp8 operands: against the Triton fp8 GEMM (same promotion every K step)
        ones_n = torch.ones(n, device=dev)
        try:
            tri8 = gemm_w8a8(fp8_x, sx8, fp8_w, ones_n, bias, torch.bfloat16, cfg=per_tile)
            ref8 = fp8_x[:r].double() @ fp8_w.double().T + bias.double()
            g8 = gluon_w8a8(fp8_x, sx8, fp8_w, ones_n, bias, block_n=128, stages=5)
            row["checks"]["ws fp8 128x128 s5"] = {
                **_compare(g8, tri8, ref8, r), "triton_rel_err_f64": float((tri8[:r].double() - ref8).norm()
                                                                           / ref8.norm())}
            variants["ws fp8 128x128 s5"] = lambda: gluon_w8a8(fp8_x, sx8, fp8_w, ones_n, bias, block_n=128,
                                                               stages=5)
        except Exception as e:
            row["checks"]["ws fp8 128x128 s5"] = _error(e)
        # a rank-32 LoRA's term in the epilogue: the Triton kernel's (today's path) and the Gluon one
        down = (torch.randn(32, k, device=dev) * 0.05).bfloat16()
        up = (torch.randn(32, n, device=dev) * 0.05).bfloat16()
        lr = _low_rank_args((down, up), x, s_w)
        h = lr[0][0]
        lr_want = gemm_w8a8(q, s_x, w_q, s_w, bias, torch.bfloat16, cfg=per_tile, lr=lr)
        try:
            lr_got = gluon_w8a8(q, s_x, w_q, s_w, bias, block_n=128, stages=5, low_rank=(h, up))
            row["checks"]["ws + lora r32"] = {
                "max_abs_diff_vs_triton": float((lr_got.float() - lr_want.float()).abs().max()),
                "bit_equal_to_triton": bool(torch.equal(lr_got, lr_want))}
            variants["ws + lora r32"] = lambda: gluon_w8a8(q, s_x, w_q, s_w, bias, block_n=128, stages=5,
                                                           low_rank=(h, up))
        except Exception as e:
            row["checks"]["ws + lora r32"] = _error(e)
        variants["triton + lora r32"] = lambda: gemm_w8a8(q, s_x, w_q, s_w, bias, torch.bfloat16, cfg=per_tile,
                                                          lr=lr)
        # the whole fp8 layer on bf16 x (per-row fp8 activations, then the GEMM): the runtime's Triton-kernel path
        # (the Gluon kernel where ws_shape takes the shape, configs.WS_FP8) against the same pass + cuBLAS fp8
        from comfyquant.runtime.kernels.fp8 import fp8_linear_scaled_mm
        from comfyquant.runtime.kernels.triton_int8 import fp8_linear

        variants["layer fp8 (quant + picked GEMM)"] = lambda: fp8_linear(x, fp8_w, s_w, bias, None, torch.bfloat16)
        variants["layer fp8 (quant + cuBLAS)"] = lambda: fp8_linear_scaled_mm(x, fp8_w, s_w, bias, None,
                                                                              torch.bfloat16)
    for _ in range(2):  # two passes in turns: the spread between them is the noise
        for name, fn in variants.items():
            try:
                row["us"].setdefault(name, []).append(_bench(fn, reps, graph))
            except Exception as e:
                row["us"].setdefault(name, []).append(None)
                row["checks"].setdefault("timing_errors", {})[name] = str(e).splitlines()[0][:200]
    return row


def to_markdown(rows: list[dict]) -> str:
    """One row per problem: each variant's best-of-two µs as a speed-up over bf16."""
    names = list(dict.fromkeys(n for r in rows for n in r["us"]))  # every row's variants (some time more)
    head = "| model | layer | M | bf16 µs | " + " | ".join(f"{n} ×" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (4 + len(names) - 1)]
    for r in rows:
        best = {n: min((t for t in ts if t), default=None) for n, ts in r["us"].items()}
        b = best["bf16"]
        cells = [f"{b / best[n]:.2f}" if best.get(n) else "-" for n in names[1:]]
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {b:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PLOTTED = {"triton (today)": "Triton GEMM (before run 23)", "ws 128x128 s5": "Gluon GEMM (picked)",
           "layer int8 (quant + picked GEMM)": "whole int8 layer (activation pass + picked GEMM)",
           "cublas fp8 (_scaled_mm rowwise)": "cuBLAS fp8 GEMM", "ws fp8 128x128 s5": "Gluon fp8 GEMM",
           "ws pingpong 128x128 s4": "Gluon ping-pong GEMM", "triton + lora r32": "Triton GEMM + LoRA r32",
           "ws + lora r32": "Gluon GEMM + LoRA r32", "layer fp8 (quant + picked GEMM)": "whole fp8 layer (Gluon)",
           "layer fp8 (quant + cuBLAS)": "whole fp8 layer (cuBLAS)"}


def bar_groups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{"model layer K->N, M": {label: × bf16}}`` from the best-of-passes timings, for :data:`PLOTTED`."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        best = {n: min((t for t in ts if t), default=None) for n, ts in r["us"].items()}
        b = best.get("bf16")
        label = f"{r['model']} {r['layer']} {r['K']}->{r['N']}, M {r['M']}"
        out[label] = {name: b / best[key] for key, name in PLOTTED.items() if b and best.get(key)}
    return out


def plot(payload: dict, png: Path) -> Path:
    """The report's speed-ups as grouped bars (PNG beside the json)."""
    from comfyquant.bench.plot import plot_bars

    timing = payload["env"].get("timing", "do_bench, L2 cleared")
    return plot_bars(bar_groups(payload["rows"]), png, f"int8 W8A8 on {payload['env']['device']}: x bf16 F.linear "
                     f"(same run, median; {timing})", target=1.6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--m", default="1024,4608,16384", help="comma-separated row counts")
    p.add_argument("--reps", type=int, default=60, help="do_bench repetition time per variant, ms")
    p.add_argument("--only", default="", help="comma-separated model.layer names (default: all)")
    p.add_argument("--experimental", action="store_true", help="also the Gluon variants the runtime does not pick (fp8, ping-pong) and the LoRA term")
    p.add_argument("--graph", action="store_true", help="GPU time from CUDA-graph replays (the small shapes, whose "
                   "plain timing measures the benchmark launcher's host time)")
    p.add_argument("--narrow", action="store_true", help="the SDXL / CLIP / T5 widths in place of Flux / Wan")
    p.add_argument("--plot-from", default=None,
                   help="only draw --out/gemm_ws.png from this saved json or json.gz (no GPU)")
    a = p.parse_args(argv)
    if a.plot_from:
        from comfyquant.bench.saved import read_saved_json

        Path(a.out).mkdir(parents=True, exist_ok=True)
        print(plot(read_saved_json(a.plot_from), Path(a.out) / "gemm_ws.png"))
        return 0
    table = NARROW if a.narrow else SHAPES
    only = {s for s in a.only.split(",") if s}
    unknown = sorted(only - {f"{model}.{layer}" for model, layer in table})
    if unknown:  # before any device work: a misspelt name would otherwise time nothing
        print(f"bench_gemm_ws: unknown shape(s) {', '.join(unknown)}{' (with --narrow)' if a.narrow else ''}; "
              f"known: {', '.join(f'{mo}.{la}' for mo, la in table)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_gemm_ws: needs a Hopper GPU (the Gluon kernel is sm_90 code)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "timing": "CUDA-graph replay (GPU time)" if a.graph else "do_bench, L2 cleared"}
    for (model, layer), (k, n) in table.items():
        if only and f"{model}.{layer}" not in only:
            continue
        for m in (int(v) for v in a.m.split(",")):
            r = run_shape(m, k, n, a.reps, a.experimental, a.graph)
            r.update(model=model, layer=layer)
            rows.append(r)
            print(json.dumps({key: r[key] for key in ("model", "layer", "M", "checks")}), flush=True)
            (out / "gemm_ws.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))  # kept if cut short
    md = to_markdown(rows)
    (out / "gemm_ws.md").write_text(md)
    plot({"env": env, "rows": rows}, out / "gemm_ws.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
