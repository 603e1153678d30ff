# ruff: noqa: B023  (lambdas are timed inside the loop iteration that defines them)
"""One GPU session: kernel accuracy checks, cost-model calibration, host overhead per path, the per-layer
sweep and whole-model runs, each section under a time budget. JSON/markdown under --out; short table last.

    PYTHONPATH=$PWD python3 benchmarks/gpu_session.py --out $OUT [--budget-s 300] [--sections ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

T0 = time.perf_counter()
SUMMARY: list[str] = []


def left(budget: float) -> float:
    return budget - (time.perf_counter() - T0)


def section_check(out: Path) -> None:
    import check_kernels_gpu

    rc = check_kernels_gpu.main(["--out", str(out)])
    res = json.loads((out / "check_kernels.json").read_text())
    bad = [r for r in res if not r["ok"]]
    SUMMARY.append(f"checks: {len(res) - len(bad)}/{len(res)} passed" + (f"; FAILED: {[r['check'] for r in bad]}"
                                                                         if bad else ""))
    print("check rc", rc, flush=True)


def section_calibrate(out: Path) -> None:
    from comfyquant.runtime.kernels import calibrate

    t = time.perf_counter()
    c = calibrate.measure(torch.device("cuda"))
    dt = time.perf_counter() - t
    (out / "costs.json").write_text(json.dumps({**c.to_json(), "seconds": dt}, indent=1))
    calibrate._LOADED[torch.cuda.current_device()] = c  # the sweep's auto uses this measurement
    SUMMARY.append(f"calibration {dt:.1f}s: host_us {dict(c.host_us)} tflops "
                   f"{ {k: round(v) for k, v in c.tflops} } bw {c.bw_gbs:.0f} GB/s")
    print(SUMMARY[-1], flush=True)


def section_host(out: Path) -> None:
    """Host µs per call of the full module path (QuantLinear forward) vs nn.Linear, tiny layer and a Flux-sized
    one; which backend each layer chose; and a cProfile of the int8 calls (where the host time goes)."""
    import cProfile
    import io
    import pstats

    from comfyquant.bench.layers import wall_us
    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.dispatch_report import describe_dispatch

    res: dict[str, float | str] = {}
    prof_txt = []
    for m, n in ((1, 256), (1024, 3072)):
        x = torch.randn(m, n, device="cuda").bfloat16()
        for fmt in ("bf16", "int8", "fp8"):
            lin = nn.Sequential(nn.Linear(n, n)).cuda().bfloat16()
            if fmt != "bf16":
                quantize_(lin, QuantizeConfig(format=fmt, min_features=1))
                res[f"{fmt}_{m}x{n}_backend"] = describe_dispatch(lin, x)[0].backend
            with torch.no_grad():
                res[f"{fmt}_{m}x{n}"] = wall_us(lambda lin=lin: lin(x), 20.0)
                if fmt == "int8":
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(500):
                        lin(x)
                    prof.disable()
                    torch.cuda.synchronize()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                    prof_txt.append(f"== int8 {m}x{n}, 500 calls\n{buf.getvalue()}")
        # every pinned backend through the module, and whether its calls replay a plan (triton_plans)
        from comfyquant.runtime.nn import bound_linear

        for fmt, backends in (("int8", ("triton", "triton_fused", "triton_w8a16", "dequant")),
                              ("fp8", ("scaled_mm", "triton_w8a16", "dequant"))):
            lin = nn.Sequential(nn.Linear(n, n)).cuda().bfloat16()
            quantize_(lin, QuantizeConfig(format=fmt, min_features=1))
            for backend in backends:
                lin[0].set_backend(backend)
                with torch.no_grad():
                    res[f"{fmt}_{backend}_{m}x{n}"] = wall_us(lambda lin=lin: lin(x), 20.0)
                memo = getattr(bound_linear(lin[0].qweight, lin[0].bias), "memo", {})
                res[f"{fmt}_{backend}_{m}x{n}_planned"] = str(any(callable(e[1]) for e in memo.values()))
    res["bf16"], res["int8"], res["fp8"] = res["bf16_1x256"], res["int8_1x256"], res["fp8_1x256"]  # run 1-4 keys
    (out / "host.json").write_text(json.dumps(res, indent=1))
    (out / "host_profile.txt").write_text("\n".join(prof_txt))
    SUMMARY.append("module host µs/call: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in res.items()))
    print(SUMMARY[-1], flush=True)


_GEMM_TILES = ((128, 256, 8, 3, 8), (128, 256, 8, 4, 8), (256, 128, 8, 3, 8), (256, 128, 8, 4, 8),
               (128, 128, 8, 4, 8), (128, 128, 4, 4, 8), (128, 128, 8, 4, 1), (64, 128, 4, 4, 8),
               (128, 64, 4, 4, 8), (64, 256, 4, 4, 8))  # (BLOCK_M, BLOCK_N, warps, stages, GROUP_M); BLOCK_K 128


def _time_tiles(res: list, path: str, mnk: tuple[int, int, int], configs: list, run: Callable) -> None:
    """One row per tile config: ``run(cfg)``'s GPU time, or the error it raised (recorded, not raised)."""
    from comfyquant.runtime.kernels.calibrate import _gpu_us

    m, n, k = mnk
    for cfg in configs:
        try:
            t = _gpu_us(lambda c=cfg: run(c))
        except Exception as e:  # recorded
            t = str(e)[:80]
        res.append({"path": path, "m": m, "n": n, "k": k, "cfg": str(cfg), "us": t})


