"""``comfyquant eval``: quantize a reference model (or take a quantized file), load it through the runtime
loader, run the workload, and write a JSON report, a markdown table and PNGs.

The quantized file always goes through ``comfyquant.convert`` (or the peer converter) and
``comfyquant.load_quantized``, the same path a user's file takes.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.eval.layerstats import LayerStat, layer_stats
from comfyquant.eval.sampling import SampleConfig
from comfyquant.eval.workloads import resolve_workload
from comfyquant.io.writer import write_small_file
from comfyquant.progress import QUIET, Progress

LORA_MODES = ("merge", "bake", "dynamic")


@dataclass(frozen=True)
class EvalConfig:
    """One eval run. ``peer`` set to a peer setting (``simple`` / ``default``) converts with convert_to_quant.

    ``optimizer`` (an ``OptimizerConfig``; None = RTN) with ``calibration`` (a file, ``synthetic``, or None:
    calibrate the workload on its held-out calibration data first, cached in ``out``).
    """

    model: str
    format: str | None
    out: Path
    optimizer: Any = None
    calibration: str | None = None
    calibration_lora: str | None = None
    peer: str | None = None
    sampling: SampleConfig = field(default_factory=SampleConfig)
    sentences: int | None = None
    command: str = ""
    progress: Progress = QUIET  # the CLI passes a terminal bar / plain lines; tests and the API stay quiet
    lora: Path | None = None  # measure this LoRA: the reference is the float model with it merged
    lora_mode: str = "merge"  # merge (into the float weights before quantizing), bake or dynamic (after)
    lora_strength: float = 1.0
    stochastic: bool = False  # bake with stochastic rounding
    extract_lora: int = 0  # also extract the quantization error at this rank and run it as a dynamic LoRA
    lora_effect: bool = True  # also sample the float model without the LoRA (how far the LoRA moves samples)
    # format "auto": the budget, the target GPU and whether non-stock formats are candidates
    budget: str | None = None
    target_gpu: str | None = None
    allow_comfyquant_formats: bool = False
    auto_confidence: float | None = None  # a psnr= floor's bound and margin (None: autoprec.AutoConfig's)
    auto_margin_db: float | None = None


def check_config(cfg: EvalConfig) -> None:
    """Reject what the harness cannot do before any work starts (missing eval extra, peer + optimizer)."""
    if cfg.lora_mode not in LORA_MODES:
        raise UserError(f"--lora-mode must be one of {', '.join(LORA_MODES)}, got {cfg.lora_mode!r}")
    if cfg.lora is not None and cfg.peer and cfg.lora_mode == "merge":
        raise UserError("--lora-mode merge needs comfyquant's converter (the peer cannot merge LoRAs)")
    if cfg.peer and cfg.optimizer is not None and cfg.optimizer.needs_calibration:
        raise UserError("--peer runs convert_to_quant's own optimizer; drop the comfyquant optimizer flags")
    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the eval needs {', '.join(missing)}: pip install 'comfyquant[eval]'")


def quantize_reference(workload: Any, cfg: EvalConfig, out: Path) -> tuple[Path, str, dict[str, Any] | None]:
    """Convert the workload's float file with comfyquant (or the peer); returns the file, who made it and, for
    ``--format auto``, the automatic-precision plan (its summary, predictions and calibration measurements)."""
    if cfg.format is None:
        raise UserError("--format is required unless --model is an already-quantized file")
    if cfg.format == "auto" and cfg.peer:
        raise UserError("--peer converts with convert_to_quant, which has no automatic precision")
    src = workload.reference_file()
    dst = out / f"{workload.name}-{cfg.format}{'-peer-' + cfg.peer if cfg.peer else ''}.safetensors"
    cfg.progress.stage(f"quantizing {workload.name} to {cfg.format} with "
                       f"{'convert_to_quant (' + cfg.peer + ')' if cfg.peer else 'comfyquant'} -> {dst}")
    if cfg.peer:
        from comfyquant.eval.peer import PEER_VERSION, peer_args, run_peer

        run_peer(peer_args(src, dst, cfg.format, cfg.peer, workload.peer_extra_args()))
        return dst, f"convert_to_quant {PEER_VERSION} ({cfg.peer})", None
    from comfyquant.convert.api import convert

    layer_config = None
    if workload.layer_config() is not None:
        layer_config = out / "layer_config.json"
        layer_config.write_text(json.dumps(workload.layer_config(), indent=1))
    merge = [f"{cfg.lora}:{cfg.lora_strength}"] if cfg.lora is not None and cfg.lora_mode == "merge" else []
    calibration = cfg.calibration
    optimizing = cfg.optimizer is not None and cfg.optimizer.needs_calibration
    if optimizing and calibration is None:
        calibration = str(calibrate_workload(workload, out))
    auto = cfg.format == "auto"
    probe = None
    if auto:
        from comfyquant.eval.autoprobe import probe_for

        probe = probe_for(src)
    rep = convert(src, dst, format=cfg.format, layer_config=layer_config, report=out / "convert_report.json",
                  force=True, progress=cfg.progress, optimizer=cfg.optimizer,
                  calibration=calibration if optimizing or auto else None, calibration_lora=cfg.calibration_lora,
                  merge_loras=merge, extract_lora=cfg.extract_lora,
                  extract_lora_output=correction_file(out) if cfg.extract_lora else None,
                  budget=cfg.budget, target_gpu=cfg.target_gpu, allow_comfyquant_formats=cfg.allow_comfyquant_formats,
                  probe=probe, verify_heldout=False, auto_confidence=cfg.auto_confidence,
                  auto_margin_db=cfg.auto_margin_db)
    plan = None
    if rep.auto is not None:
        plan = {k: v for k, v in rep.auto.to_dict().items() if k != "layers"}
        plan["layers"] = rep.auto.formats()
    return dst, f"comfyquant ({method_label(cfg.optimizer)})", plan


def method_label(opt: Any) -> str:
    """``gptq+smoothquant+bias`` etc.: what the optimizer settings do, for reports and tables."""
    if opt is None:
        return "rtn"
    parts = [opt.method if opt.method != "learned" else f"learned-{opt.learned.optimizer}"]
    parts += [x for x, on in (("smoothquant", opt.smoothquant), ("bias", opt.bias_correction),
                              ("actcal", opt.input_scale_percentile is not None)) if on]
    return "+".join(parts)


def calibrate_workload(workload: Any, out: Path) -> Path:
    """Calibrate the workload's reference on its held-out calibration data (cached in ``out``)."""
    path = out / "calibration.safetensors"
    if path.exists():
        return path
    from comfyquant.calibration.collector import calibrate_to_file
    from comfyquant.eval.calibration_sources import resolve_source

    src = resolve_source(str(workload.reference_file()))
    calibrate_to_file(src.model, src.run, path, meta=src.meta)
    return path


