"""Weight error of comfyquant's int4-rot / nvfp4 / mxfp8 quantizers against comfy-kitchen 0.2.40's own (CPU).

For every linear weight of a model: relative squared error ``sum ||W - W^||^2 / sum ||W||^2`` over the model, and
the worst per-layer ratio ours / comfy-kitchen's. int4-rot: comfy-kitchen's ``quantize_convrot_w4a4_weight``
(absmax / 7) vs ours (per-row MSE clip search), same rotation group. nvfp4: comfy-kitchen's ``quantize_nvfp4``
(= ours with ``scale_search=False``) vs ours (per-block e4m3 scale search). mxfp8: ours is comfy-kitchen's.
For MiniLM also the mean cosine of the sentence embeddings (weight-only: activations in float32) to the float
model's. Models: heavy-tailed synthetic Flux weights (comfyquant.testing.synthetic, size "small"), all-MiniLM-L6-v2
and the digits DiT (comfyquant/eval/assets).

    .venv/bin/python benchmarks/lowbit_weight_error.py [--sentences 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.formats import FormatShapeError, dequantize_weight, get_format, quantize_weight
from comfyquant.testing.comfyui_env import ensure_comfyui, import_comfy
from comfyquant.testing.synthetic import write_synthetic_checkpoint

DIT = Path(__file__).resolve().parents[1] / "comfyquant" / "eval" / "assets" / "digits_dit.safetensors"
Quantizer = Callable[[torch.Tensor], torch.Tensor]  # float weight -> dequantized float64 weight


def kitchen_quantizers() -> dict[str, Quantizer]:
    """comfy-kitchen's eager int4-rot and nvfp4 quantizers, returning float64 dequantized weights."""
    import_comfy(ensure_comfyui(None))
    w4 = importlib.import_module("comfy_kitchen.backends.eager.convrot_w4a4")
    q = importlib.import_module("comfy_kitchen.backends.eager.quantization")

    def int4_rot(w: torch.Tensor) -> torch.Tensor:
        group = get_format("int4-rot").resolve(tuple(w.shape))["convrot_groupsize"]
        qd, s = w4.quantize_convrot_w4a4_weight(w.float(), convrot_groupsize=group)
        return dequantize_weight({"weight": qd, "weight_scale": s},
                                 {"format": "convrot_w4a4", "convrot_groupsize": group}, torch.float64)

    def nvfp4(w: torch.Tensor) -> torch.Tensor:
        g = w.float().abs().max() / (448 * 6)
        qd, bs = q.quantize_nvfp4(w.float(), g)
        return dequantize_weight({"weight": qd, "weight_scale": bs, "weight_scale_2": g}, {"format": "nvfp4"},
                                 torch.float64)

    return {"int4-rot ck": int4_rot, "nvfp4 ck": nvfp4}


def ours(fmt: str, **options: object) -> Quantizer:
    def run(w: torch.Tensor) -> torch.Tensor:
        qw = quantize_weight(w, fmt, **options)
        return dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64)
    return run


def linear_weights(name: str) -> dict[str, torch.Tensor]:
    if name == "synthetic-flux":
        path = Path(tempfile.mkdtemp()) / "flux.safetensors"
        write_synthetic_checkpoint(path, "flux", "small", seed=7)
        sd = load_file(str(path))
    elif name == "minilm":
        from comfyquant.eval import minilm
        sd = load_file(str(minilm.weights_path()))
    else:
        sd = load_file(str(DIT))
    return {k: v for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


def measure(weights: dict[str, torch.Tensor], quantizers: dict[str, Quantizer]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for label, fn in quantizers.items():
        num = den = 0.0
        per_layer: dict[str, float] = {}
        skipped = 0
        for key, w in weights.items():
            try:
                d = fn(w)
            except (FormatShapeError, ValueError):
                skipped += 1
                continue
            w64 = w.double()
            e, n = float((d - w64).square().sum()), float(w64.square().sum())
            num, den, per_layer[key] = num + e, den + n, e / n
        out[label] = {"rel_mse": num / den if den else float("nan"), "layers": len(per_layer), "skipped": skipped,
                      "per_layer": per_layer}
    return out


def minilm_cosine(quantizers: dict[str, Quantizer], sentences: int) -> dict[str, float]:
    from comfyquant.eval import minilm

    tok = minilm.Tokenizer(minilm.model_dir())
    texts = minilm.load_sentences(sentences)
    ref_model = minilm.build_minilm()
    ref = minilm.embed(ref_model, tok, texts)
    result = {}
    for label, fn in quantizers.items():
        model = minilm.build_minilm()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(fn(mod.weight.detach()).float())
        emb = minilm.embed(model, tok, texts)
        result[label] = float((emb * ref).sum(-1).mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ck = kitchen_quantizers()
    quantizers = {"int4-rot ck": ck["int4-rot ck"], "int4-rot ours": ours("int4-rot"),
                  "nvfp4 ck": ck["nvfp4 ck"], "nvfp4 ours": ours("nvfp4"), "mxfp8 ours=ck": ours("mxfp8")}
    report: dict[str, object] = {}
    for model in ("synthetic-flux", "minilm", "digits-dit"):
        res = measure(linear_weights(model), quantizers)
        report[model] = res
        print(f"== {model}")
        for label, r in res.items():
            print(f"  {label:15s} rel_mse {r['rel_mse']:.4e}  layers {r['layers']}  skipped {r['skipped']}")
        for fmt in ("int4-rot", "nvfp4"):
            a, b = res[f"{fmt} ck"]["per_layer"], res[f"{fmt} ours"]["per_layer"]
            ratios = [b[k] / a[k] for k in a if a[k] > 0]
            print(f"  {fmt}: ours/ck total {res[fmt + ' ours']['rel_mse'] / res[fmt + ' ck']['rel_mse']:.3f}, "
                  f"per layer worst {max(ratios):.3f} best {min(ratios):.3f}")
    cos = minilm_cosine(quantizers, args.sentences)
    report["minilm_embedding_cosine"] = cos
    print("== MiniLM sentence-embedding cosine to float (weight-only)")
    for label, c in cos.items():
        print(f"  {label:15s} {c:.5f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
