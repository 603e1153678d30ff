# ruff: noqa: B023  (lambdas are timed inside the loop iteration that defines them)
"""Where the time goes (GPU): host launch overhead per path, CUDA-graph GPU time at small M, activation-quant
bandwidth, and GEMM-only speed (pointer vs TMA Triton kernels vs cuBLAS fp8 / bf16). Prints a table; JSON to --out."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels import dispatch, triton_int8, triton_quant


def host_us(fn, n: int = 300) -> float:
    """Host time per call with the GPU kept busy-free (sync after the loop): launch overhead when the GPU is fast."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t_host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return t_host


def graph_us(fn) -> float:
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def bench_us(fn) -> float:
    return 1000 * triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name()}
    dev = "cuda"
    # 1. small-M overhead
    k, n = 3072, 3072
    w = torch.randn(n, k, device=dev) * 0.02
    wb = w.bfloat16()
    q, s = quantize_rowwise(w)
    qf, sf = quantize_fp8(w)
    bias = torch.randn(n, device=dev).bfloat16()
    small = {}
    for m in (1, 16, 256):
        x = torch.randn(m, k, device=dev).bfloat16()
        x2d = x
        paths = {
            "bf16": lambda: F.linear(x, wb, bias),
            "auto": lambda: dispatch.int8_linear(x, q, s, bias),
            "impl_w8a16": lambda: triton_int8.w8a16_linear(x, q, s, bias, None, torch.bfloat16),
            "impl_w8a8": lambda: triton_int8.int8_linear(x, q, s, bias, None, torch.bfloat16),
            "quant_only": lambda: triton_quant.quantize_rows_int8(x2d),
            "rot256_quant": lambda: triton_quant.quantize_rows_int8(x2d, 256),
            "fp8_scaled_mm": lambda: dispatch.fp8_linear(x, qf, sf, bias, backend="scaled_mm"),
            "empty_alloc": lambda: torch.empty((m, n), device=dev, dtype=torch.bfloat16),
        }
        for name, fn in paths.items():
            small[f"M{m}/{name}"] = {"host_us": host_us(fn), "graph_us": graph_us(fn), "bench_us": bench_us(fn)}
            print(f"M={m:5d} {name:14s} " + " ".join(f"{k2}={v:7.1f}" for k2, v in small[f"M{m}/{name}"].items()),
                  flush=True)
    res["small"] = small
    # 2. activation quant bandwidth
    quant = {}
    for m, kk in ((16384, 3072), (16384, 5120), (16384, 12288), (16384, 15360), (4096, 13824)):
        x = torch.randn(m, kk, device=dev).bfloat16()
        byts = m * kk * 3
        for g in (None, 16, 64, 256, 1024):
            if g and kk % g:
                continue
            t = bench_us(lambda x=x, g=g: triton_quant.quantize_rows_int8(x, g))
            quant[f"{m}x{kk}/g{g}"] = {"us": t, "GBps": byts / t / 1e3}
            print(f"quant M={m} K={kk} g={g}: {t:8.1f} us {byts / t / 1e3:7.0f} GB/s", flush=True)
        t = bench_us(lambda x=x: triton_quant.quantize_rows_fp8(x))
        print(f"fp8 quant M={m} K={kk}: {t:8.1f} us", flush=True)
    res["quant"] = quant
    # 3. GEMM only
    gemm = {}
    for m, kk, nn in ((4096, 3072, 9216), (16384, 3072, 9216), (16384, 3072, 3072), (16384, 12288, 3072),
                      (4096, 5120, 13824), (16384, 5120, 5120), (16384, 3072, 21504)):
        xb = torch.randn(m, kk, device=dev).bfloat16()
        wb2 = (torch.randn(nn, kk, device=dev) * 0.02).bfloat16()
        qa, sa = triton_quant.quantize_rows_int8(xb)
        qw, sw = quantize_rowwise(wb2.float())
        fa, fsa = triton_quant.quantize_rows_fp8(xb)
        fw = wb2.float().to(torch.float8_e4m3fn)
        one = torch.ones(1, nn, device=dev)
        r = {
            "bf16": bench_us(lambda: F.linear(xb, wb2)),
            "ptr": bench_us(lambda: triton_int8._launch(triton_int8._w8a8_kernel, qa, qw, sa, sw, None, torch.bfloat16)),
            "tma": bench_us(lambda: triton_int8._launch_tma(qa, qw, sa, sw, None, torch.bfloat16)),
            "int_mm": bench_us(lambda: torch._int_mm(qa, qw.t())),
            "fp8_mm": bench_us(lambda: torch._scaled_mm(fa, fw.t(), scale_a=fsa, scale_b=one, out_dtype=torch.bfloat16)),
        }
        cfg = {nm: str(kern.best_config) for nm, kern in (("ptr", triton_int8._w8a8_kernel),
                                                         ("tma", triton_int8._w8a8_tma_kernel))}
        gemm[f"{m}x{kk}x{nn}"] = {**r, "configs": cfg}
        print(f"gemm {m}x{kk}x{nn}: " + " ".join(f"{k2}={r['bf16'] / v:5.2f}x" for k2, v in r.items())
              + f" bf16={r['bf16']:.0f}us {cfg}", flush=True)
    res["gemm"] = gemm
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
