"""Quality vs bytes of automatic precision against uniform formats, on one reference model (docs/QUALITY.md).

    python -m comfyquant.eval.auto_frontier --model digits-dit --out q/auto-dit \\
        --budget size=0.55 size=0.6 size=0.686 psnr=50 --uniform int8 int8-rot int8-tensor fp8 --all-linears

Every file is converted by ``comfyquant.convert`` (auto: one workload probe shared by all budgets, planned on
the calibration inputs) and measured by ``comfyquant eval``'s own harness on its held-out inputs (the digits
DiT: 100 samples from seed 1234; MiniLM: the 213 eval sentences). ``--all-linears`` adds each uniform format
applied to every linear layer (a layer config with one catch-all rule), besides the preset's choice of
layers. Writes ``frontier.json`` and a PNG (``--plot``): sample PSNR mean (DiT) or embedding cosine mean
(MiniLM) against the file's tensor bytes over the float file's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

from comfyquant.errors import UserError
from comfyquant.exits import run_cli


def tensor_bytes(path: Path) -> int:
    """Bytes of a file's tensor data (what ``--budget size=`` counts; the header is left out)."""
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def _metric(report: dict[str, Any]) -> tuple[str, float, float]:
    m = report["metrics"]
    if "psnr_db" in m:
        return "psnr", float(m["psnr_db"]["mean"]), float(m["psnr_db"]["min"])
    return "cosine", float(m["cosine"]["mean"]), float(m["cosine"]["min"])


def _rules(workload: Any, fmt: str | None) -> dict[str, Any] | None:
    """The workload's own layer config, plus a catch-all rule for ``fmt`` (all linear layers)."""
    rules = list((workload.layer_config() or {}).get("rules", []))
    if fmt is not None:
        rules.append({"pattern": ".", "format": fmt})
    return {"rules": rules} if rules else None


def run(model: str, out: Path, budgets: list[str], uniform: list[str], all_linears: bool) -> dict[str, Any]:
    from comfyquant.convert.api import convert
    from comfyquant.eval.autoprobe import probe_for
    from comfyquant.eval.harness import EvalConfig, run_eval
    from comfyquant.eval.sampling import SampleConfig
    from comfyquant.eval.workloads import resolve_workload

    workload, qfile = resolve_workload(model, SampleConfig(), None)
    if qfile is not None:
        raise UserError("--model must be a float reference (digits-dit, minilm or a float file of either)")
    src = workload.reference_file()
    out.mkdir(parents=True, exist_ok=True)
    base = tensor_bytes(src)
    rows: list[dict[str, Any]] = []

    def measure(path: Path, kind: str, label: str, extra: dict[str, Any]) -> None:
        rep = run_eval(EvalConfig(model=str(path), format=None, out=out / label))
        metric, mean, low = _metric(rep)
        row = {"kind": kind, "label": label, "size": tensor_bytes(path) / base, metric: mean, f"{metric}_min": low,
               "file": str(path), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for fmt in uniform:
        for scope in (("preset", None), *((("all linears", fmt),) if all_linears else ())):
            label = f"uniform-{fmt}" + ("-all" if scope[1] else "")
            cfg = _rules(workload, scope[1])
            lc = None
            if cfg is not None:
                lc = out / f"{label}.rules.json"
                lc.write_text(json.dumps(cfg))
            dst = out / f"{label}.safetensors"
            convert(src, dst, format=fmt, layer_config=lc, force=True, progress=False)
            measure(dst, "uniform", label, {"format": fmt, "layers": scope[0]})
    probe = probe_for(src) if budgets else None
    for b in budgets:
        label = "auto-" + b.replace("=", "").replace(",", "-")
        cfg = _rules(workload, None)
        lc = None
        if cfg is not None:
            lc = out / "auto.rules.json"
            lc.write_text(json.dumps(cfg))
        dst = out / f"{label}.safetensors"
        rep = convert(src, dst, format="auto", budget=b, probe=probe, layer_config=lc, force=True, progress=False,
                      verify_heldout=False)
        a = rep.auto
        measure(dst, "auto", label, {"budget": b, "counts": a.counts(), "predicted": a.predicted,
                                     "measured_calibration": a.measured, "rounds": a.rounds})
    result = {"model": workload.name, "reference": str(src), "reference_bytes": base, "rows": rows}
    (out / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Quality against size: the auto plans as a line, uniform formats as labelled points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = "psnr" if any("psnr" in r for r in result["rows"]) else "cosine"
    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    auto = sorted((r for r in result["rows"] if r["kind"] == "auto"), key=lambda r: r["size"])
    if auto:
        ax.plot([r["size"] for r in auto], [r[metric] for r in auto], "o-", color="#d62728", label="auto (comfyquant)")
        for r in auto:
            ax.annotate(r["budget"], (r["size"], r[metric]), fontsize=6, xytext=(4, -9), textcoords="offset points")
    for scope, marker in (("preset", "s"), ("all linears", "^")):
        pts = [r for r in result["rows"] if r["kind"] == "uniform" and r["layers"] == scope]
        if pts:
            ax.scatter([r["size"] for r in pts], [r[metric] for r in pts], marker=marker, color="#1f77b4",
                       label=f"uniform format, {'preset layers' if scope == 'preset' else 'every linear layer'}")
            for r in pts:
                ax.annotate(r["format"], (r["size"], r[metric]), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("file size (tensor bytes) / float file")
    ax.set_ylabel("sample PSNR mean vs bf16 (dB)" if metric == "psnr" else "embedding cosine mean vs fp32")
    ax.set_title(f"{result['model']}: quality vs bytes, held-out inputs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyquant.eval.auto_frontier", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="digits-dit | minilm | a float file of either")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", nargs="*", default=[], help="auto budgets (each KIND=VALUE[,KIND=VALUE])")
    p.add_argument("--uniform", nargs="*", default=[], help="uniform formats to compare with")
    p.add_argument("--all-linears", action="store_true", help="also each uniform format on every linear layer")
    p.add_argument("--plot", type=Path, help="write the PNG here")
    p.add_argument("--replot", type=Path, metavar="FRONTIER.json", help="only redraw the plot of an earlier run")
    a = p.parse_args(argv)
    result = json.loads(a.replot.read_text()) if a.replot else run(a.model, a.out, a.budget, a.uniform,
                                                                   a.all_linears)
    if a.plot:
        plot(result, a.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("auto_frontier", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
