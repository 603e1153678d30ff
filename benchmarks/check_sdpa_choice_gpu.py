"""GPU check and timing of the node's ``auto`` attention (``runtime.sdpa_choice`` through ``nodes.lean_attention``):
per call shape the faster of ComfyUI's kernel and cuDNN's, measured once and cached.

For the attention shapes of Flux (1024² and 512², ``skip_reshape``), SDXL (both levels' self-attention, a
cross-attention call too short to choose for), Wan 2.x 480p (32,760 tokens) and a shorter Wan call, Qwen-Image and
SD3.5 at 1024², from a cold cache:

- the call through the override (``transformer_options``) against ComfyUI's own ``attention_pytorch``: bit-equal
  where the stock kernel was chosen; where cuDNN was, bit-equal to SDPA's own cuDNN backend on the same call and
  within 1% of ComfyUI's output (two exact kernels' rounding);
- the direct cuDNN op bit-equal to ``F.scaled_dot_product_attention`` under ``sdpa_kernel([CUDNN_ATTENTION])``;
- the ``cudnn`` mode: every call of 1,024+ keys bit-equal to SDPA's cuDNN backend, through the direct op (no
  scope), shorter calls bit-equal to ComfyUI's; the ``int8-fp8`` mode: calls the int8 kernel does not take
  bit-equal to ``auto``'s (its choices), the one it takes (Wan 480p) routed through its scope;
- the cache: a second pass with the process memo dropped reads every choice back without timing (no shape measured
  again) and gives the same bits;
- each shape's measured µs per call (stock and cuDNN, synchronized wall time, and each one's host time: cuDNN is
  kept only where it saves at least the host time it adds) and the chosen kernel, and the host time of one call
  through ComfyUI and through the override.

Writes ``--out``/check_sdpa_choice.json and prints a line per shape.

    python benchmarks/check_sdpa_choice_gpu.py --out DIR [--comfyui-cache DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere
from check_lean_attention_gpu import host_us, parse_and_import

# (name, q shape, k shape, heads, call kwargs); [B, T, H * D] unless skip_reshape ([B, H, T, D]); bf16
SHAPES = [
    ("flux 1024² (4608)", (1, 24, 4608, 128), (1, 24, 4608, 128), 24, {"skip_reshape": True}),
    ("flux 512² (1536)", (1, 24, 1536, 128), (1, 24, 1536, 128), 24, {"skip_reshape": True}),
    ("sdxl self 4096x640", (2, 4096, 640), (2, 4096, 640), 10, {}),
    ("sdxl self 1024x1280", (2, 1024, 1280), (2, 1024, 1280), 20, {}),
    ("sdxl cross 4096x77", (2, 4096, 640), (2, 77, 640), 10, {}),
    ("wan 480p self (32760)", (1, 32760, 5120), (1, 32760, 5120), 40, {}),
    ("wan self (8190)", (1, 8190, 5120), (1, 8190, 5120), 40, {}),
    ("qwen-image 1024² (4096+64)", (1, 24, 4160, 128), (1, 24, 4160, 128), 24, {"skip_reshape": True}),
    ("sd3.5 1024² (4096+154)", (2, 4250, 1536), (2, 4250, 1536), 24, {}),
]


def heads_view(t: torch.Tensor, heads: int, skip: bool) -> torch.Tensor:
    """``[B, H, T, D]`` as ComfyUI's attention_pytorch makes it."""
    return t if skip else t.reshape(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)


