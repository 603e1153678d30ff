"""The LoRA quality study on the digits DiT (docs/QUALITY.md, LoRA section): for each format, the committed
mirror LoRA merged before quantizing vs baked (round to nearest, stochastic) or run dynamically after, each
measured against the float model with the LoRA merged; and the ``--extract-lora`` correction of the plain
quantized model against the float model. Writes ``lora_study.json``, ``lora_study.md`` and ``lora_study.png``.

    python -m comfyquant.eval.lora_study --out DIR [--formats int8 fp8] [--ranks 8 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from comfyquant.eval.harness import EvalConfig, run_eval
from comfyquant.eval.sampling import SampleConfig
from comfyquant.eval.train_lora import LORA_ASSET

MODES = (("merge", False), ("bake", False), ("bake", True), ("dynamic", False))


def _label(mode: str, stochastic: bool) -> str:
    return f"{mode} (stochastic)" if stochastic else mode


def _row(report: dict[str, Any], **extra: Any) -> dict[str, Any]:
    m = report["metrics"]
    return {**extra, "psnr_db": m["psnr_db"]["mean"], "psnr_db_min": m["psnr_db"]["min"], "ssim": m["ssim"]["mean"],
            "class_acc": m["class_acc"], "class_acc_reference": m["class_acc_reference"],
            "fd_vs_reference": m["fd_vs_reference"]}


def run_study(out: Path, formats: list[str], ranks: list[int], lora: Path, sampling: SampleConfig) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    effect: dict[str, Any] | None = None
    for fmt in formats:
        for mode, sr in MODES:
            name = f"{fmt}-{mode}{'-sr' if sr else ''}"
            rep = run_eval(EvalConfig(model="digits-dit", format=fmt, out=out / name, lora=lora, lora_mode=mode,
                                      stochastic=sr, sampling=sampling, command=f"lora_study {name}",
                                      lora_effect=effect is None))
            effect = effect or rep["lora"]["effect_vs_base"]
            rows.append(_row(rep, kind="lora", format=fmt, mode=_label(mode, sr)))
            print(f"{name}: PSNR {rows[-1]['psnr_db']:.2f} dB", flush=True)
        for rank in [0, *ranks]:
            name = f"{fmt}-qerr-r{rank}"
            rep = run_eval(EvalConfig(model="digits-dit", format=fmt, out=out / name, extract_lora=rank,
                                      sampling=sampling, command=f"lora_study {name}"))
            rows.append(_row(rep, kind="correction", format=fmt, mode=f"+ extract-lora r{rank}" if rank else
                             "no correction"))
            print(f"{name}: PSNR {rows[-1]['psnr_db']:.2f} dB", flush=True)
    return {"lora": str(lora), "effect_vs_base": effect, "rows": rows,
            "sampling": {"steps": sampling.steps, "cfg": sampling.cfg, "per_class": sampling.per_class,
                         "seed": sampling.seed}}


def to_markdown(study: dict[str, Any]) -> str:
    eff = study["effect_vs_base"] or {}
    lines = [f"LoRA: `{Path(study['lora']).name}`; its effect on the float model: samples at "
             f"{eff.get('psnr_db', {}).get('mean', float('nan')):.2f} dB PSNR against the base model's, class "
             f"accuracy {eff.get('class_acc_reference', float('nan')):.3f} -> {eff.get('class_acc', float('nan')):.3f}.",
             "", "| format | LoRA applied | PSNR dB mean | PSNR dB min | SSIM | class acc (ref) | FD vs ref |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in study["rows"]:
        if r["kind"] == "lora":
            lines.append(f"| {r['format']} | {r['mode']} | {r['psnr_db']:.2f} | {r['psnr_db_min']:.2f} | "
                         f"{r['ssim']:.4f} | {r['class_acc']:.3f} ({r['class_acc_reference']:.3f}) | "
                         f"{r['fd_vs_reference']:.4f} |")
    lines += ["", "Quantization-error correction (`--extract-lora`, run as a dynamic LoRA; reference: float model, "
              "no LoRA):", "", "| format | correction | PSNR dB mean | PSNR dB min | SSIM | FD vs ref |",
              "|---|---|---:|---:|---:|---:|"]
    for r in study["rows"]:
        if r["kind"] == "correction":
            lines.append(f"| {r['format']} | {r['mode']} | {r['psnr_db']:.2f} | {r['psnr_db_min']:.2f} | "
                         f"{r['ssim']:.4f} | {r['fd_vs_reference']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = study["rows"]
    formats = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, title in ((axes[0], "lora", "mirror LoRA: quantized vs float base+LoRA"),
                            (axes[1], "correction", "--extract-lora correction vs float base")):
        modes = list(dict.fromkeys(r["mode"] for r in rows if r["kind"] == kind))
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            vals = [next((r["psnr_db"] for r in rows if r["kind"] == kind and r["format"] == f and r["mode"] == mode),
                         np.nan) for f in formats]
            ax.bar(np.arange(len(formats)) + (i - (len(modes) - 1) / 2) * width, vals, width, label=mode)
        ax.set_xticks(np.arange(len(formats)))
        ax.set_xticklabels(formats)
        ax.set_ylabel("sample PSNR dB (mean)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        finite = [r["psnr_db"] for r in rows if r["kind"] == kind]
        if finite:
            ax.set_ylim(min(finite) - 3, max(finite) + 2)
    eff = (study["effect_vs_base"] or {}).get("psnr_db", {}).get("mean")
    if eff is not None:
        fig.suptitle(f"digits DiT; the LoRA itself moves float samples to {eff:.1f} dB PSNR", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", nargs="+", default=["int8", "int8-rot", "fp8"])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="--extract-lora ranks to measure")
    p.add_argument("--lora", type=Path, default=LORA_ASSET)
    p.add_argument("--per-class", type=int, default=SampleConfig.per_class)
    p.add_argument("--steps", type=int, default=SampleConfig.steps)
    args = p.parse_args(argv)
    start = time.time()
    study = run_study(args.out, args.formats, args.ranks, args.lora,
                      SampleConfig(steps=args.steps, per_class=args.per_class))
    study["command"] = "python -m comfyquant.eval.lora_study " + " ".join(sys.argv[1:] if argv is None else argv)
    study["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_study.json").write_text(json.dumps(study, indent=1))
    (args.out / "lora_study.md").write_text(to_markdown(study))
    plot(study, args.out / "lora_study.png")
    print(to_markdown(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
