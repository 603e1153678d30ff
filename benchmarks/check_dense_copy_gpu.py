"""GPU check of dense 16-bit copies (``runtime.kernels.dense_copy``) on this device's own cost table.

For layer shapes at the row counts their models run them (SDXL's attention projections at both levels, CLIP-L's,
Flux's qkv), int8 (plain and rotated) and fp8 weights bound under a policy with a copy budget: which path the
dispatcher takes (the copy where the device's cost model puts the best quantized path over bf16, else that path), the
copy's output against ``F.linear`` on the kind's dequantized weight (bit-equal for unrotated int8 / fp8: the copy is
the dequantize kernel's bf16 weight), a CUDA-graph capture and replay of the bound call (the copy made before the
capture is used, none is made inside it), the budget's bytes, and the dispatch report's row for a ``QuantLinear``
under the same policy. Speed is the sweep's ``auto_copy`` column. Writes ``--out``/check_dense_copy.json.

    python benchmarks/check_dense_copy_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.quant.hadamard import choose_group_size, rotate_weight
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.kernels import dense_copy, dispatch
from comfyquant.runtime.kernels.policy import DispatchPolicy

# (name, M, K, N)
SHAPES = [
    ("sdxl attn640 x8192", 8192, 640, 640),
    ("sdxl attn1280 x2048", 2048, 1280, 1280),
    ("sdxl ff2 x2048", 2048, 5120, 1280),
    ("clip attn x154", 154, 768, 768),
    ("clip fc2 x1024", 1024, 3072, 768),
    ("flux qkv x4096", 4096, 3072, 9216),
]


def check(name: str, m: int, k: int, n: int, form: str) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(m * 7 + k + n)
    w = torch.randn(n, k, device=dev, generator=gen) * 0.02
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
    group = choose_group_size(k) if form == "int8-rot" else 0
    if form == "fp8":
        q, s = quantize_fp8(w)
        kind, scales, opts = "fp8", (s, None), ()
        ref_w = (q.float() * s.float()).to(torch.bfloat16)
    else:
        q, s = quantize_rowwise(rotate_weight(w, group) if group else w)
        kind, scales, opts = "int8", (s,), (group,)
        # unrotated: the dequantize kernel's weight; rotated: the copy's own math in float32, rounded once
        ref_w = (q.float() * s.float() if not group else
                 dense_copy.dense_weight(dispatch.kernel_kind("int8"), q, scales, opts, torch.float32)).to(torch.bfloat16)
    budget = dense_copy.CopyBudget(1 << 40)
    policy = DispatchPolicy(copies=budget)
    auto = dispatch.choose_backend(x, kind=kind, n=n, k=k, opts=opts)
    call = dispatch.bind_linear(kind, q, scales, bias, opts=opts, backend=policy)
    y1 = call(x)
    y2 = call(x)  # the plan
    is_copied = dense_copy.has_copy(q, torch.bfloat16)
    rec = {"shape": name, "form": form, "m": m, "k": k, "n": n, "auto": auto.name, "auto_us": auto.us,
           "bf16_us": auto.bf16_us, "wants_copy": dense_copy.wants_copy(auto), "copied": is_copied,
           "budget": budget.summary(), "ok": True, "notes": []}
    if is_copied != dense_copy.wants_copy(auto):
        rec["ok"] = False
        rec["notes"].append("the copy does not follow the cost model's verdict")
    if is_copied:
        want = F.linear(x, ref_w, bias)
        exact = form != "int8-rot"
        diff = float((y1.float() - want.float()).abs().max())
        rel = float((y1.float() - want.float()).norm() / want.float().norm())
        rec.update(max_abs_diff=diff, rel=rel)
        if (exact and diff != 0.0) or rel > 1e-2 or not torch.equal(y1, y2):
            rec["ok"] = False
            rec["notes"].append(f"copy output off: max |diff| {diff:.3g}, rel {rel:.3g}")
        if budget.used_bytes != n * k * 2:
            rec["ok"] = False
            rec["notes"].append(f"budget counts {budget.used_bytes} bytes, the copy has {n * k * 2}")
        # a CUDA graph of the bound call replays the copy made before it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = call(x)
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(yg, y1):
            rec["ok"] = False
            rec["notes"].append("graph replay differs from the eager call")
        rec["graph"] = "ok" if torch.equal(yg, y1) else "differs"
    return rec


def report_row() -> dict:
    """The dispatch report of a one-layer QuantLinear model under a copy budget names the dense-copy path."""
    from comfyquant.runtime.dispatch_report import describe_dispatch
    from comfyquant.runtime.quantize import QuantizeConfig, quantize_

    budget = dense_copy.CopyBudget(1 << 30)
    model = torch.nn.Sequential(torch.nn.Linear(640, 640)).cuda().to(torch.bfloat16)
    quantize_(model, QuantizeConfig(format="int8", backend=DispatchPolicy(copies=budget), min_features=1))
    x = torch.randn(8192, 640, device="cuda", dtype=torch.bfloat16)
    rows = describe_dispatch(model, x)
    return {"backend": rows[0].backend, "reason": rows[0].reason, "budget": budget.summary()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for name, m, k, n in SHAPES:
        for form in ("int8", "int8-rot", "fp8"):
            if form == "int8-rot" and not choose_group_size(k):
                continue
            try:
                r = check(name, m, k, n, form)
            except Exception as e:  # recorded and counted as a failure, never hidden
                r = {"shape": name, "form": form, "ok": False, "notes": [f"{type(e).__name__}: {e}"]}
            recs.append(r)
            print(f"{'PASS' if r['ok'] else 'FAIL'} {name:22s} {form:8s} auto={r.get('auto')} "
                  f"{r.get('auto_us') or 0:.1f} vs bf16 {r.get('bf16_us') or 0:.1f} us copied={r.get('copied')} "
                  f"rel={r.get('rel', 0):.2e} graph={r.get('graph', '-')} {'; '.join(r['notes'])}", flush=True)
    try:
        rep = report_row()
        rep_ok = rep["backend"] == dense_copy.NAME
    except Exception as e:  # recorded as a failure
        rep, rep_ok = {"error": f"{type(e).__name__}: {e}"}, False
    print(f"{'PASS' if rep_ok else 'FAIL'} dispatch report: {rep}", flush=True)
    n_ok = sum(r["ok"] for r in recs) + rep_ok
    print(f"{n_ok}/{len(recs) + 1} checks passed", flush=True)
    (out / "check_dense_copy.json").write_text(json.dumps({"checks": recs, "report": rep}, indent=1))
    return 0 if n_ok == len(recs) + 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
