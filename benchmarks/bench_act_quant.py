"""The unrotated activation quantizer alone (per-row int8 of bf16 or fp32 rows, what every W8A8 layer runs first): the
row kernel, the tile kernel and "auto" (``triton_quant.pick_kernel``) against the block kernel's configurations
(rows per program, columns per step, warps), GPU time of CUDA-graph replays with the inputs cycled past L2,
and as achieved bandwidth (2 bytes read + 1 written per element). Every block configuration's codes and scales
are compared bit for bit with the row kernel's (``div_rn`` per element) on rows with outliers, fp32 rows and
fp8 codes included, before it is timed.

    python benchmarks/bench_act_quant.py --out results/      # a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

M_VALUES = (256, 1024, 4096, 16384)
K_VALUES = (640, 768, 1280, 3072, 4096, 5120, 10240, 12288, 13824, 15360)
L2_PAST = 160 << 20  # bytes of input cycled per timing: past the H200's 50 MB L2


def configs(k: int) -> list[tuple[int, int | None, int]]:
    """(rows per program, chunk or None for one pass, warps) timed for width ``k``."""
    from comfyquant.runtime.kernels.configs import next_power_of_2

    out: list[tuple[int, int | None, int]] = []
    full = next_power_of_2(k)
    div = min(2048, k & -k)
    for chunk in (None, *sorted({div, 1024, 2048, 4096})):
        width = full if chunk is None else chunk
        if chunk is not None and (chunk > k or chunk < min(div, 1024)):
            continue
        for rows in (1, 2, 4):
            if rows * width > (16384 if chunk is None else 8192):
                continue
            for warps in (4, 8, 16) if rows * width >= 8192 else (4, 8):
                out.append((rows, chunk, warps))
    return out


def run_block(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cfg: tuple, mode: int, qmax: float,
              static: torch.Tensor | None = None) -> None:
    """The block kernel in configuration ``cfg``: (rows, chunk, warps)."""
    from comfyquant.runtime.kernels import triton_quant as tq

    rows, chunk, warps = cfg
    grid, args, key, w = tq.block_launch(x, q, s, static, mode, qmax, 0, 0, rows=rows, chunk=chunk, warps=warps)
    tq._ACT_BLOCKS(grid, args, x.device, num_warps=w, num_stages=1, key=key)


def check(k: int, cfgs: list) -> dict:
    """Bit equality with the row kernel: every configuration on bf16 rows with int8 codes (outliers, a zero row,
    exact halves, negative zeros, a tiny value), and the first two also on fp32 rows, e4m3 codes and a static
    fp8 scale."""
    from comfyquant.runtime.kernels import triton_quant as tq

    g = torch.Generator(device="cuda").manual_seed(k)
    res = {}
    st = torch.tensor([0.01], device="cuda")
    for dt in (torch.bfloat16, torch.float32):
        x = (torch.randn(67, k, device="cuda", generator=g) * torch.rand(67, 1, device="cuda", generator=g) * 8)
        x[0, 5], x[3, -1], x[5] = 300.0, -1e-30, 0.0
        x[7, :64] = torch.arange(64, device="cuda") * 0.5 - 16  # exact halves against a power-of-two scale
        x[7, 100 % k] = 127.0
        x[9, :32] = -0.0
        x = x.to(dt)
        want_q, want_s = tq.quantize_rows_int8(x, kernel="rows")
        want_f, want_fs = tq.quantize_rows_fp8(x, kernel="rows")
        want_st, _ = tq.quantize_rows_fp8(x, static_scale=st, kernel="rows")
        for i, cfg in enumerate(cfgs if dt == torch.bfloat16 else cfgs[:2]):
            q, s = torch.empty_like(want_q), torch.empty_like(want_s)
            run_block(x, q, s, cfg, tq.MODE_INT8, 127.0)
            off = {"int8": int((q != want_q).sum()) + int((s != want_s).sum())}
            if i < 2:
                qf, sf = torch.empty_like(want_f), torch.empty_like(want_fs)
                run_block(x, qf, sf, cfg, tq.MODE_FP8, 448.0)
                off["fp8"] = int((qf.view(torch.int8) != want_f.view(torch.int8)).sum()) + int((sf != want_fs).sum())
                qs, ss = torch.empty_like(want_f), torch.empty_like(want_fs)
                run_block(x, qs, ss, cfg, tq.MODE_FP8_STATIC, 448.0, st)
                off["fp8_static"] = int((qs.view(torch.int8) != want_st.view(torch.int8)).sum())
            if any(off.values()):
                res[f"{cfg} {dt}"] = off
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--k", default=",".join(map(str, K_VALUES)))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="the rows' dtype (fp32: ComfyUI's text encoders)")
    p.add_argument("--configs", choices=("all", "picked"), default="all",
                   help="time every block configuration, or only block_config's pick (a short call)")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.bench.timing import run_record
    from comfyquant.runtime.kernels import triton_quant as tq

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows_out, failures = [], {}
    ks = [int(v) for v in a.k.split(",")]
    for k in ks:
        cfgs = configs(k) if a.configs == "all" else []
        bad = check(k, cfgs or list(dict.fromkeys(tq.block_config(int(m), k) for m in a.m.split(","))))
        if bad:
            failures[k] = bad
            print(f"K={k}: NOT bit-equal: {bad}", flush=True)
        for m in (int(v) for v in a.m.split(",")):
            size = torch.tensor([], dtype=dtype).element_size()
            n = max(2, min(64, L2_PAST // (m * k * size)))
            xs = [torch.randn(m, k, device="cuda").to(dtype) for _ in range(n)]
            qs = [torch.empty((m, k), dtype=torch.int8, device="cuda") for _ in range(n)]
            ss = [torch.empty((m, 1), dtype=torch.float32, device="cuda") for _ in range(n)]
            pairs = list(zip(xs, qs, ss, strict=True))
            row: dict = {"m": m, "k": k, "dtype": a.dtype, "us": {}}
            if a.configs == "picked":
                cfgs = [tq.block_config(m, k)]
            for kern in ("rows", "tiles", "auto"):
                row["us"][kern] = graph_time_us(lambda x, q, s, kern=kern: tq.quantize_rows_int8(x, kernel=kern),
                                                pairs)
            for cfg in cfgs:
                row["us"][str(cfg)] = graph_time_us(
                    lambda x, q, s, cfg=cfg: run_block(x, q, s, cfg, tq.MODE_INT8, 127.0), pairs)
            best = min(((v, c) for c, v in row["us"].items() if c.startswith("(")), default=(float("nan"), ""))
            row["best_block"], row["best_block_us"] = best[1], best[0]
            row["tb_s"] = {c: m * k * (size + 1) / v / 1e6 for c, v in row["us"].items()}
            rows_out.append(row)
            print(f"M={m:5} K={k:5} rows {row['us']['rows']:7.1f} tiles {row['us']['tiles']:7.1f} auto "
                  f"{row['us']['auto']:7.1f} best block {best[1]} {best[0]:7.1f} us ({row['tb_s'][best[1]]:.2f} TB/s)"
                  f" = {row['us']['auto'] / best[0]:.2f}x auto", flush=True)
            del xs, qs, ss, pairs
            torch.cuda.empty_cache()
            # after every row: a step cut short by its time limit keeps what it timed
            res = run_record(t0, failures=failures, rows=rows_out)
            (a.out / "act_quant.json").write_text(json.dumps(res, indent=1))
    res = run_record(t0, failures=failures, rows=rows_out)
    (a.out / "act_quant.json").write_text(json.dumps(res, indent=1))
    print(f"done in {res['seconds']} s; configurations not bit-equal: {len(failures)} widths", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
