"""Rendering eval reports: one report as markdown, several side by side (``--compare``), per-layer SQNR plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comfyquant.errors import UserError


def _get(d: dict[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# (row label, dotted path in the report); rows absent from every report are left out.
ROWS = (
    ("quantizer", "quantizer"),
    ("format", "format"),
    ("quantized layers", "summary.layers"),
    ("file MB", "file_mb"),
    ("auto budget", "auto.budget"),
    ("auto size (of the input)", "auto.size"),
    ("auto predicted PSNR dB (calibration)", "auto.predicted.psnr"),
    ("auto measured PSNR dB (calibration)", "auto.measured_calibration.psnr"),
    ("auto predicted cosine (calibration)", "auto.predicted.cosine"),
    ("auto measured cosine (calibration)", "auto.measured_calibration.cosine"),
    ("weight SQNR dB mean", "summary.weight_sqnr_db.mean"),
    ("weight SQNR dB min", "summary.weight_sqnr_db.min"),
    ("output SQNR dB mean (layer alone)", "summary.out_sqnr_db.mean"),
    ("output SQNR dB min (layer alone)", "summary.out_sqnr_db.min"),
    ("output SQNR dB mean (in model)", "summary.out_sqnr_e2e_db.mean"),
    ("embedding cosine mean", "metrics.cosine.mean"),
    ("embedding cosine min", "metrics.cosine.min"),
    ("sample PSNR dB mean", "metrics.psnr_db.mean"),
    ("sample PSNR dB min", "metrics.psnr_db.min"),
    ("sample SSIM mean", "metrics.ssim.mean"),
    ("sample SSIM min", "metrics.ssim.min"),
    ("class accuracy (reference)", "metrics.class_acc_reference"),
    ("class accuracy", "metrics.class_acc"),
    ("Frechet dist. vs real (reference)", "metrics.fd_reference_vs_real"),
    ("Frechet dist. vs real", "metrics.fd_vs_real"),
    ("Frechet dist. vs reference samples", "metrics.fd_vs_reference"),
    ("LoRA mode", "lora.mode"),
    ("LoRA strength", "lora.strength"),
    ("LoRA effect: PSNR dB base vs base+LoRA (float)", "lora.effect_vs_base.psnr_db.mean"),
    ("LoRA effect: class accuracy base+LoRA (float)", "lora.effect_vs_base.class_acc"),
    ("quantization-error LoRA rank", "lora.extract_lora.rank"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 1.0 and v != 0 else f"{v:.2f}"
    return str(v)


def _with_derived(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    if "file_bytes" in r:
        r["file_mb"] = round(r["file_bytes"] / 1e6, 2)
    return r


def side_by_side(reports: Sequence[dict[str, Any]], titles: Sequence[str]) -> str:
    """A markdown table with one column per report."""
    reps = [_with_derived(r) for r in reports]
    lines = ["| metric | " + " | ".join(titles) + " |", "| --- |" + " --- |" * len(reps)]
    for label, path in ROWS:
        vals = [_get(r, path) for r in reps]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(_cell(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: dict[str, Any]) -> str:
    """One report: the summary table, the worst layers, and the per-layer table."""
    head = f"# eval: {report['model']} {report['format']} ({report['quantizer']})\n\n"
    if report.get("command"):
        head += f"`{report['command']}`\n\n"
    body = side_by_side([report], ["value"])
    rows = ["| layer | format | shape | weight SQNR dB | out SQNR dB (alone) | out SQNR dB (in model) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in report["layers"]:
        rows.append(f"| {s['name']} | {s['format']} | {'x'.join(map(str, s['shape']))} | "
                    f"{_cell(s['weight_sqnr_db'])} | {_cell(s['out_sqnr_db'])} | {_cell(s['out_sqnr_e2e_db'])} |")
    return head + body + "\n## Per layer\n\n" + "\n".join(rows) + "\n"


def load_report(path: Path) -> dict[str, Any]:
    """Read a report JSON written by ``comfyquant eval``; a wrong file is a user error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read eval report {path}: {e}") from None
    if not isinstance(data, dict) or "metrics" not in data or "summary" not in data:
        raise UserError(f"{path} is not a report written by `comfyquant eval`")
    return data


def compare_files(paths: Sequence[Path]) -> str:
    """``comfyquant eval --compare A.json B.json ...``: the reports side by side."""
    reports = [load_report(p) for p in paths]
    return side_by_side(reports, [f"{r['model']} {r['format']} ({r['quantizer']})" for r in reports])
