"""GPU check and host timing of the node's default attention (``nodes.lean_attention``): ComfyUI's own
``attention_pytorch`` calls computed without its per-call backend-order scope where SDPA picks the same kernel.

For the attention shapes of SDXL (self- and cross-attention at both levels), Flux (``skip_reshape``), Wan 2.x,
an fp32 call (a text encoder's) and a masked one, in bf16 / fp16: ComfyUI's function against the same call
through the override (``transformer_options``): outputs bit-equal, and whether the lean path took the call
(it must take the calls FlashAttention runs; the fp32 and masked ones it takes where SDPA's order and
ComfyUI's pick the same backend for them). Then each call's host time
(the call's wall time without a sync, many calls, the GPU keeping up on the small shapes) both ways. Writes
``--out``/check_lean_attention.json and prints a line per shape.

    python benchmarks/check_lean_attention_gpu.py --out DIR [--comfyui-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from bench_comfyui_flux import _import_comfy

# (name, q shape, k shape, heads, call kwargs, dtype); [B, T, H * D] unless skip_reshape ([B, H, T, D])
SHAPES = [
    ("sdxl self 4096x640", (2, 4096, 640), (2, 4096, 640), 10, {}, torch.bfloat16),
    ("sdxl cross 4096x77", (2, 4096, 640), (2, 77, 640), 10, {}, torch.bfloat16),
    ("sdxl self 1024x1280", (2, 1024, 1280), (2, 1024, 1280), 20, {}, torch.bfloat16),
    ("sdxl cross 1024x77 fp16", (2, 1024, 1280), (2, 77, 1280), 20, {}, torch.float16),
    ("flux 4608 skip_reshape", (1, 24, 4608, 128), (1, 24, 4608, 128), 24, {"skip_reshape": True}, torch.bfloat16),
    ("wan self 8190", (1, 8190, 5120), (1, 8190, 5120), 40, {}, torch.bfloat16),
    ("t5 fp32 256", (1, 256, 4096), (1, 256, 4096), 64, {}, torch.float32),
    ("masked 1024", (2, 1024, 1280), (2, 1024, 1280), 20, {"mask": True}, torch.bfloat16),
]
# calls whose backend may differ between ComfyUI's order and SDPA's (a mask cuDNN takes, fp32): either way the
# output must be ComfyUI's; every other call must be taken (FlashAttention first in both orders)
EITHER = ("t5 fp32 256", "masked 1024")


def host_us(fn: Any, n: int) -> float:
    """Median of 5 rounds of ``n`` calls' wall time per call, no sync inside a round (host time where the GPU
    keeps up)."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def sdpa_choices(order: list[int] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 kw: dict) -> dict:
    """The backend SDPA itself selects for the call (``torch._fused_sdp_choice``) inside ComfyUI's scope and in
    the current state, and what ``lean_attention`` predicts for each (its ``_first``), as ``SDPBackend`` ints."""
    from torch.nn.attention import sdpa_kernel

    from comfyquant.nodes.lean_attention import _first

    if kw.get("skip_reshape"):
        q4, k4, v4 = q, k, v
    else:
        b, d = q.shape[0], q.shape[-1] // heads
        q4, k4, v4 = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    mask = kw.get("mask")
    if mask is not None:
        mask = mask.reshape(1, 1, *mask.shape[-2:])
    params = torch.backends.cuda.SDPAParams(q4, k4, v4, mask, 0.0, False, False)
    now = int(torch._fused_sdp_choice(q4, k4, v4, mask))
    out = {"choice_now": now, "predicted_now": _first(list(torch._C._get_sdp_priority_order()), params),
           "priority_now": list(torch._C._get_sdp_priority_order())}
    if order is not None:
        with sdpa_kernel([torch.nn.attention.SDPBackend(b) for b in order], set_priority=True):
            out["choice_comfyui"] = int(torch._fused_sdp_choice(q4, k4, v4, mask))
        out["predicted_comfyui"] = _first(order, params)
    return out


def parse_and_import(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """``--out`` and ``--comfyui-cache`` parsed, ComfyUI imported for a CUDA run (the attention checks' start)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--comfyui-cache", default=None)
    a = p.parse_args(argv)
    _import_comfy(a.comfyui_cache, "cuda", False)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_and_import(argv, __doc__)
    from comfy.ldm.modules.attention import attention_pytorch

    from comfyquant.nodes.attention import OVERRIDE_KEY, QuantizedAttentionOverride
    from comfyquant.nodes.lean_attention import ComfyAttention

    comfy = ComfyAttention.load()
    override = QuantizedAttentionOverride(None, None, comfy)
    opts = {OVERRIDE_KEY: override}
    rows, ok = [], True
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        # the first shape again last: a difference on the process's first SDPA call only would show here
        for name, qs, ks, heads, kw, dt in [*SHAPES, (SHAPES[0][0] + " again", *SHAPES[0][1:])]:
            q = torch.randn(qs, device="cuda", dtype=dt, generator=g)
            k, v = (torch.randn(ks, device="cuda", dtype=dt, generator=g) for _ in range(2))
            kw = dict(kw)
            if kw.pop("mask", False):
                kw["mask"] = torch.zeros(qs[1], ks[1], device="cuda", dtype=dt)
            want = attention_pytorch(q, k, v, heads, **kw)
            again = attention_pytorch(q, k, v, heads, **kw)  # ComfyUI against itself: is the kernel deterministic
            before = override.lean.calls  # type: ignore[union-attr]
            got = attention_pytorch(q, k, v, heads, **kw, transformer_options=opts)
            took = override.lean.calls > before  # type: ignore[union-attr]
            equal = bool(torch.equal(got, want))
            choices = sdpa_choices(comfy.order, q, k, v, heads, kw)
            good = equal and (took or name in EITHER)
            ok &= good
            n = 200 if q.numel() <= 4 << 20 else 20
            comfy_us = host_us(lambda: attention_pytorch(q, k, v, heads, **kw), n)  # noqa: B023
            lean_us = host_us(lambda: attention_pytorch(q, k, v, heads, **kw, transformer_options=opts), n)  # noqa: B023
            rows.append({"shape": name, "equal": equal, "lean": took, "pass": good, "comfyui_us": comfy_us,
                         "lean_us": lean_us, "comfyui_deterministic": bool(torch.equal(again, want)), **choices})
            print(f"{'PASS' if good else 'FAIL'} {name:26s} equal={equal} lean={took} host/call: ComfyUI "
                  f"{comfy_us:7.1f} µs, lean {lean_us:7.1f} µs; {choices}, ComfyUI deterministic "
                  f"{rows[-1]['comfyui_deterministic']}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_lean_attention.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "comfy_order": comfy.order,
        "rows": rows}, indent=1))
    print(f"{sum(r['pass'] for r in rows)}/{len(rows)} checks passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
