"""Where MiniLM's int8 (W8A8) error comes from: weight rounding vs per-token activation quantization.

For each quantized MiniLM file (from ``comfyquant eval --model minilm ...``): sentence-embedding cosine to the
float32 model (mean / min over the 213 eval sentences) with the file run as the eval runs it (W8A8: per-token
int8 activations), and with its weights dequantized and float32 activations (weight-only). Then, on the float
model, the activation quantization alone (float weights, per-token int8 inputs, rotated first for int8-rot)
for all quantized layers and for each group of layers by what feeds them: post-LN LayerNorm outputs (query /
key / value / intermediate), attention outputs (attention.output.dense), GELU outputs (output.dense). A
weight-rounding optimizer can only close the weight-only part; the activation part is the floor it leaves.

    .venv/bin/python benchmarks/minilm_error_split.py q/minilm-int8-*/minilm-int8.safetensors [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.eval.metrics import cosine
from comfyquant.eval.minilm import Tokenizer, build_minilm, embed, empty_minilm, load_sentences, model_dir
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.quant.int8 import quantize_rowwise
from comfyquant.runtime.loader import load_quantized_report

GROUPS = {  # what produces each layer's input
    "LayerNorm-fed (query/key/value, intermediate)": r"(attention\.self\.(query|key|value)|intermediate\.dense)$",
    "attention-fed (attention.output.dense)": r"attention\.output\.dense$",
    "GELU-fed (output.dense)": r"\d\.output\.dense$",
}


def fake_quant_tokens(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """Per-token int8 round trip of ``x`` (float32), in the Hadamard-rotated basis when ``group`` is set."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if group:
        x2 = fast_hadamard(x2, group)
    q, s = quantize_rowwise(x2)
    y = q.float() * s
    if group:
        y = fast_hadamard(y, group)  # the regular Hadamard is symmetric and orthogonal: its own inverse
    return y.reshape(x.shape).to(x.dtype)


def with_act_quant(model: nn.Module, layers: dict[str, int | None], rotate: bool) -> list:
    """Forward pre-hooks that quantize the inputs of ``layers`` (name -> convrot group), rotated by each layer's
    own group when ``rotate``; returns the handles (remove them after)."""
    mods = dict(model.named_modules())

    def hook(group: int | None):
        return lambda _m, a: (fake_quant_tokens(a[0], group), *a[1:])

    return [mods[n].register_forward_pre_hook(hook(g if rotate else None)) for n, g in layers.items()]


def quantized_layers(path: Path) -> tuple[dict[str, int | None], str]:
    """Quantized layers of a file, each with its convrot group (None: not rotated), and the ComfyUI format(s).

    int8-rot chooses the group per layer (it depends on K), so one file can hold several group sizes."""
    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if k.endswith(".comfy_quant")]
        confs = {k[: -len(".comfy_quant")]: decode_comfy_quant(f.get_tensor(k)) for k in keys}
    fmts = {c["format"] for c in confs.values()}
    groups = {n: (c.get("convrot_groupsize") if c.get("convrot") else None) for n, c in sorted(confs.items())}
    return groups, "/".join(sorted(fmts))


def cos_stats(vec: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    c = cosine(vec, ref)
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    sents, tok = load_sentences(), Tokenizer(model_dir())
    ref_model = build_minilm()
    ref = embed(ref_model, tok, sents)
    run: Callable[[nn.Module], torch.Tensor] = lambda m: embed(m, tok, sents)  # noqa: E731
    out: dict = {"files": {}, "activation_only": {}}
    rows = []
    for path in args.files:
        layers, fmt = quantized_layers(path)
        full, _ = load_quantized_report(empty_minilm(), path, compute_dtype=torch.float32)
        wonly, _ = load_quantized_report(empty_minilm(), path, compute_dtype=torch.float32, backend="dequant")
        r = {"format": fmt, "layers": len(layers), "w8a8": cos_stats(run(full.eval()), ref),
             "weight_only": cos_stats(run(wonly.eval()), ref)}
        out["files"][str(path)] = r
        rows.append((path.parent.name, r["w8a8"], r["weight_only"]))
        rotated = any(g is not None for g in layers.values())
        for label, rotate in (("per-token int8", False), ("rotated, per-token int8", True)):
            if rotate and not rotated:
                continue
            for gname, pat in {"all quantized layers": ".", **GROUPS}.items():
                key = f"{label}: {gname}"
                if key in out["activation_only"]:
                    continue
                sel = {n: g for n, g in layers.items() if re.search(pat, n)}
                hooks = with_act_quant(ref_model, sel, rotate)
                try:
                    out["activation_only"][key] = {"layers": len(sel), **cos_stats(run(ref_model), ref)}
                finally:
                    for h in hooks:
                        h.remove()
    print("| file | W8A8 cosine mean / min | weight-only cosine mean / min |\n| --- | --- | --- |")
    for name, a, b in rows:
        print(f"| {name} | {a['mean']:.5f} / {a['min']:.5f} | {b['mean']:.5f} / {b['min']:.5f} |")
    print("\n| activations quantized (float weights) | layers | cosine mean / min |\n| --- | --- | --- |")
    for k, v in out["activation_only"].items():
        print(f"| {k} | {v['layers']} | {v['mean']:.5f} / {v['min']:.5f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
