"""The streamed conversion: one tensor at a time from the memory-mapped input, through the quantizer, to disk.

Peak memory is bounded by the largest tensor (never a dict of all tensors); on the CPU, per-row and
block-scaled formats are quantized in row chunks of about 1M elements (bit-identical, several times
faster, and no full-size float32 copy). Error statistics of layers with more than 1M elements are
computed on evenly spaced rows: float64 statistics over every element would cost several times the
quantization itself, while a 1M-element sample pins SQNR to a few hundredths of a dB (the largest
absolute error is then the sample's). ``low_memory`` lowers that sample to 256K elements and frees
GPU memory after every tensor.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant import __version__
from comfyquant.autoprec.plan import AUTO
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.hooks import QuantErrorSink, TransformedReader, WeightTransform
from comfyquant.convert.plan import CAST, DROP, KEEP, QUANTIZE, Plan, PlanEntry, PlanOptions, build_plan
from comfyquant.convert.report import LayerReport, Report
from comfyquant.errors import NonFiniteWeightError, UserError
from comfyquant.formats import QuantFormat, get_format
from comfyquant.io.comfy_meta import encode_comfy_quant
from comfyquant.io.reader import CheckpointReader, resolve_input
from comfyquant.io.writer import StreamingWriter
from comfyquant.optimize.hessian import LayerFallback as OptimizerFallback
from comfyquant.presets.fit import check_model_choice
from comfyquant.progress import Progress
from comfyquant.quant.metrics import ErrorStats, all_finite, error_stats

CHUNK_ELEMENTS = 2**20  # CPU row chunks: float32 temporaries of 4 MiB stay in cache (several times faster)
AUTO_METADATA = "comfyquant.auto"  # the auto plan's summary (JSON) in the output's __metadata__
STATS_MAX_ELEMENTS = 2**20
STATS_MAX_ELEMENTS_LOW_MEMORY = 2**18
FP16_MAX = 65504.0


@dataclass(frozen=True)
class ConvertOptions:
    """All settings of one conversion (what the CLI flags and ``comfyquant.convert`` keyword arguments say)."""

    format: str = "int8"
    model: str = "auto"
    layer_config: str | Path | None = None
    device: str = "cpu"
    low_memory: bool = False
    force: bool = False
    block_size: int = 128
    progress: Progress = field(default_factory=Progress)
    fallback: str | None = None
    optimizer: Any = None  # comfyquant.optimize.OptimizerConfig (None: round to nearest)
    calibration: Any = None  # calibration file, "synthetic", or in-memory statistics (``.get(layer)``)
    calibration_lora: str | None = None
    strict_preset: bool = False
    layers: LayerOptions = field(default_factory=LayerOptions)
    weight_transform: WeightTransform | None = None  # float weights changed before quantizing (--merge-lora)
    quant_error_sink: QuantErrorSink | None = None  # sees each quantized layer's stored form (--extract-lora)
    # --format auto: the budget ("size=0.4", an autoprec.Budget), candidate policy, and the workload probe
    # (autoprec.Probe) of a reference model; ``verify_heldout`` checks the written file on held-out inputs
    budget: Any = None
    target_gpu: str | None = None
    allow_comfyquant_formats: bool = False
    probe: Any = None
    verify_heldout: bool = True
    # a psnr=/cosine= floor's headroom (autoprec.AutoConfig.confidence / margin_db; None: AutoConfig's default)
    auto_confidence: float | None = None
    auto_margin_db: float | None = None

    def plan_options(self) -> PlanOptions:
        return PlanOptions(format=self.format, model=self.model, layer_config=self.layer_config,
                           block_size=self.block_size, fallback=self.fallback, layers=self.layers)

    @property
    def stats_limit(self) -> int:
        return STATS_MAX_ELEMENTS_LOW_MEMORY if self.low_memory else STATS_MAX_ELEMENTS


class LayerFallback(Exception):
    """A layer that cannot be converted as planned; the converter keeps it in high precision with ``reason``
    (NaN/Inf under ``--force``, and later a singular Hessian or a diverging optimizer) and carries on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; asking for CUDA without a usable GPU is a user error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available to this torch installation")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise UserError(f"unsupported device '{device}'; use cpu or cuda")
    return dev


def check_paths(reader: CheckpointReader, output: Path, force: bool) -> None:
    """Refuse writing over the input, over an existing file without ``force``, or into a missing directory."""
    sources = [reader.path, *reader.files]
    for src in sources:
        if output.resolve() == src.resolve() or (output.exists() and os.path.samefile(output, src)):
            raise UserError(f"output {output} is the input file {src}; choose another output path")
    if output.is_dir():
        raise UserError(f"output {output} is a directory; give a file name")
    if output.exists() and not force:
        raise UserError(f"output exists: {output} (use --force to overwrite)")
    if not output.parent.is_dir():
        raise UserError(f"output directory does not exist: {output.parent}")