def _int4_rot_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed int4 [N, K/2], per-row scale, convrot group) of ``w`` in the int4-rot format, as layers hold it."""
    from comfyquant.runtime import QuantizedTensor

    qt = QuantizedTensor.from_float(w, "int4-rot")
    p = qt.params
    (scale,), (group,) = p.format.kernel_args(p.stored(qt.qdata), p.layer_params)
    return qt.qdata, scale, group


def _cycled_gpu_us(fns: list[Callable[[], object]]) -> float:
    """GPU time per call of ``fns`` called in turn (operand copies past L2) in one CUDA graph."""
    from comfyquant.bench.layers import graph_time_us

    return graph_time_us(lambda f: f(), [(f,) for f in fns])


# (BLOCK_M, BLOCK_N, warps, stages) of the persistent-grid trial; BLOCK_K 128, GROUP_M 8
_PERSIST_TILES = ((256, 128, 8, 4), (128, 256, 8, 4), (128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4))
_PERSIST_SHAPES = (("flux qkv", 9216, 3072), ("flux proj", 3072, 3072), ("flux mlp0", 12288, 3072),
                   ("flux mlp2", 3072, 12288), ("flux linear1", 21504, 3072), ("flux linear2", 3072, 15360),
                   ("wan attn", 5120, 5120), ("wan ffn0", 13824, 5120), ("wan ffn2", 5120, 13824))


def section_persist(out: Path, budget: float) -> None:
    """The W8A8 GEMM alone (CUDA graph, 3 weight copies in turn) on the persistent grid (``TileConfig.persistent``
    1 and 2) against the one-program-per-tile kernel (the table's pick) and bf16 cuBLAS, on the 9 Flux / Wan
    layer shapes at M 1024, 4096, 16384; int32 results checked bit-equal to ``torch._int_mm`` first."""
    import dataclasses

    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.configs import TileConfig

    bf16 = torch.bfloat16
    res: list = []
    g = torch.Generator(device="cuda").manual_seed(7)
    for m, n, k in ((4097, 3000, 3072), (1000, 9216, 5120), (16384, 1280, 1280)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        want = torch._int_mm(a, b.t())
        for bm, bn, w_, st in _PERSIST_TILES:
            for p in (1, 2):
                cfg = TileConfig(bm, bn, 128, w_, st, 8, p)
                try:
                    ok, err = bool(torch.equal(ti.int_mm(a, b, tma=True, cfg=cfg), want)), ""
                except Exception as e:  # recorded: a variant that does not compile is a result
                    ok, err = False, str(e)[:200]
                res.append({"path": "exact", "m": m, "n": n, "k": k, "cfg": str(cfg), "ok": ok, "error": err})
    bad = [r for r in res if not r["ok"]]
    SUMMARY.append(f"persist exactness: {len(res) - len(bad)}/{len(res)} bit-equal to torch._int_mm"
                   + (f"; failed: {[(r['cfg'], r['error']) for r in bad][:4]}" if bad else ""))
    print(SUMMARY[-1], flush=True)
    for name, n, k in _PERSIST_SHAPES:
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(3)]
        qs = [quantize_rowwise(w) for w in ws]
        wbs = [w.bfloat16() for w in ws]
        del ws
        for m in (1024, 4096, 16384):
            if left(budget) < 20:
                break
            x = torch.randn(m, k, device="cuda").bfloat16()
            qa, sa = tq.quantize_rows_int8(x)
            row = {"path": "persist", "layer": name, "m": m, "n": n, "k": k, "us": {}}
            row["us"]["bf16"] = _cycled_gpu_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wbs])
            row["us"]["act_quant"] = _cycled_gpu_us([lambda: tq.quantize_rows_int8(x)])
            pick = ti.pick_w8a8(m, n, k, x.device)[0]
            row["pick"] = str(pick)
            cands = {"pick": pick, **{f"p{p}_{bm}x{bn}w{w_}s{st}": TileConfig(bm, bn, 128, w_, st, 8, p)
                                      for bm, bn, w_, st in _PERSIST_TILES for p in (0, 1, 2)}}
            cands["pick_p1"] = dataclasses.replace(pick, persistent=1)
            cands["pick_p2"] = dataclasses.replace(pick, persistent=2)
            for label, cfg in cands.items():
                try:
                    row["us"][label] = _cycled_gpu_us(
                        [lambda q=q, s=s, c=cfg: ti.gemm_w8a8(qa, sa, q, s, None, bf16, cfg=c) for q, s in qs])
                except Exception as e:  # recorded: a tile that does not fit or compile is a result
                    row["us"][label] = str(e)[:80]
            res.append(row)
            us = {c: t for c, t in row["us"].items() if isinstance(t, float) and c not in ("bf16", "act_quant")}
            best = min(us, key=us.get)
            SUMMARY.append(f"persist {name} M={m}: bf16 {row['us']['bf16']:.1f}us pick {us['pick']:.1f} "
                           f"({row['us']['bf16'] / us['pick']:.2f}x) best {best} {us[best]:.1f} "
                           f"({row['us']['bf16'] / us[best]:.2f}x) quant {row['us']['act_quant']:.1f}")
            print(SUMMARY[-1], flush=True)
    (out / "persist.json").write_text(json.dumps(res, indent=1))


def section_tune(out: Path) -> None:
    """GPU time (CUDA graph) of candidate tile configs on a few shapes: the data behind configs.py's table."""
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.calibrate import _gpu_us
    from comfyquant.runtime.kernels.configs import TileConfig

    bf16 = torch.bfloat16
    res: list = []
    for n, k in ((9216, 3072), (3072, 3072), (3072, 12288), (13824, 5120), (1280, 1280), (1280, 5120), (640, 640)):
        w = torch.randn(n, k, device="cuda") * 0.02
        q, sc = quantize_rowwise(w)
        wb = w.bfloat16()
        for m in (1, 16) if n != 640 else ():
            x = torch.randn(m, k, device="cuda").bfloat16()
            _time_tiles(res, "w8a16", (m, n, k), [TileConfig(16, bn, bk, 4, st, 1) for bn in (32, 64, 128)
                                                  for bk in (128, 256) for st in (3, 4)],
                        lambda c: ti.w8a16_linear(x, q, sc, None, None, bf16, cfg=c))
            res.append({"path": "bf16", "m": m, "n": n, "k": k,
                        "us": _gpu_us(lambda: torch.nn.functional.linear(x, wb))})
        # SDXL's 1280-wide layers ran 3-4x slower than bf16 at M=16384 in the run-6 sweep (the N=1280 anomaly):
        # both M there, and 64-row tiles and GROUP_M 1 as candidates. Run 8: 64x128 tiles won the 1280-wide
        # shapes at M=4096 (18.3 vs the pick's 23.0 us); M 256 / 1024 (Flux 512², SDXL's 1280-wide blocks, T5)
        # test whether that holds where wave quantization decides too.
        tiles = [TileConfig(bm, bn, 128, w_, st, gm) for bm, bn, w_, st, gm in _GEMM_TILES]
        for m in ((1024, 4096, 16384) if n == 1280 else (4096,) if n == 640 else (256, 1024, 4096)):
            x = torch.randn(m, k, device="cuda").bfloat16()
            qa, sa = tq.quantize_rows_int8(x)
            _time_tiles(res, "w8a8_gemm", (m, n, k), tiles,
                        lambda c: ti.gemm_w8a8(qa, sa, q, sc, None, bf16, cfg=c))
            res.append({"path": "w8a8_gemm_default", "m": m, "n": n, "k": k,
                        "cfg": str(ti.pick_w8a8(m, n, k, x.device)[0]),
                        "us": _gpu_us(lambda: ti.gemm_w8a8(qa, sa, q, sc, None, bf16))})
            res.append({"path": "act_quant", "m": m, "n": n, "k": k, "us": _gpu_us(lambda: tq.quantize_rows_int8(x))})
            res.append({"path": "bf16", "m": m, "n": n, "k": k,
                        "us": _gpu_us(lambda: torch.nn.functional.linear(x, wb))})
            if m < 4096 or n == 640:
                continue
            # the fp8 W8A8 Triton GEMM (LoRA layers' fp8 path; 1114 vs _scaled_mm's 1391 TFLOP/s at 4096^3 in
            # run 7 on the int8 tile table): the same candidates on e4m3 operands, and _scaled_mm itself
            q8, s8 = tq.quantize_rows_fp8(x)
            ws8 = (w.abs().amax(dim=1) / 448).float()
            w8 = (w / ws8[:, None]).to(torch.float8_e4m3fn)
            _time_tiles(res, "fp8_gemm", (m, n, k), tiles,
                        lambda c: ti.gemm_w8a8(q8, s8, w8, ws8, None, bf16, cfg=c))
            res.append({"path": "fp8_scaled_mm", "m": m, "n": n, "k": k, "us": _gpu_us(
                lambda: torch._scaled_mm(q8, w8.t(), scale_a=s8, scale_b=ws8.reshape(1, -1), out_dtype=bf16))})
            if n != 1280:  # W4A8 (int4-rot, 0.27-0.42x of W8A8 so far): the same tiles (BLOCK_K is its 128)
                w4, s4, g4 = _int4_rot_weight(w)
                _time_tiles(res, "w4a8", (m, n, k), tiles,
                            lambda c: ti.w4a8_linear(x, w4, s4, None, g4, bf16, cfg=c))
    (out / "tune.json").write_text(json.dumps(res, indent=1))
    best = {}
    for r in res:
        if isinstance(r["us"], float) and r["path"] in ("w8a16", "w8a8_gemm", "fp8_gemm", "w4a8"):
            kk = (r["path"], r["m"], r["n"], r["k"])
            if kk not in best or r["us"] < best[kk][0]:
                best[kk] = (r["us"], r["cfg"])
    bf = {(r["m"], r["n"], r["k"]): r["us"] for r in res if r["path"] == "bf16"}
    default = {(r["m"], r["n"], r["k"]): r for r in res if r["path"] == "w8a8_gemm_default"}
    for kk, (t, c) in best.items():
        d = default.get(kk[1:]) if kk[0] == "w8a8_gemm" else None
        pick = f"; pick {d['us']:.1f}us {d['cfg']}" if d and isinstance(d["us"], float) else ""
        SUMMARY.append(f"tune {kk}: best {t:.1f}us ({bf[kk[1:]] / t:.2f}x bf16) {c}{pick}")


def section_rotation(out: Path) -> None:
    """The activation kernel alone (bf16 x, Flux/Wan/SDXL widths), the row kernel vs the tile kernel, without
    rotation and with convrot group 256: GPU time (CUDA graph) and eager wall time per call. The data behind
    ``triton_quant.pick_kernel`` ("auto": what the linears run, timed too); the rotating tile kernel with 64-
    and 16-row programs (``triton_quant.dot_rows``; codes compared)."""
    from comfyquant.bench.layers import wall_us
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.calibrate import _gpu_us

    res = []
    for m in (256, 1024, 4096, 16384):
        for k in (1280, 3072, 5120, 12288, 15360):
            x = torch.randn(m, k, device="cuda").bfloat16()
            row: dict = {"m": m, "k": k, "bytes": m * k * 3}  # bf16 read + int8 write
            qt = torch.empty((m, k), dtype=torch.int8, device="cuda")
            st = torch.empty((m, 1), dtype=torch.float32, device="cuda")

            def tiles(rows: int) -> torch.Tensor:  # the rotating tile kernel with a given program height
                grid, args, key, warps = tq.tile_launch(x, qt, st, 256, tq.MODE_INT8, 127.0, 0, 0, rows=rows)
                tq._ACT_TILES(grid, args, x.device, num_warps=warps, num_stages=2, key=key)
                return qt

            for name, g, kern in (("plain_rows", None, "rows"), ("plain_tiles", None, "tiles"),
                                  ("plain_auto", None, "auto"), ("rot_rows", 256, "rows"), ("rot_tiles", 256, 64),
                                  ("rot_tiles16", 256, 16), ("rot_auto", 256, "auto")):
                def fn() -> object:
                    return tiles(kern) if isinstance(kern, int) else tq.quantize_rows_int8(x, g, kernel=kern)

                try:
                    row[f"{name}_gpu_us"], row[f"{name}_wall_us"] = _gpu_us(fn), wall_us(fn, 20.0)
                except Exception as e:  # recorded
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            try:
                row["rot_tiles16_equal"] = bool(torch.equal(tiles(16).clone(), tiles(64)))
            except Exception as e:  # recorded
                row["rot_tiles16_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            res.append(row)
            print(row, flush=True)
    (out / "rotation.json").write_text(json.dumps(res, indent=1))
    for what in ("plain", "rot"):
        ok = [r for r in res if f"{what}_tiles_gpu_us" in r and f"{what}_rows_gpu_us" in r]
        wins = sum(r[f"{what}_tiles_gpu_us"] < r[f"{what}_rows_gpu_us"] for r in ok)
        kerns = ("rows", "tiles", "tiles16") if what == "rot" else ("rows", "tiles")
        auto = [r[f"{what}_auto_gpu_us"] / min(r.get(f"{what}_{kn}_gpu_us", float("inf")) for kn in kerns)
                for r in ok if f"{what}_auto_gpu_us" in r]
        SUMMARY.append(f"act kernel {what}: auto / the faster of rows and tiles: worst {max(auto, default=0):.2f}")
        SUMMARY.append(f"act kernel {what}: tiles faster than rows (GPU time) on {wins}/{len(ok)} shapes; M=4096: "
                       + ", ".join(f"K={r['k']} rows {r[f'{what}_rows_gpu_us']:.1f} tiles "
                                   f"{r[f'{what}_tiles_gpu_us']:.1f} us" for r in ok if r["m"] == 4096))


def section_sweep(out: Path, models: str, m_values: str, budget: float) -> None:
    from comfyquant.bench import layers as bench

    # every path's GPU time too: sweeps carrying their own cost table and both times per path fit the eager form
    cfg = bench._parse(["--models", models, "--m", m_values, "--out", str(out), "--graph-all"])
    ck_fn, ck_note = bench._load_ck()
    rows = []
    for model, layer, k, n in bench.SHAPES:
        if model not in cfg.models:
            continue
        if left(budget) < 40:
            SUMMARY.append(f"sweep: out of time before {model}.{layer}")
            break
        rows.extend(bench._bench_shape(model, layer, k, n, cfg, ck_fn))
    from comfyquant.runtime.kernels.calibrate import device_costs

    # the device, the date and the cost table this process picked with (each process measures its own host times)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "costs": device_costs(torch.device("cuda")).to_json()}
    (out / "bench.json").write_text(json.dumps({"ck": ck_note, "meta": meta, "rows": [r.__dict__ for r in rows]},
                                               indent=1))
    (out / "bench.md").write_text(bench.to_markdown(rows, f"{torch.cuda.get_device_name()} comfy-kitchen: {ck_note}"))
    SUMMARY.extend(f"sweep: {line}" for line in bench.target_counts(rows))


def section_models(out: Path, names: str, budget: float) -> None:
    from comfyquant.bench import models as bm
    from comfyquant.bench.layers import _load_ck

    ck_fn, _ = _load_ck()
    rows = bm.run_models(tuple(names.split(",")), ck_fn, deadline=T0 + budget - 20)
    (out / "models.json").write_text(json.dumps(rows, indent=1))
    table = bm.models_markdown(rows)
    (out / "models.md").write_text(table)
    SUMMARY.append(table)


# (name, heads, query tokens, key tokens, head_dim): the self-attention of the whole-model benchmarks
_ATTN_SHAPES = (("wan_480p", 40, 32760, 32760, 128), ("flux_1024", 24, 4608, 4608, 128),
                ("flux_512", 24, 1536, 1536, 128), ("flux2_1024", 48, 4608, 4608, 128),
                ("sdxl 640", 10, 4096, 4096, 64), ("sdxl 1280", 20, 1024, 1024, 64))
# (block_m, block_n, warps, stages) of the int8 attention kernel
_ATTN_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2),
               (64, 128, 4, 3))