def correction_file(out: Path) -> Path:
    """Where the eval's ``--extract-lora`` correction LoRA goes."""
    return out / "quant_error_lora.safetensors"


def lora_setup(cfg: EvalConfig, workload: Any, ref: Any, quant: Any, out: Path) -> dict[str, Any]:
    """Put the LoRA into the float reference (merged in float32) and, for bake/dynamic, onto the quantized model;
    add the ``--extract-lora`` correction; measure how far the LoRA moves the float model's own output."""
    import copy

    import comfyquant.lora as cql

    info: dict[str, Any] = {}
    if cfg.lora is not None:
        base = copy.deepcopy(ref)
        h = cql.apply(ref, cfg.lora, cfg.lora_strength, "bake")
        info = {"file": str(cfg.lora), "mode": cfg.lora_mode, "strength": cfg.lora_strength,
                "stochastic": cfg.stochastic, "match": h.match.line()}
        if cfg.lora_mode != "merge":
            q = cql.apply(quant, cfg.lora, cfg.lora_strength, cfg.lora_mode, stochastic=cfg.stochastic)
            info["layers"] = len(q.layers)
        if cfg.lora_effect:
            effect = out / "lora_effect"
            effect.mkdir(exist_ok=True)
            cfg.progress.stage("sampling the float model without the LoRA, to measure the LoRA's own effect")
            info["effect_vs_base"] = workload.evaluate(base, ref, effect, cfg.progress)  # base vs base+LoRA
    if cfg.extract_lora:
        h = cql.apply(quant, correction_file(out), 1.0, "dynamic")
        info["extract_lora"] = {"rank": cfg.extract_lora, "layers": len(h.layers)}
    return info
def heldout_quality(metrics: dict[str, Any]) -> dict[str, Any]:
    """The workload's auto-precision metric as the eval measured it on its held-out inputs."""
    if "psnr_db" in metrics:
        return {"psnr": metrics["psnr_db"]["mean"], "psnr_min": metrics["psnr_db"]["min"],
                "items": metrics["samples"]}
    return {"cosine": metrics["cosine"]["mean"], "cosine_min": metrics["cosine"]["min"],
            "items": metrics["sentences"]}