def problem(entry: PlanEntry, x: torch.Tensor) -> str | None:
    """Why a weight planned for quantize/cast cannot be converted (NaN/Inf, fp16 overflow), else None."""
    if x.numel() == 0:
        return None
    if not all_finite(x):
        return "holds NaN/Inf values"
    if entry.format == "fp16" and x.dtype != torch.float16:
        lo, hi = torch.aminmax(x)
        if max(-float(lo), float(hi)) > FP16_MAX:
            return "has values beyond the float16 range (they would become inf)"
    return None


def quantize_rows(x: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any],
                  chunk_elements: int | None = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """``fmt.quantize``, run over chunks of rows when rows (or row groups) have their own scales.

    The result is bit-identical (each row group is quantized on its own either way); the float32 temporaries of
    one chunk stay cache-sized, which is several times faster on CPUs and keeps peak memory at the stored
    tensors plus one chunk. Formats whose scales couple all rows (per-tensor) are not chunked.
    """
    n, k = x.shape
    step = fmt.row_chunk(params)
    if step is None or not chunk_elements or x.numel() <= chunk_elements:
        return fmt.quantize(x, params)
    rows = max(step, chunk_elements // max(1, k) // step * step)
    out: dict[str, torch.Tensor] = {}
    for i in range(0, n, rows):
        part = fmt.quantize(x[i:i + rows], params)
        for key, t in part.items():
            if t.dim() and t.shape[0] in (rows, rows // step, min(rows, n - i), -(-min(rows, n - i) // step)):
                per = 1 if t.shape[0] == min(rows, n - i) else step
                if key not in out:
                    out[key] = torch.empty((-(-n // per), *t.shape[1:]), dtype=t.dtype, device=t.device)
                out[key][i // per: i // per + t.shape[0]] = t
            elif key not in out:
                out[key] = t
            elif not torch.equal(out[key], t):  # pragma: no cover - a format whose row_chunk is wrong
                raise RuntimeError(f"{fmt.name}: '{key}' differs between row chunks; row_chunk is wrong")
    return out


def weight_stats(x: torch.Tensor, fmt: QuantFormat, params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                 limit: int) -> tuple[ErrorStats, int | None]:
    """Error of the stored weight vs the float weight; on evenly spaced whole row groups when it has more than
    ``limit`` elements (and the format can slice its stored tensors by rows)."""
    n, k = x.shape
    if x.numel() > limit:
        step = fmt.row_chunk(params) or 1
        groups = -(-n // step)
        # whole row groups, and at least 8 of them: tiles differ more than rows do
        count = min(groups, max(8 if step > 1 else 1, limit // max(1, k * step)))
        g = torch.linspace(0, groups - 1, count).round().long().unique()
        rows = (g[:, None] * step + torch.arange(step)[None, :]).reshape(-1)
        rows = rows[rows < n].to(x.device)
        part = fmt.take_rows(tensors, params, rows)
        if part is not None:
            return error_stats(x[rows], fmt.dequantize(part, params)), len(rows)
    return error_stats(x, fmt.dequantize(tensors, params)), None


@dataclass
class Finished:
    """One plan entry converted: its report, the tensors to write for it in file order, and the reason it
    was kept in high precision instead (a ``LayerFallback``), if it was."""

    report: LayerReport
    tensors: list[tuple[str, torch.Tensor]]
    fallback: str | None = None


class Streamer:
    """Runs one plan against one reader and writer, producing the per-layer reports.

    Each layer commits on its own: a layer that cannot be converted (``LayerFallback``) is written in high
    precision instead, and the file's header, written last, describes what was actually written.
    :meth:`compute` (one entry to its tensors) and :meth:`write` (those tensors to the file) are separate so
    a distributed driver can compute entries on one process and write them on another.
    """

    def __init__(self, reader: CheckpointReader, plan: Plan, opts: ConvertOptions, device: torch.device,
                 hooks: Any = None) -> None:
        self.reader, self.plan, self.opts, self.device = reader, plan, opts, device
        self.fallbacks: dict[str, str] = {}
        self.hooks = hooks  # comfyquant.convert.optimizing.OptimizeHooks, or None for plain RTN

    def run(self, output: Path, metadata: dict[str, str]) -> list[LayerReport]:
        layers: list[LayerReport] = []
        entries = self.plan.entries
        with StreamingWriter(output, self.plan.specs, metadata, overwrite=self.opts.force,
                             background=True, amendable=True) as w, \
                self.opts.progress.task("convert", len(entries), "tensors", total_bytes=self.plan.bytes_in) as bar:
            for i, e in enumerate(entries):
                nxt = next((x for x in entries[i + 1:i + 3] if x.action != DROP), None)
                if nxt is not None:
                    self.reader.prefetch(nxt.name)
                layers.append(self.process(e, w))
                bar.update(1, e.bytes_in)
                if self.opts.low_memory and self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return layers

    def process(self, e: PlanEntry, w: StreamingWriter) -> LayerReport:
        """Convert one entry and write it."""
        return self.write(e, self.compute(e), w)

    def write(self, e: PlanEntry, done: Finished, w: StreamingWriter) -> LayerReport:
        """Write one converted entry (computed here or elsewhere) and record its fallback."""
        for name, t in done.tensors:
            w.write(name, t)
        if done.fallback is not None:
            self.fallbacks[e.name] = done.fallback
        return done.report

    def compute(self, e: PlanEntry) -> Finished:
        """The report and output tensors of one entry (nothing written)."""
        rep = LayerReport(e.name, e.shape, e.action, e.format, e.rule, e.reason, bytes_in=e.bytes_in,
                          bytes_out=e.bytes_out)
        if e.action == DROP:
            return Finished(rep, [])
        t = self.reader.get(e.name)  # float32 where a weight transform (LoRA merge) changed it
        if e.action == KEEP:
            return Finished(rep, [(e.name, (t if self.hooks is None else self.hooks.rewrite(e.name, t)).to(e.dtype))])
        # a cast format casts 1-D / conv tensors too (convert/cast.py): the math sees a 2-D view of them
        x = t.to(self.device).reshape(_matrix_shape(t.shape))
        if self.hooks is not None:
            x = self.hooks.rewrite(e.name, x)
        fmt = get_format(e.format or self.plan.format)
        try:
            tensors = self.convert(e, fmt, x)
        except (LayerFallback, OptimizerFallback) as f:
            t = t.to(e.dtype)
            return Finished(LayerReport(e.name, e.shape, KEEP, None, "fallback",
                                        f"kept in high precision: {f.reason}", bytes_in=e.bytes_in,
                                        bytes_out=t.nbytes), [(e.name, t)], f.reason)
        if self.opts.quant_error_sink is not None and e.action == QUANTIZE:
            self.opts.quant_error_sink.add(e.name, x, tensors, e.comfy_quant)
        stats, rows = weight_stats(x, fmt, e.params, tensors, self.opts.stats_limit)
        rep.sqnr_db, rep.rel_mse, rep.max_abs_err, rep.stats_rows = (stats.sqnr_db, stats.rel_mse,
                                                                     stats.max_abs_err, rows)
        if self.hooks is not None and e.layer in self.hooks.results:
            res = self.hooks.results[e.layer]
            rep.optimizer, rep.optimizer_gain_db = res.method, res.gain_db
            rep.notes = list(self.hooks.layer_notes.get(e.layer, []))
        if e.action == CAST:
            return Finished(rep, [(e.name, tensors["weight"].reshape(e.shape))])
        out = []
        for spec in e.outputs:
            suffix = spec.name[len(e.layer) + 1:]
            out.append((spec.name, encode_comfy_quant(e.comfy_quant or {}) if suffix == "comfy_quant"
                        else tensors[suffix]))
        return Finished(rep, out)

    def convert(self, e: PlanEntry, fmt: QuantFormat, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of one planned weight; LayerFallback when it must stay in high precision."""
        why = problem(e, x)
        if why is not None:
            if not self.opts.force:
                raise NonFiniteWeightError(f"layer '{e.name}' {why}; fix the checkpoint, or pass --force to "
                                           "keep it in high precision")
            raise LayerFallback(f"{why} (--force)")
        if self.hooks is not None and e.action == QUANTIZE:
            return self.hooks.quantize(e, x)
        return quantize_rows(x, fmt, e.params, CHUNK_ELEMENTS if self.device.type == "cpu" else None)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a tensor is converted as: itself, ``[n, 1]`` for a vector, ``[out, rest]`` for a kernel."""
    if len(shape) == 2:
        return shape[0], shape[1]
    return (shape[0] if shape else 1), (math.prod(shape[1:]) if len(shape) > 1 else 1)


@dataclass
class Conversion:
    """Everything decided before the first tensor is read: input, output, device, plan, header, optimizer hooks."""

    reader: Any  # CheckpointReader, or a TransformedReader over one (--merge-lora)
    output: Path
    device: torch.device
    plan: Plan
    metadata: dict[str, str]
    hooks: Any  # comfyquant.convert.optimizing.OptimizeHooks, or None for plain RTN
    notes: list[str]
    auto: Any = None  # the AutoPlan behind a --format auto plan


def prepare_conversion(input: str | Path, output: str | Path, opts: ConvertOptions) -> Conversion:
    """Open and check the input and output, plan the conversion, bind the weight transform and set up the
    optimizer hooks (warnings are said here, before any work)."""
    out = Path(output)
    reader = CheckpointReader(resolve_input(input))
    check_paths(reader, out, opts.force)
    device = resolve_device(opts.device)
    mismatch = check_model_choice(opts.model, reader.shapes(), opts.strict_preset)
    notes: list[str] = []
    if mismatch is not None:
        opts.progress.warn(mismatch)  # before the work starts, so a wrong --model can be stopped at once
        notes.append(mismatch)
    if opts.weight_transform is not None:  # bound before the output is opened: mismatches write nothing
        transform = opts.weight_transform.bind(reader.infos, str(reader.path))
        notes.extend(transform.notes)
        for warning in transform.warnings:  # e.g. LoRA modules that match no layer: said before the work starts
            opts.progress.warn(warning)
        reader = TransformedReader(reader, transform)
    auto = None  # planned after the transform: --format auto measures the merged weights
    if opts.format == AUTO:
        from comfyquant.convert.auto import plan_auto_conversion

        plan, auto = plan_auto_conversion(reader, opts)
    else:
        given = [f for f, v in (("--budget", opts.budget), ("--auto-confidence", opts.auto_confidence),
                                ("--auto-margin-db", opts.auto_margin_db)) if v is not None]
        if given:
            raise UserError(f"{given[0]} applies to --format auto only")
        plan = build_plan(reader.infos, opts.plan_options(), metadata=reader.metadata)
    metadata = {**reader.metadata, "comfyquant.version": __version__, "comfyquant.format": plan.format,
                "comfyquant.model": plan.preset}
    if auto is not None:
        metadata[AUTO_METADATA] = json.dumps(auto.summary(), separators=(",", ":"))
    from comfyquant.convert.optimizing import make_hooks

    hooks = make_hooks(reader, plan, opts.optimizer, opts.calibration, opts.calibration_lora,
                       calibration_used=auto is not None)
    if hooks is not None:
        notes.extend(hooks.notes)
        metadata["comfyquant.optimizer"] = opts.optimizer.method
    return Conversion(reader, out, device, plan, metadata, hooks, notes, auto)


def conversion_report(c: Conversion, layers: list[LayerReport], fallbacks: Mapping[str, str],
                      opts: ConvertOptions, start: float) -> Report:
    """The report of a finished conversion (``start``: its ``time.perf_counter()`` at the beginning)."""
    notes = list(c.notes)
    if opts.quant_error_sink is not None:
        notes.extend(opts.quant_error_sink.finish())
    if fallbacks:
        notes.append(f"{len(fallbacks)} layer(s) kept in high precision: "
                     + "; ".join(f"{k} ({v})" for k, v in fallbacks.items()))
    sampled = [x for x in layers if x.stats_rows is not None]
    if sampled:
        notes.append(f"error statistics of {len(sampled)} large layer(s) computed on a sample of evenly spaced "
                     f"rows (<= {opts.stats_limit} elements each)")
    report = Report(str(c.reader.path), str(c.output), c.plan.format, c.plan.preset, layers, notes)
    if c.auto is not None:
        _check_heldout(c.auto, opts, c.output)
        report.auto = c.auto
    report.seconds = time.perf_counter() - start
    return report


def _check_heldout(auto: Any, opts: ConvertOptions, out: Path) -> None:
    """With a workload probe: the written file's quality on held-out inputs, and whether a floor holds."""
    if opts.probe is None or not opts.verify_heldout:
        return
    auto.heldout = opts.probe.heldout(out)
    quality = auto.budget.quality
    if quality is not None and quality[0] in auto.heldout:
        got = float(auto.heldout[quality[0]])
        verdict = "met" if got >= quality[1] else "MISSED"
        auto.notes.append(f"{quality[0]} floor {quality[1]:g} {verdict} on held-out inputs: {got:.6g} "
                          f"({auto.heldout.get('inputs', '')})")


def run_conversion(input: str | Path, output: str | Path, opts: ConvertOptions) -> Report:
    """Convert ``input`` to ``output`` as ``opts`` say and return the report (the API and CLI call this)."""
    start = time.perf_counter()
    c = prepare_conversion(input, output, opts)
    streamer = Streamer(c.reader, c.plan, opts, c.device, c.hooks)
    layers = streamer.run(c.output, c.metadata)
    return conversion_report(c, layers, streamer.fallbacks, opts, start)