def section_attention(out: Path, budget: float) -> None:
    """Attention alone (layout ``[B, T, H, D]`` viewed as ``[B, H, T, D]``, as the models call it): SDPA's
    default and each of its backends against the int8 kernel (``triton_attention``) per tile, GPU time by
    ``triton.testing.do_bench``; error of each against float32 SDPA."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from comfyquant.runtime.kernels import triton_attention as ta

    rows = []
    for name, h, t, tk, d in _ATTN_SHAPES:
        if left(budget) < 30:
            SUMMARY.append(f"attention: out of time before {name}")
            break
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
        k = (torch.randn(1, tk, h, d, device="cuda", generator=g) + torch.randn(d, device="cuda", generator=g)
             ).to(torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, tk, h, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4.0 * t * tk * d * h
        cands: dict[str, Callable[[], torch.Tensor]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def run(be: SDPBackend = be) -> torch.Tensor:
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v)
            cands[f"sdpa_{be.name.lower()}"] = run
        for bm, bn, w, st in _ATTN_TILES:
            cfg = ta.AttentionConfig(bm, bn, w, st)
            cands[f"int8 {bm}x{bn} w{w} s{st}"] = lambda cfg=cfg: ta.int8_attention(q, k, v, cfg=cfg)
            cands[f"int8+fp8pv {bm}x{bn} w{w} s{st}"] = lambda cfg=cfg: ta.int8_attention(q, k, v, cfg=cfg,
                                                                                          pv_fp8=True)
        row: dict = {"shape": name, "heads": h, "tokens": t, "head_dim": d, "us": {}, "rel_err": {}, "errors": {}}
        for cname, fn in cands.items():
            try:
                y = fn()
                row["rel_err"][cname] = float((y.float() - ref).norm() / ref.norm())
                row["us"][cname] = 1000.0 * triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median")
            except Exception as e:  # recorded per candidate (a backend refusing a shape, a tile out of resources)
                row["errors"][cname] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        base = row["us"].get("sdpa")
        row["tflops"] = {c: flops / u / 1e6 for c, u in row["us"].items()}
        row["x_sdpa"] = {c: base / u for c, u in row["us"].items()} if base else {}
        print(row, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    (out / "attention.json").write_text(json.dumps(rows, indent=1))
    lines = ["| shape | candidate | µs | TFLOP/s | × sdpa | rel err vs fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        for c, u in r["us"].items():
            lines.append(f"| {r['shape']} | {c} | {u:.0f} | {r['tflops'][c]:.0f} | {r['x_sdpa'].get(c, 0):.2f} | "
                         f"{r['rel_err'][c]:.4f} |")
        for c, e in r["errors"].items():
            lines.append(f"| {r['shape']} | {c} | error: {e} | | | |")
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    SUMMARY.append("\n".join(lines))


def section_breakdown(out: Path, names: str, budget: float) -> None:
    """GPU kernel time per category (linear, activation quantization, attention, other) of bf16, int8 and fp8
    whole models, and the Amdahl ceilings it implies (``bench.breakdown``)."""
    from comfyquant.bench import breakdown as bd
    from comfyquant.bench import models as bm
    from comfyquant.bench.timing import interleaved_ms

    rows: list[dict] = []
    for name in names.split(","):
        if left(budget) < 40:
            SUMMARY.append(f"breakdown: out of time before {name}")
            break
        built = list(bm.variants(name, None, only=("bf16", "int8", "fp8")))
        # wall time with the variants in turns (one after another, the host's drift would land on one of them)
        walls = interleaved_ms({v: (lambda m=model, a=args: m(*a)) for v, model, args in built})
        base = None
        for variant, model, args in built:
            b = bd.profile(lambda m=model, a=args: m(*a))
            if isinstance(walls.get(variant), float):
                b.wall_us = 1000.0 * walls[variant]
            row = {"model": name, "variant": variant, "breakdown": b}
            if base is None:
                base = b
                row.update({"ceil_1.6": bd.ceiling(b, 1.6), "ceil_2": bd.ceiling(b, 2.0)})
            else:
                row["linear_x"] = bd.linear_speedup(base, b)
            rows.append(row)
            print(name, variant, {k: round(v) for k, v in b.us.items()}, "wall", round(b.wall_us), b.top[:4],
                  flush=True)
        del built
        torch.cuda.empty_cache()
    (out / "breakdown.json").write_text(json.dumps(
        [{**{k: v for k, v in r.items() if k != "breakdown"}, "us": r["breakdown"].us,
          "wall_us": r["breakdown"].wall_us, "top": r["breakdown"].top} for r in rows], indent=1))
    table = bd.markdown(rows)
    (out / "breakdown.md").write_text(table)
    SUMMARY.append(table)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--sections", default="check,calibrate,host,sweep,models")
    p.add_argument("--sweep-models", default="flux,wan14b,sdxl,t5xxl,clip_l")
    p.add_argument("--sweep-m", default="1,16,256,1024,4096,16384")
    p.add_argument("--models", default="flux_1024,flux_512,flux2_1024,wan_480p,sdxl_1024,t5xxl_256,qwen3_4b_256")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for sec in a.sections.split(","):
        t = time.perf_counter()
        if left(a.budget_s) < 15:
            SUMMARY.append(f"{sec}: skipped (time budget)")
            continue
        try:
            if sec == "check":
                section_check(out)
            elif sec == "calibrate":
                section_calibrate(out)
            elif sec == "host":
                section_host(out)
            elif sec == "tune":
                section_tune(out)
            elif sec == "persist":
                section_persist(out, a.budget_s)
            elif sec == "rotation":
                section_rotation(out)
            elif sec == "sweep":
                section_sweep(out, a.sweep_models, a.sweep_m, a.budget_s)
            elif sec == "models":
                section_models(out, a.models, a.budget_s)
            elif sec == "attention":
                section_attention(out, a.budget_s)
            elif sec == "breakdown":
                section_breakdown(out, a.models, a.budget_s)
        except Exception as e:  # reported in the summary with its traceback above; the next section still runs
            traceback.print_exc()
            SUMMARY.append(f"{sec}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        print(f"== section {sec}: {time.perf_counter() - t:.1f}s (total {time.perf_counter() - T0:.1f}s)", flush=True)
    print("\n".join(SUMMARY))
    return 0


if __name__ == "__main__":
    sys.exit(main())