def summarize(stats: list[LayerStat]) -> dict[str, Any]:
    """Mean / min of the per-layer SQNRs and the worst layers by output SQNR."""
    def agg(vals: list[float]) -> dict[str, float | None]:
        finite = [v for v in vals if v == v and abs(v) != float("inf")]
        if not finite:
            return {"mean": None, "min": None}
        return {"mean": round(sum(finite) / len(finite), 3), "min": round(min(finite), 3)}

    run = [s for s in stats if s.out_sqnr_db == s.out_sqnr_db]
    worst = sorted(run, key=lambda s: s.out_sqnr_db)[:5]
    return {"layers": len(stats), "layers_not_run_by_workload": [s.name for s in stats if s not in run], "weight_sqnr_db": agg([s.weight_sqnr_db for s in stats]),
            "out_sqnr_db": agg([s.out_sqnr_db for s in stats]),
            "out_sqnr_e2e_db": agg([s.out_sqnr_e2e_db for s in stats]),
            "worst_out_sqnr": [(s.name, round(s.out_sqnr_db, 2)) for s in worst]}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run one eval and write ``report.json``, ``report.md``, ``layers.png`` (and ``samples.png``) to ``cfg.out``.

    Everything that can be refused is checked before ``cfg.out`` is created, and an output folder this run
    created is removed again when the run fails before writing anything into it.
    """
    check_config(cfg)
    workload, qfile = resolve_workload(cfg.model, cfg.sampling, cfg.sentences)
    if qfile is None and cfg.format is None:
        raise UserError("--format is required unless --model is an already-quantized file")
    created = not cfg.out.exists()
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {cfg.out}: {e.strerror or e}") from None
    try:
        return _run(cfg, workload, qfile)
    except BaseException:
        if created and cfg.out.is_dir() and not any(cfg.out.iterdir()):
            cfg.out.rmdir()
        raise


def _run(cfg: EvalConfig, workload: Any, qfile: Path | None) -> dict[str, Any]:
    from comfyquant.runtime.loader import load_quantized_report

    start = time.time()
    out, say = cfg.out, cfg.progress.stage
    made_by, auto = "given file", None
    if qfile is None:
        qfile, made_by, auto = quantize_reference(workload, cfg, out)
    say(f"loading the float reference and {qfile.name}")
    torch.manual_seed(0)
    ref = workload.float_model()
    quant, load = load_quantized_report(workload.empty_model(), qfile, compute_dtype=torch.float32)
    quant.eval()
    if not load.quantized:
        raise UserError(f"{qfile}: no quantized layers were loaded; nothing to evaluate")
    if made_by == "given file" and (cfg.extract_lora or (cfg.lora is not None and cfg.lora_mode == "merge")):
        what = "--extract-lora" if cfg.extract_lora else "--lora-mode merge"
        raise UserError(f"{what} needs the eval to convert the model: give --model digits-dit or a float file (or "
                        "use --lora-mode bake / dynamic on a quantized file)")
    lora = lora_setup(cfg, workload, ref, quant, out) if cfg.lora is not None or cfg.extract_lora else None
    say(f"per-layer statistics: {len(load.quantized)} quantized layers, one forward pass through both models")
    stats = layer_stats(ref, quant, workload.stats_pass)
    metrics = workload.evaluate(ref, quant, out, cfg.progress)
    formats = sorted(set(load.quantized.values()))
    report = {
        "model": workload.name, "format": cfg.format or "/".join(formats), "quantizer": made_by,
        "reference": str(workload.reference_file()), "quantized_file": str(qfile),
        "file_bytes": qfile.stat().st_size, "reference_bytes": Path(workload.reference_file()).stat().st_size,
        "command": cfg.command, "optimizer": None if cfg.peer else method_label(cfg.optimizer),
        "metrics": metrics, "summary": summarize(stats),
        "layers": [s.to_dict() for s in stats], "seconds": round(time.time() - start, 1),
        "device": "cpu", "torch": torch.__version__,
    }
    if lora is not None:
        report["lora"] = lora
    if auto is not None:
        auto["heldout"] = heldout_quality(metrics)
        report["auto"] = auto
    from comfyquant.eval.compare import markdown_report
    from comfyquant.eval.plots import plot_layers

    say(f"writing report.json, report.md and layers.png to {out}")
    write_small_file(out / "report.json", json.dumps(report, indent=1))
    write_small_file(out / "report.md", markdown_report(report))
    plot_layers(stats, out / "layers.png", f"{workload.name} {report['format']} ({made_by})")
    return report