def main(argv: list[str] | None = None) -> int:
    a = parse_and_import(argv, __doc__)
    from comfy.ldm.modules.attention import attention_pytorch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from comfyquant.nodes.attention import OVERRIDE_KEY, QuantizedAttentionOverride, policy_for
    from comfyquant.nodes.lean_attention import ComfyAttention
    from comfyquant.runtime import sdpa_choice
    from comfyquant.runtime.kernels.measured import open_cache

    dev = torch.device("cuda")
    cache_file = sdpa_choice.cache_path(dev)
    cache_file.unlink(missing_ok=True)  # a cold start: every shape measured here
    sdpa_choice.forget()
    comfy = ComfyAttention.load()
    rows, ok = [], True
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        inputs = {}
        for name, qs, ks, _, _ in SHAPES:
            q = torch.randn(qs, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(ks, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            inputs[name] = (q, k, v)
        outs: dict[str, torch.Tensor] = {}
        for name, _, _, heads, kw in SHAPES:
            q, k, v = inputs[name]
            override = QuantizedAttentionOverride(None, None, comfy, choose="measured")
            opts = {OVERRIDE_KEY: override}
            chooser = override.lean.chooser  # type: ignore[union-attr]
            want = attention_pytorch(q, k, v, heads, **kw)
            got = attention_pytorch(q, k, v, heads, **kw, transformer_options=opts)
            outs[name] = got
            skip = bool(kw.get("skip_reshape"))
            q4, k4, v4 = (heads_view(t, heads, skip) for t in (q, k, v))
            entry = open_cache(cache_file, sdpa_choice.CACHE_VERSION).entries.get(
                sdpa_choice.choice_key(q4, k4, v4, None, chooser.order, not chooser.unscoped(q4, k4, v4)))
            chose = None if entry is None else entry["backend"]
            rel = sdpa_choice.relative_difference(got, want)
            row = {"shape": name, "keys": int(k4.shape[2]), "head_dim": int(q4.shape[-1]), "choice": chose,
                   "measured": chooser.measured, "us": None if entry is None else entry["us"],
                   "notes": None if entry is None else entry.get("notes"),
                   "skipped": None if entry is None else entry["skipped"], "rel_diff_vs_comfyui": rel}
            long = int(k4.shape[2]) >= sdpa_choice.MIN_KEYS
            if long:  # SDPA's own cuDNN backend on the call, and in ComfyUI's output layout ([B, T, H * D] unless
                # skip_output_reshape, skip_reshape or not): what a call chosen for cuDNN must give
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    via_sdpa = F.scaled_dot_product_attention(q4, k4, v4)
                ref = via_sdpa.transpose(1, 2).reshape(got.shape) if got.dim() == 3 else via_sdpa
            if chose == sdpa_choice.CUDNN:
                same_op = bool(torch.equal(sdpa_choice.cudnn_attention(q4, k4, v4, None), via_sdpa))
                good = same_op and bool(torch.equal(got, ref)) and rel < 0.01 and chooser.chosen == 1
                row["direct_equals_sdpa_cudnn"] = same_op
            else:
                good = bool(torch.equal(got, want)) and chooser.chosen == 0
            good &= (entry is not None) == long
            # the cudnn mode: cuDNN's kernel through the direct op on every long call, no scope
            cud = QuantizedAttentionOverride(policy_for("cudnn"), None, comfy, choose="cudnn")
            got_c = attention_pytorch(q, k, v, heads, **kw, transformer_options={OVERRIDE_KEY: cud})
            n_c = cud.lean.chooser.chosen  # type: ignore[union-attr]
            if long:
                good_c = bool(torch.equal(got_c, ref)) and n_c == 1 and cud.cudnn == 0
            else:
                good_c = bool(torch.equal(got_c, want)) and n_c == 0
            # int8-fp8: auto's kernel on what the int8 kernel does not take, the int8 kernel's scope on the rest
            i8 = QuantizedAttentionOverride(policy_for("int8-fp8"), None, comfy, choose="measured")
            got_i = attention_pytorch(q, k, v, heads, **kw, transformer_options={OVERRIDE_KEY: i8})
            routed = i8.may_route(q, k, v, heads, None, None, skip)
            good_i = i8.routed == 1 if routed else bool(torch.equal(got_i, got)) and i8.routed == 0
            row.update({"cudnn_mode_pass": good_c, "int8_fp8_mode_pass": good_i, "int8_fp8_routed": routed})
            good &= good_c and good_i
            n = 50 if q.numel() <= 8 << 20 else 5
            row["host_us_comfyui"] = host_us(lambda: attention_pytorch(q, k, v, heads, **kw), n)  # noqa: B023
            row["host_us_auto"] = host_us(
                lambda: attention_pytorch(q, k, v, heads, **kw, transformer_options=opts), n)  # noqa: B023
            row["pass"] = good
            ok &= good
            rows.append(row)
            us, notes = row["us"] or {}, row["notes"] or {}
            print(f"{'PASS' if good else 'FAIL'} {name:28s} choice={chose} stock={us.get('stock', 0):9.1f} µs "
                  f"(host {notes.get('host_us_stock', '-')}) cudnn={us.get('cudnn', 0):9.1f} µs (host "
                  f"{notes.get('host_us_cudnn', '-')}) rel={rel:.2e} host/call ComfyUI {row['host_us_comfyui']:.1f} "
                  f"auto {row['host_us_auto']:.1f} µs; cudnn mode {'ok' if good_c else 'FAIL'}, int8-fp8 mode "
                  f"{'ok' if good_i else 'FAIL'}{' (routed)' if routed else ''} {row['skipped'] or ''}", flush=True)
        # the cache: a new process's view (memo dropped, the file read again) decides the same without timing
        sdpa_choice.forget()
        again_ok = True
        for name, _, _, heads, kw in SHAPES:
            q, k, v = inputs[name]
            override = QuantizedAttentionOverride(None, None, comfy, choose="measured")
            got = attention_pytorch(q, k, v, heads, **kw, transformer_options={OVERRIDE_KEY: override})
            same = bool(torch.equal(got, outs[name])) and override.lean.chooser.measured == 0  # type: ignore[union-attr]
            again_ok &= same
            if not same:
                print(f"FAIL {name}: the cached choice gave other bits or was timed again", flush=True)
        ok &= again_ok
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_sdpa_choice.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "comfy_order": comfy.order, "cache_reread_same": again_ok, "rows": rows,
        "cache": json.loads(cache_file.read_text()) if cache_file.is_file() else None}, indent=1))
    print(f"{sum(r['pass'] for r in rows)}/{len(rows)} shapes passed; cache re-read same: {again_ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
