"""The one-launch resident W8A8 kernel (``gluon_resident``) on narrow layers, against bf16 and the runtime's pick.

For each layer shape and row count: the kernel's output checked bit for bit against the two-launch W8A8 path
(the activation quantizer, then the W8A8 GEMM on its codes: the same codes, the same epilogue), its error against
a float64 reference beside that path's, then GPU time (one CUDA graph over weight and input sets cycled past L2)
and eager wall time (back-to-back calls, synchronized) of bf16 ``F.linear``, the runtime's int8 layer
(``dispatch.bind_linear``, what a QuantLinear runs), its one-launch W8A8 path pinned (``triton_fused``: the
row-block kernel from 64 rows), and the kernel on its default configuration and on the
alternatives ``--configs`` lists, each launched as the runtime's plan launches it (``gluon_resident.plan_resident``:
one launch, the weight's TMA descriptor expanded once); with ``--ws`` on rows up to 1,280 wide, the
warp-specialized kernel (``gluon_resident_ws``, column ``resident_ws``, launched through its plan as well), and
with ``--ws-configs`` its other launches (columns ``ws<tile width>s<stages>p<splits>``; its default launch rests
on estimates no GPU has checked).

    python3 benchmarks/bench_resident.py --out results/resident [--ws [--ws-configs]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyquant.runtime.kernels.configs import HOPPER_SMEM, resident_smem

SHAPES = {"sdxl.attn640": (640, 640), "sdxl.attn1280": (1280, 1280), "sdxl.ff0_640": (640, 5120),
          "clip.attn": (768, 768), "clip.fc1": (768, 3072), "clip.fc2": (3072, 768), "flux.proj": (3072, 3072)}
M_VALUES = (256, 1024, 4096, 16384)
ROTATE_BYTES = 256 << 20


def resident_fire(w_q: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor, cfg, x0: torch.Tensor):
    """``x -> out`` on the resident kernel for one weight set and configuration, as the runtime's plan launches it
    (``gluon_resident.plan_resident``: one launch, the weight's descriptor expanded once), after a first call
    compiled it; where no plan can be made, every call through ``resident_w8a8``."""
    from comfyquant.runtime.kernels import gluon_resident as gr

    gr.resident_w8a8(x0, w_q, sb, bias, cfg=cfg)
    plan = gr.plan_resident(x0, w_q, sb, bias, x0.dtype, cfg=cfg)
    return plan or (lambda x: gr.resident_w8a8(x, w_q, sb, bias, cfg=cfg))


def _on_sets(fns: list) -> Callable:
    """``(x, set index) -> fns[set index](x)``."""
    return lambda x, si: fns[si](x)


def _cycled(op, pairs: list):
    """``op`` on the next (input, set index) pair each call."""
    it = itertools.cycle(pairs)
    return lambda: op(*next(it))


def configs_for(m: int, n: int, k: int, sms: int) -> dict:
    """The default configuration and alternatives: the other row block, other splits."""
    from comfyquant.runtime.kernels import gluon_resident as gr

    base = gr.resident_config(m, n, k, sms)
    if base is None:
        return {}
    out = {"resident": base}
    for bm in (64, 128):
        deep = max((st for st in range(3, 9) if resident_smem(bm, 128, base.block_k, st, k) <= HOPPER_SMEM),
                   default=0)  # the deepest ring of 128-wide tiles that fits: the weight tiles come from L2
        for bn, st in ((128, 3), (64, 4), *(((128, deep),) if deep > 3 else ())):
            if resident_smem(bm, bn, base.block_k, st, k) > HOPPER_SMEM:
                continue
            tiles = math.ceil(n / bn)
            rows = math.ceil(m / bm)
            for splits in sorted({1, max(1, min(tiles, sms // rows)), max(1, min(tiles, 2 * sms // rows))}):
                cfg = gr.ResidentConfig(bm, bn, base.block_k, st, splits)
                if cfg != base:
                    out[f"r{bm}x{bn}s{st}p{splits}"] = cfg
    return out


def ws_configs_for(m: int, n: int, k: int, sms: int, alt: bool) -> dict:
    """The warp-specialized kernel's default launch (``resident_ws``) and, with ``alt``, the others worth timing:
    each tile width on its deepest ring, with one split, about one program per SM, and twice that."""
    from comfyquant.runtime.kernels import gluon_resident_ws as grw
    from comfyquant.runtime.kernels.configs import ResidentConfig, cdiv, column_splits

    base = grw.resident_ws_config(m, n, k, sms)
    if base is None:
        return {}
    out = {"resident_ws": base}
    rows = cdiv(m, grw.BLOCK_M)
    for bn in (128, 64) if alt else ():
        st = max((s for s in range(grw.WS_MIN_STAGES, grw.WS_MAX_STAGES + 1)
                  if grw.resident_ws_smem(bn, base.block_k, s, k) <= HOPPER_SMEM), default=0)
        if not st:
            continue
        tiles = cdiv(n, bn)
        for want in (1, sms // rows, 2 * sms // rows):
            splits = column_splits(tiles, max(1, min(tiles, want)))
            cfg = ResidentConfig(grw.BLOCK_M, bn, base.block_k, st, splits)
            if cfg != base:
                out[f"ws{bn}s{st}p{splits}"] = cfg
    return out


def ws_fire(w_q: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor, cfg, x0: torch.Tensor):
    """``x -> out`` on the warp-specialized resident kernel (``gluon_resident_ws``; ``cfg``: its launch, None for
    the default), as a runtime plan would launch it (``plan_resident_ws``), after a first call compiled it; where
    no plan can be made, every call through ``resident_ws_w8a8``."""
    from comfyquant.runtime.kernels import gluon_resident_ws as grw

    grw.resident_ws_w8a8(x0, w_q, sb, bias, cfg=cfg)
    plan = grw.plan_resident_ws(x0, w_q, sb, bias, x0.dtype, cfg=cfg)
    return plan or (lambda x: grw.resident_ws_w8a8(x, w_q, sb, bias, cfg=cfg))


def bench_shape(name: str, k: int, n: int, ms: list[int], min_ms: float, alt: bool, ws: bool = False,
                ws_alt: bool = False) -> list[dict]:
    from comfyquant.bench.layers import graph_time_us, wall_us
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import dispatch
    from comfyquant.runtime.kernels.launch import device_facts
    from comfyquant.runtime.kernels.triton_int8 import gemm_w8a8
    from comfyquant.runtime.kernels.triton_quant import quantize_rows_int8

    dev = torch.device("cuda")
    sms = device_facts(dev)[0]
    gen = torch.Generator(device=dev).manual_seed(k * 7 + n)
    sets = max(2, min(32, math.ceil(ROTATE_BYTES / (3 * n * k))))
    weights = []
    for _ in range(sets):
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        q, s = quantize_rowwise(w)
        weights.append((w.bfloat16(), q.contiguous(), s.reshape(-1).float().contiguous(),
                        torch.randn(n, device=dev, generator=gen).bfloat16()))
    rows = []
    for m in ms:
        x_sets = max(2, min(32, math.ceil(ROTATE_BYTES / (2 * m * k))))
        xs = []
        for i in range(x_sets):
            x = torch.randn(m, k, device=dev, generator=gen)
            x[:, (i * 37) % k] *= 40.0  # an outlier channel, as activations have
            xs.append(x.bfloat16())
        npairs = max(x_sets, sets)
        pairs = [(xs[i % x_sets], i % sets) for i in range(npairs)]
        cfgs = configs_for(m, n, k, sms)
        if not alt:
            cfgs = {kk: v for kk, v in cfgs.items() if kk == "resident"}
        row = {"shape": name, "m": m, "k": k, "n": n, "configs": {kk: vars(v) for kk, v in cfgs.items()},
               "us": {}, "graph_us": {}, "check": {}}
        # the check: bit-equal to the two-launch path, and both paths' error against float64
        x0 = xs[0]
        _, q0, s0, b0 = weights[0]
        qa, sa = quantize_rows_int8(x0, None)
        want = gemm_w8a8(qa, sa, q0, s0, b0, torch.bfloat16)
        ref = (x0.double() @ (q0.double() * s0.double()[:, None]).T + b0.double())
        fires = {}
        ws_cfgs = ws_configs_for(m, n, k, sms, ws_alt) if ws else {}  # columns of their own, checked alike
        row["configs"].update({kk: vars(v) for kk, v in ws_cfgs.items()})
        for cname, cfg in {**cfgs, **ws_cfgs}.items():
            try:
                fires[cname] = [ws_fire(w[1], w[2], w[3], None if cname == "resident_ws" else cfg, x0)
                                if cname in ws_cfgs else resident_fire(w[1], w[2], w[3], cfg, x0) for w in weights]
                got = fires[cname][0](x0)
                torch.cuda.synchronize()
            except Exception as e:  # a configuration that does not compile or launch: recorded, not timed
                fires.pop(cname, None)
                row["check"][cname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{name} M={m} {cname}: {row['check'][cname]['error']}", flush=True)
                continue
            row["check"][cname] = {"bit_equal": bool(torch.equal(got, want)),
                                   "max_abs_vs_two_launch": float((got.float() - want.float()).abs().max()),
                                   "rel_err": float((got.double() - ref).norm() / ref.norm())}
        row["check"]["two_launch_rel_err"] = float((want.double() - ref).norm() / ref.norm())
        bound = [dispatch.bind_linear("int8", weights[si][1], (weights[si][2],), weights[si][3]) for si in range(sets)]
        fused = [dispatch.bind_linear("int8", w[1], (w[2],), w[3], backend="triton_fused") for w in weights]
        ops = {"bf16": _on_sets([lambda x, w=w: F.linear(x, w[0], w[3]) for w in weights]), "auto": _on_sets(bound),
               "fused": _on_sets(fused)}
        ops.update({cname: _on_sets(f) for cname, f in fires.items()})
        for _ in range(2):
            for op in ops.values():
                for x, si in pairs:
                    op(x, si)
        torch.cuda.synchronize()
        for _ in range(3):  # interleaved rounds; the medians are kept
            for cname, op in ops.items():
                row["us"].setdefault(cname, []).append(wall_us(_cycled(op, pairs), min_ms, rounds=1))
        for cname, op in ops.items():
            row["graph_us"][cname] = graph_time_us(op, pairs)
        row["us"] = {kk: sorted(v)[len(v) // 2] for kk, v in row["us"].items()}
        row["choice"] = str(dispatch.choose_backend(x0, kind="int8", n=n, k=k))
        rows.append(row)
        b = row["us"]["bf16"]
        gb = row["graph_us"]["bf16"]
        print(f"{name:14} M={m:6} bf16 {b:7.1f} µs | " + " ".join(
            f"{c} {b / v:.2f}x" for c, v in row["us"].items() if c != "bf16") + " | graph " + " ".join(
            f"{c} {gb / v:.2f}x" for c, v in row["graph_us"].items() if c != "bf16")
            + " | equal " + ",".join(c for c, v in row["check"].items() if isinstance(v, dict) and v.get("bit_equal")),
            flush=True)
    return rows


def speedup_groups(rows: list[dict], columns: tuple[str, ...] = ("auto", "fused", "resident", "resident_ws")) -> dict:
    """``{"shape M=m": {column: eager speed-up over bf16}}`` for :func:`plot_bars`, plus the fastest alternative
    configuration of each row as ``best config`` (the resident kernel's) and ``best ws config`` (the
    warp-specialized one's)."""
    groups = {}
    for r in rows:
        us, b = r["us"], r["us"]["bf16"]
        g = {c: b / us[c] for c in columns if c in us}
        for label, prefix in (("best config", "r"), ("best ws config", "ws")):
            alts = [v for c, v in us.items() if c.startswith(prefix) and c[len(prefix):len(prefix) + 1].isdigit()]
            if alts:
                g[label] = b / min(alts)
        groups[f"{r['shape']} M={r['m']}"] = g
    return groups


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--min-ms", type=float, default=10.0)
    p.add_argument("--configs", action="store_true", help="time the alternative configurations too")
    p.add_argument("--ws", action="store_true", help="time the warp-specialized resident kernel too (K <= 1,280)")
    p.add_argument("--ws-configs", action="store_true", help="with --ws: its other launches too")
    a = p.parse_args()
    names = a.shapes.split(",")
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        print(f"bench_resident: unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    for name in names:
        k, n = SHAPES[name]
        rows += bench_shape(name, k, n, [int(v) for v in a.m.split(",")], a.min_ms, a.configs, a.ws, a.ws_configs)
        (a.out / "resident.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if rows:
        from comfyquant.bench.plot import plot_bars

        png = plot_bars(speedup_groups(rows), a.out / "resident.png", f"resident W8A8, eager wall time "
                        f"({meta['device']}, {meta['date']})", target=0.97)
        print(f"plot: {png}")
    bad = [(r["shape"], r["m"], c) for r in rows for c, v in r["check"].items()
           if isinstance(v, dict) and not v.get("bit_equal")]
    good = sum(1 for r in rows for v in r["check"].values() if isinstance(v, dict) and v.get("bit_equal"))
    print(f"bit-equal to the two-launch path: {good} configurations; not (or failed): {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
