"""The W4A8 (``int4_rot``) GEMM in each operand order against cuBLAS bf16 and the int8 W8A8 GEMM: GPU time of
CUDA-graph replays with the weights cycled past L2, on Flux / Wan / SDXL / T5 layers at M 1 .. 16,384, each
kernel on the runtime's tile and on others. ``w4a8_swapped`` takes the unpacked weight as wgmma's register
operand (no shared-memory round trip per K step); ``w4a8_joined`` does too with both nibbles in one MMA per K step
on unpermuted codes (K steps of 128 or 256); ``unpacked`` writes the int8 codes out and runs the W8A8 GEMM on
them (the runtime's path from 256 rows, ``triton_unpack``). All must equal each other bit for bit (the same
integer sums). Every
(tile, kernel) is first run once and checked against an exact float64 product of the same codes before it is
timed; ``--isolate`` runs that first check of each tile in a subprocess of its own (a kernel that faults leaves
the CUDA context unusable, so a faulting tile is recorded and left out instead of ending the run).

    python benchmarks/bench_w4a8.py --out results/ [--isolate]     # a CUDA GPU (Hopper for wgmma)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"flux.qkv": (3072, 9216), "flux.proj": (3072, 3072), "flux.mlp2": (12288, 3072),
          "wan.ffn0": (5120, 13824), "sdxl.attn1280": (1280, 1280), "t5.ff0": (4096, 10240)}
M_VALUES = (1, 16, 256, 1024, 4096, 16384)
L2_PAST = 200 << 20
# bm (activation rows), bn (weight rows: wgmma's M in the swapped order), warps, stages; the 4-warp tiles with 64
# weight rows keep the accumulator at 64 registers a thread, so two or three programs share an SM and one's
# unpacking overlaps another's MMA (Triton waits on each wgmma whose operand is in registers)
TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 4), (128, 64, 4, 4),
         (256, 64, 4, 3), (64, 64, 4, 4), (128, 128, 4, 3), (256, 128, 8, 3), (64, 256, 8, 3))


# timed kernels: name -> (operand order, K step, activation codes: "perm" K-permuted per block or "natural")
KERNELS = {"w4a8": ("plain", 128, "perm"), "w4a8_swapped": ("swapped", 128, "perm"),
           "w4a8_joined": ("joined", 128, "natural"), "w4a8_joined_k256": ("joined", 256, "natural")}


def _w4a8(qx: torch.Tensor, sx: torch.Tensor, w: tuple, cfg: object, order: str) -> torch.Tensor:
    """One W4A8 GEMM launch on the quantized activations (K permuted for the orders that split nibbles) in the
    given operand order and tile."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    out = torch.empty(qx.shape[0], w[1].shape[0], dtype=torch.bfloat16, device=qx.device)
    grid, args, key = ti._w4a8_launch(qx, sx, w[1], w[2], None, out, cfg, ti._low_rank_args(None, qx, w[2]))
    ti.W4A8_KERNELS[order](grid, args, qx.device, num_warps=cfg.warps, num_stages=cfg.stages, key=key)
    return out


def _w8a8(qx: torch.Tensor, sx: torch.Tensor, w: tuple) -> torch.Tensor:
    from comfyquant.runtime.kernels import triton_int8 as ti

    return ti.gemm_w8a8(qx, sx, w[3], w[4], None, torch.bfloat16)


def _unpacked(qx: torch.Tensor, sx: torch.Tensor, w: tuple) -> torch.Tensor:
    """int4_rot as the runtime runs it from 256 rows (``triton_unpack``): the codes unpacked into the stream's
    workspace, then the W8A8 GEMM on them (natural-order activation codes)."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_unpack as tu

    w8 = tu.unpack_int4_into(w[1], tu._workspace_codes(w[1], torch.cuda.current_stream().cuda_stream))
    return ti.gemm_w8a8(qx, sx, w8, w[2], None, torch.bfloat16)


def _w4a16(x: torch.Tensor, w: tuple) -> torch.Tensor:
    """int4_rot's weight-only path at 1-16 rows (the GEMM alone: x as given, no rotation pass)."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    return ti.w8a16_linear(x, w[1], w[2], None, None, torch.bfloat16, packed=True)


