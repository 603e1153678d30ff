"""``comfyquant demo``: convert the committed digits DiT to int8 with the real converter, load it with the
runtime loader, sample both models at the same seeds and print the quality report (CPU, about a minute)."""

from __future__ import annotations

from pathlib import Path

from comfyquant.eval.compare import side_by_side
from comfyquant.eval.harness import EvalConfig, run_eval
from comfyquant.eval.sampling import SampleConfig
from comfyquant.progress import QUIET, Progress

DEMO_SAMPLING = SampleConfig(per_class=5)  # 50 samples, 20 Euler steps: well under two minutes on a CPU


def run_demo(out: Path, fmt: str = "int8", sampling: SampleConfig = DEMO_SAMPLING,
             progress: Progress = QUIET) -> dict:
    """Run the eval on the bundled DiT and print where everything went (the steps on ``progress``)."""
    print(f"comfyquant demo: converting the bundled digits DiT (Flux layout, bf16) to {fmt}, then sampling "
          f"{10 * sampling.per_class} digits with both models ({sampling.steps} steps each) ...", flush=True)
    cfg = EvalConfig(model="digits-dit", format=fmt, out=out, sampling=sampling,
                     command=f"comfyquant demo --out {out} --format {fmt}", progress=progress)
    report = run_eval(cfg)
    print(side_by_side([report], [f"{fmt} vs bf16"]), end="")
    s = report["summary"]
    print(f"\n{s['layers']} layers quantized; file {report['reference_bytes'] / 1e6:.2f} MB -> "
          f"{report['file_bytes'] / 1e6:.2f} MB; {report['seconds']:.0f} s")
    print(f"quantized model: {report['quantized_file']}")
    print(f"sample grid (bf16 left, {fmt} right, same seeds): {out / 'samples.png'}")
    print(f"per-layer SQNR plot: {out / 'layers.png'}")
    print(f"report: {out / 'report.json'} and {out / 'report.md'}")
    return report
