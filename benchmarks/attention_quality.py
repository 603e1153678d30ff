"""What int8 attention costs in image quality on a trained model: the digits DiT (Flux layout, the eval
harness's model) sampled with float attention and with the int8 attention scheme (``runtime.attention``'s
``emulate``: the scheme's float64 reference on the CPU, the kernel's 128 x 64 blocks; p v exact), with and
without int8 linears, PSNR / class accuracy against the float model's samples at the same seeds.

The GPU kernel computes the same scheme (``triton_interp_attention``: within 2.3e-4 of that reference, the
rest is p's bf16 rounding); the fp8 p v variant is not emulated here. The DiT's sequences are short (16 image +
text tokens), so each head's q and k are one block: a coarser scale than long sequences get.

    python benchmarks/attention_quality.py --out /tmp/attnq         # CPU, about a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.eval import metrics as M
from comfyquant.eval.classifier import train_classifier
from comfyquant.eval.data import load_digits
from comfyquant.eval.plots import _figure, _save
from comfyquant.eval.sampling import class_labels, initial_noise, sample
from comfyquant.eval.workloads import DigitsWorkload
from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention
from comfyquant.runtime.quantize import QuantizeConfig, quantize_

VARIANTS = (("float", False, False), ("int8 attention", False, True), ("int8 linears", True, False),
            ("int8 linears + int8 attention", True, True))


def run(per_class: int, steps: int, seed: int) -> list[dict]:
    """Sample every variant from the same noise; PSNR / accuracy against the float samples."""
    work = DigitsWorkload()
    n_cls = work.float_model().cfg.num_classes
    labels = class_labels(n_cls, per_class)
    noise = initial_noise(len(labels), (16, 8, 8), seed)
    clf = train_classifier(load_digits())
    policy = AttentionPolicy(min_tokens=1, emulate=True)
    images, rows = {}, []
    for name, lin, attn in VARIANTS:
        model = work.float_model()
        if lin:
            quantize_(model, QuantizeConfig(format="int8", model="flux"))
        scope = QuantizedAttention(policy) if attn else None
        if scope is not None:
            with scope:
                img = sample(model.velocity, labels, n_cls, noise, steps, 3.0)
        else:
            img = sample(model.velocity, labels, n_cls, noise, steps, 3.0)
        images[name] = img
        psnr = [min(M.psnr(a, b), 99.0) for a, b in zip(images["float"], img, strict=True)]
        rows.append({"variant": name, "psnr_db_mean": float(np.mean(psnr)), "psnr_db_min": float(np.min(psnr)),
                     "class_acc": M.accuracy(clf.predict(img), labels.numpy()),
                     "attention_calls_routed": scope.routed if scope is not None else 0})
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Mean PSNR per variant (float: the reference itself, left out)."""
    shown = [r for r in rows if math.isfinite(r["psnr_db_mean"]) and r["variant"] != "float"]
    fig = _figure(6.5, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([r["variant"] for r in shown], [r["psnr_db_mean"] for r in shown], color="#1f77b4")
    for i, r in enumerate(shown):
        ax.text(r["psnr_db_mean"] + 0.3, i, f"{r['psnr_db_mean']:.1f} dB (min {r['psnr_db_min']:.1f})",
                va="center", fontsize=8)
    ax.set_xlabel("samples' PSNR vs the float model (dB, higher is closer)")
    ax.set_xlim(0, max(r["psnr_db_mean"] for r in shown) * 1.3)
    ax.set_title("digits DiT: int8 attention (emulated scheme) vs int8 linears", fontsize=9)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for attention_quality.json / .md / .png")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = run(a.per_class, a.steps, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": datetime.date.today().isoformat(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "samples": 10 * a.per_class, "steps": a.steps, "seed": a.seed}
    (out / "attention_quality.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [f"Digits DiT, {env['samples']} samples x {a.steps} Euler steps, seed {a.seed} ({env['date']}, "
             f"`{env['command']}`)", "", "| variant | PSNR mean dB | PSNR min dB | class accuracy | attention calls routed |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['psnr_db_mean']:.2f} | {r['psnr_db_min']:.2f} | {r['class_acc']:.3f} | "
              f"{r['attention_calls_routed']} |" for r in rows]
    (out / "attention_quality.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "attention_quality.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