def _reference(qx: torch.Tensor, sx: torch.Tensor, w: tuple) -> torch.Tensor:
    """The W4A8 product from the unpermuted codes in float64 (exact integer sums, then both scales)."""
    from comfyquant.quant.int4 import unpack_int4

    return (qx.double() @ unpack_int4(w[1]).double().T) * sx.double().reshape(-1, 1) * w[2].double()[None, :]


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """bf16 output within two bf16 steps of the exact product's scale (a wrong tile is off by O(1))."""
    return bool((y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max().clamp_min(1e-30))


def _ratio(us: dict, kern: str, label: str | None = None) -> str:
    """bf16's time over ``kern``'s at ``label`` (the best of its tiles if None), or "-" where none was timed."""
    t = [v for c, v in us.items() if c.startswith(kern + "@") and (label is None or c == f"{kern}@{label}")]
    return f"{us['bf16'] / min(t):.2f}x" if t else "-"


def _tiles(m: int, n: int, k: int) -> dict:
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import TileConfig, fit_stages

    return {"runtime": ti.w4a8_config(m, n, k, torch.device("cuda")),
            **{f"{bm}x{bn}w{wp}s{st}": fit_stages(TileConfig(bm, bn, 128, wp, st, 8), 1, 1)
               for bm, bn, wp, st in TILES}}


def _layer(name: str, m: int, sets: int, seed: int) -> tuple:
    """(x, its W4A8 codes and scales (K permuted), the unpermuted W8A8 codes, weight sets) for one layer."""
    from comfyquant.quant.int4 import pack_int4
    from comfyquant.quant.int8 import quantize_rowwise
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.triton_gemm import PERM_BLOCK

    k, n = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws = []
    for _ in range(sets):
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        s4 = (w.abs().amax(dim=1, keepdim=True) / 7.0).clamp_min(1e-12)
        q8, s8 = quantize_rowwise(w)
        ws.append((w.bfloat16(), pack_int4(torch.round(w / s4).clamp(-7, 7).to(torch.int8)), s4.reshape(-1), q8, s8))
        del w
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    qx, sx = tq.quantize_rows_int8(x, None, perm=PERM_BLOCK)
    q8x, s8x = tq.quantize_rows_int8(x, None)
    return x, qx, sx, q8x, s8x, ws


def _probe(name: str, m: int, label: str, kern: str) -> int:
    """One (tile, order) launched once and checked against the float64 product: rc 0 right, 1 wrong (a fault
    ends the process with CUDA's error)."""
    from comfyquant.runtime.kernels.configs import fit_stages

    _, qx, sx, q8x, s8x, ws = _layer(name, m, 1, 7)
    cfg = _tiles(m, *SHAPES[name][::-1])[label]
    order, bk, codes = KERNELS[kern]
    q_in = (qx, sx) if codes == "perm" else (q8x, s8x)
    y = _w4a8(*q_in, ws[0], fit_stages(dataclasses.replace(cfg, block_k=bk), 1, 1), order)
    torch.cuda.synchronize()
    return 0 if _close(y, _reference(q8x, s8x, ws[0])) else 1


def _isolated(labels: list[str]) -> dict[str, str]:
    """Each (tile, order) probed in a subprocess at 16 and 256 rows of Flux qkv: label@order -> "ok" / why not."""
    import subprocess

    verdict = {}
    for label in labels:
        for kern in KERNELS:
            if kern == "w4a8" and label != "runtime":
                continue  # timed on their own tile only
            why = "ok"
            for m in (16, 256):
                r = subprocess.run([sys.executable, __file__, "--probe", f"flux.qkv,{m},{label},{kern}"],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode:
                    tail = (r.stderr.strip().splitlines() or ["wrong values"])[-1]
                    why = f"M={m}: rc {r.returncode}: {tail[:160]}"
                    break
            verdict[f"{kern}@{label}"] = why
            print(f"probe {kern}@{label}: {why}", flush=True)
    return verdict


def plot(rows: list[dict], path: Path, title: str, tile: object = None) -> Path:
    """bf16's GPU time over each kernel's from 256 rows: the plain order on the runtime tile, the others on the
    tile ``tile(m, n, k)`` names (None: "runtime") and on their best tile, and the W8A8 GEMM for scale."""
    from comfyquant.bench.plot import plot_bars

    groups = {}
    for r in rows:
        if r["m"] < 256:
            continue
        us, label = r["us"], tile(r["m"], r["n"], r["k"]) if tile else "runtime"
        g = {"int8 W8A8 GEMM": us["bf16"] / us["w8a8_gemm"]}
        for kern, name in (("w4a8", "plain order (the run's runtime tile)"), ("w4a8_swapped", "swapped"),
                           ("w4a8_joined", "joined")):
            own = kern == "w4a8"  # timed on its own tile only
            at = us.get(f"{kern}@{'runtime' if own else label}")
            if at:
                g[f"W4A8 {name}" + ("" if own else ", rule's tile")] = us["bf16"] / at
        if us.get("unpacked@runtime"):
            g["int4 unpacked + W8A8 GEMM (the runtime's path)"] = us["bf16"] / us["unpacked@runtime"]
        best = [v for c, v in us.items() if c.split("@")[0] in ("w4a8_swapped", "w4a8_joined")]
        if best:
            g["W4A8 best measured"] = us["bf16"] / min(best)
        groups[f"{r['layer']} M={r['m']}"] = g
    return plot_bars(groups, path, title, xlabel="× bf16 GPU time (CUDA-graph replay), same run")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--isolate", action="store_true", help="probe every tile in a subprocess first")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of row counts")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # layer,m,label,kernel: one checked launch (for --isolate)
    a = p.parse_args()
    if a.probe:
        name, m, label, kern = a.probe.split(",")
        return _probe(name, int(m), label, kern)
    if a.out is None:
        p.error("--out is required")
    from comfyquant.bench.layers import graph_time_us
    from comfyquant.runtime.kernels.configs import fit_stages

    t0 = time.perf_counter()
    probed = _isolated(list(_tiles(16, 9216, 3072))) if a.isolate else {}
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (k, n) in SHAPES.items():
        sets = max(2, min(16, L2_PAST // (n * k)))
        for m in (int(v) for v in a.m.split(",")):
            if time.perf_counter() - t0 > a.budget_s:
                print(f"out of time before {name} M={m}", flush=True)
                break
            x, qx, sx, q8x, s8x, ws = _layer(name, m, sets, k + n + m)
            ref = _reference(q8x, s8x, ws[0])
            row = {"layer": name, "m": m, "k": k, "n": n, "us": {}, "wrong": [], "left_out": {}}
            row["us"]["bf16"] = graph_time_us(lambda x, w: F.linear(x, w[0]), [(x, w) for w in ws])
            row["us"]["w8a8_gemm"] = graph_time_us(_w8a8, [(q8x, s8x, w) for w in ws])
            outs = {}
            for label, cfg in _tiles(m, n, k).items():
                for kern, (order, bk, codes) in KERNELS.items():
                    key = f"{kern}@{label}"
                    if ((m < 256 or kern == "w4a8") and label != "runtime") or k % bk:
                        continue  # thin M and the plain order: the runtime's tile only (known from run 65)
                    if probed.get(key, "ok") != "ok":
                        row["left_out"][key] = probed[key]
                        continue
                    c = fit_stages(dataclasses.replace(cfg, block_k=bk), 1, 1)
                    q_in = (qx, sx) if codes == "perm" else (q8x, s8x)
                    try:  # checked before it is timed
                        y = _w4a8(*q_in, ws[0], c, order)
                    except Exception as e:  # a compile that does not fit (shared memory, registers): recorded
                        row.setdefault("failed", {})[key] = str(e).splitlines()[0][:200]
                        continue
                    torch.cuda.synchronize()
                    outs[key] = y
                    if not _close(y, ref):
                        row["wrong"].append(key)
                        continue
                    row["us"][key] = graph_time_us(functools.partial(_w4a8, cfg=c, order=order),
                                                   [(*q_in, w) for w in ws])
            if m <= 16:  # weight-only on the packed codes: bf16 x against the dequantized weight
                from comfyquant.quant.int4 import unpack_int4

                y16 = _w4a16(x, ws[0])
                ref16 = x.double() @ (unpack_int4(ws[0][1]).double() * ws[0][2].double()[:, None]).T
                if _close(y16, ref16):
                    row["us"]["w4a16@runtime"] = graph_time_us(_w4a16, [(x, w) for w in ws])
                else:
                    row["wrong"].append("w4a16@runtime")
            y = _unpacked(q8x, s8x, ws[0])
            torch.cuda.synchronize()
            outs["unpacked@runtime"] = y
            if _close(y, ref):
                row["us"]["unpacked@runtime"] = graph_time_us(_unpacked, [(q8x, s8x, w) for w in ws])
            else:
                row["wrong"].append("unpacked@runtime")
            same = all(torch.equal(y, outs["w4a8@runtime"]) for y in outs.values()) if "w4a8@runtime" in outs \
                else False
            row["bit_equal"] = same
            us = row["us"]

            print(f"{name:14s} M={m:6d} bf16 {us['bf16']:8.1f}  w8a8 {us['bf16'] / us['w8a8_gemm']:.2f}x  "
                  f"w4a8 runtime {_ratio(us, 'w4a8', 'runtime')} best {_ratio(us, 'w4a8')}  swapped runtime "
                  f"{_ratio(us, 'w4a8_swapped', 'runtime')} best {_ratio(us, 'w4a8_swapped')}  joined runtime "
                  f"{_ratio(us, 'w4a8_joined', 'runtime')} best {_ratio(us, 'w4a8_joined')}  k256 best "
                  f"{_ratio(us, 'w4a8_joined_k256')}  unpacked {_ratio(us, 'unpacked')}  "
                  f"w4a16 {_ratio(us, 'w4a16')}  "
                  f"bit-equal {same}"
                  + (f"  WRONG {row['wrong']}" if row["wrong"] else ""), flush=True)
            rows.append(row)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "command": " ".join(sys.argv)}
    (a.out / "w4a8.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / "w4a8_probes.json").write_text(json.dumps(probed, indent=1))
    if rows:
        plot(rows, a.out / "w4a8.png", f"W4A8 GEMM vs bf16, {meta['device']}, {meta['date_utc']}")
    # the runtime's own tile must be right in both orders; other tiles' failures are findings, recorded
    return 0 if all(r["bit_equal"] and not any(w.endswith("@runtime") for w in r["wrong"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
