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

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from comfyquant import __version__
from comfyquant.convert.hooks import BoundWeightTransform, QuantErrorSink, WeightTransform, transformed
from comfyquant.convert.plan import CAST, DROP, KEEP, QUANTIZE, Plan, PlanEntry, PlanOptions, build_plan
from comfyquant.convert.report import LayerReport, Report
from comfyquant.errors import NonFiniteWeightError, UserError
from comfyquant.io.comfy_meta import encode_comfy_quant
from comfyquant.io.reader import CheckpointReader, resolve_input
from comfyquant.io.writer import StreamingWriter
from comfyquant.quant.formats import FormatSpec, get_format
from comfyquant.quant.metrics import ErrorStats, all_finite, error_stats
from comfyquant.quant.quantize import QuantizedWeight, dequantize_weight, quantize_weight

CHUNK_ELEMENTS = 2**20  # CPU row chunks: float32 temporaries of 4 MiB stay in cache (several times faster)
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
    progress: bool = True
    weight_transform: WeightTransform | None = None  # float weights changed before quantizing (--merge-lora)
    quant_error_sink: QuantErrorSink | None = None  # sees each quantized layer's error (--extract-lora)

    def plan_options(self) -> PlanOptions:
        return PlanOptions(self.format, self.model, self.layer_config, self.block_size)

    @property
    def stats_limit(self) -> int:
        return STATS_MAX_ELEMENTS_LOW_MEMORY if self.low_memory else STATS_MAX_ELEMENTS


class _KeepInstead(Exception):
    """Raised mid-stream under ``--force`` when a planned layer must stay in high precision after all."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self.name, self.reason = name, reason


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


def _sample(x: torch.Tensor, qw: QuantizedWeight, limit: int, block: int) -> tuple[torch.Tensor, dict, int]:
    """Evenly spaced rows of the reference and the stored tensors (whole row blocks for block scales)."""
    n, k = x.shape
    scaling = qw.fmt.scaling
    step = block if scaling == "block" else 1
    groups = -(-n // step)
    # whole row blocks for block scales, and at least 8 of them: tiles differ more than rows do
    count = min(groups, max(8 if step > 1 else 1, limit // max(1, k * step)))
    g = torch.linspace(0, groups - 1, count).round().long().unique()
    rows = (g[:, None] * step + torch.arange(step)[None, :]).reshape(-1)
    rows = rows[rows < n].to(x.device)
    tensors = dict(qw.tensors)
    tensors["weight"] = qw.tensors["weight"][rows]
    if scaling == "row":
        tensors["weight_scale"] = qw.tensors["weight_scale"][rows]
    elif scaling == "block":
        tensors["weight_scale"] = qw.tensors["weight_scale"][g.to(x.device)]
    return x[rows], tensors, len(rows)


def quantize_rows(x: torch.Tensor, fmt: FormatSpec, *, block_size: int, rot_group: int | None,
                  chunk_elements: int | None = CHUNK_ELEMENTS) -> QuantizedWeight:
    """:func:`quantize_weight`, run over chunks of rows when the scales are per row or per row block.

    The result is bit-identical (each row or row block is quantized on its own either way); the float32
    temporaries of one chunk stay cache-sized, which is several times faster on CPUs and keeps peak memory
    at the stored tensors plus one chunk. Per-tensor scales need the whole tensor and are not chunked.
    """
    n, k = x.shape
    if fmt.scaling not in ("row", "block") or not chunk_elements or x.numel() <= chunk_elements:
        return quantize_weight(x, fmt, block_size=block_size, rot_group=rot_group)
    step = block_size if fmt.scaling == "block" else 1
    rows = max(step, chunk_elements // max(1, k) // step * step)
    first = quantize_weight(x[:rows], fmt, block_size=block_size, rot_group=rot_group)
    q0, s0 = first.tensors["weight"], first.tensors["weight_scale"]
    q = torch.empty((n, k), dtype=q0.dtype, device=q0.device)
    s = torch.empty((-(-n // step), *s0.shape[1:]), dtype=s0.dtype, device=s0.device)
    q[:rows], s[: s0.shape[0]] = q0, s0
    conf = first.comfy_quant
    del first, q0, s0
    for i in range(rows, n, rows):
        part = quantize_weight(x[i:i + rows], fmt, block_size=block_size, rot_group=rot_group)
        q[i:i + rows] = part.tensors["weight"]
        s[i // step: i // step + part.tensors["weight_scale"].shape[0]] = part.tensors["weight_scale"]
    return QuantizedWeight(fmt, {"weight": q, "weight_scale": s}, conf)


def weight_stats(x: torch.Tensor, qw: QuantizedWeight, limit: int, block: int) -> tuple[ErrorStats, int | None]:
    """Error of the stored weight vs the float weight; on a row sample when it has more than ``limit`` elements."""
    if x.numel() <= limit:
        return error_stats(x, dequantize_weight(qw.tensors, qw.comfy_quant)), None
    ref, tensors, rows = _sample(x, qw, limit, block)
    return error_stats(ref, dequantize_weight(tensors, qw.comfy_quant)), rows


class _Streamer:
    """Runs one plan against one reader and writer, producing the per-layer reports."""

    def __init__(self, reader: CheckpointReader, plan: Plan, opts: ConvertOptions, device: torch.device,
                 transform: BoundWeightTransform | None = None) -> None:
        self.reader, self.plan, self.opts, self.device = reader, plan, opts, device
        self.transform = transform

    def run(self, output: Path, metadata: dict[str, str]) -> list[LayerReport]:
        layers: list[LayerReport] = []
        n = len(self.plan.entries)
        with StreamingWriter(output, self.plan.specs, metadata, overwrite=self.opts.force,
                             background=True) as w, \
                tqdm(total=self.plan.bytes_in, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                     desc="converting", disable=not self.opts.progress, dynamic_ncols=True) as bar:
            entries = self.plan.entries
            for i, e in enumerate(entries):
                nxt = next((x for x in entries[i + 1:i + 3] if x.action != DROP), None)
                if nxt is not None:
                    self.reader.prefetch(nxt.name)
                layers.append(self.process(e, w))
                bar.set_postfix_str(f"{i + 1}/{n} tensors", refresh=False)
                bar.update(e.bytes_in)
                if self.opts.low_memory and self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return layers

    def check(self, e: PlanEntry, why: str | None) -> None:
        """Stop on a weight that cannot be converted: a user error, or under ``--force`` a re-plan."""
        if why is None:
            return
        if self.opts.force:
            raise _KeepInstead(e.name, f"kept in high precision: {why} (--force)")
        raise NonFiniteWeightError(f"layer '{e.name}' {why}; fix the checkpoint, or pass --force to keep "
                                   "it in high precision")

    def process(self, e: PlanEntry, w: StreamingWriter) -> LayerReport:
        rep = LayerReport(e.name, e.shape, e.action, e.format, e.rule, e.reason, bytes_in=e.bytes_in,
                          bytes_out=e.bytes_out)
        if e.action == DROP:
            return rep
        t = self.reader.get(e.name)
        if e.action == KEEP:
            w.write(e.name, transformed(self.transform, e.name, t).to(t.dtype))
            return rep
        x = transformed(self.transform, e.name, t, self.device).to(self.device)
        block = int((e.comfy_quant or {}).get("group_size", self.plan.block_size))
        self.check(e, problem(e, x))
        if e.action == CAST:
            qw = quantize_weight(x, e.format or self.plan.format)
        else:
            conf = e.comfy_quant or {}
            qw = quantize_rows(x, get_format(e.format or self.plan.format), block_size=block,
                               rot_group=conf.get("convrot_groupsize"),
                               chunk_elements=CHUNK_ELEMENTS if self.device.type == "cpu" else None)
            if any(conf.get(k) != v for k, v in (qw.comfy_quant or {}).items()):  # pragma: no cover - a bug
                raise RuntimeError(f"{e.name}: quantizer wrote {qw.comfy_quant}, plan said {conf}")
            qw.comfy_quant = dict(conf)
        if self.opts.quant_error_sink is not None and e.action == QUANTIZE:
            self.opts.quant_error_sink.add(e.name, x, qw.tensors, qw.comfy_quant)
        stats, rows = weight_stats(x, qw, self.opts.stats_limit, block)
        rep.sqnr_db, rep.rel_mse, rep.max_abs_err, rep.stats_rows = (stats.sqnr_db, stats.rel_mse,
                                                                     stats.max_abs_err, rows)
        for spec in e.outputs:
            suffix = spec.name[len(e.layer) + 1:] if e.action == QUANTIZE else "weight"
            tensor = encode_comfy_quant(qw.comfy_quant) if suffix == "comfy_quant" else qw.tensors[suffix]
            w.write(spec.name, tensor)
        return rep


def _scan_problems(reader: CheckpointReader, plan: Plan, device: torch.device,
                   transform: BoundWeightTransform | None = None) -> dict[str, str]:
    """Every quantize/cast weight that cannot be converted, with the reason (only run under ``--force``)."""
    found = {}
    for e in plan.entries:
        if e.action in (QUANTIZE, CAST):
            why = problem(e, transformed(transform, e.name, reader.get(e.name), device).to(device))
            if why:
                found[e.name] = f"kept in high precision: {why} (--force)"
    return found


def run_conversion(input: str | Path, output: str | Path, opts: ConvertOptions) -> Report:
    """Convert ``input`` to ``output`` as ``opts`` say and return the report (the API and CLI call this)."""
    start = time.perf_counter()
    out = Path(output)
    reader = CheckpointReader(resolve_input(input))
    check_paths(reader, out, opts.force)
    device = resolve_device(opts.device)
    plan = build_plan(reader.infos, opts.plan_options(), metadata=reader.metadata)
    metadata = {**reader.metadata, "comfyquant.version": __version__, "comfyquant.format": plan.format,
                "comfyquant.model": plan.preset}
    transform = opts.weight_transform.bind(reader.infos, str(reader.path)) if opts.weight_transform else None
    notes: list[str] = list(transform.notes) if transform is not None else []
    try:
        layers = _Streamer(reader, plan, opts, device, transform).run(out, metadata)
    except _KeepInstead:
        overrides = _scan_problems(reader, plan, device, transform)
        plan = build_plan(reader.infos, opts.plan_options(), metadata=reader.metadata, overrides=overrides)
        notes.append(f"{len(overrides)} layer(s) kept in high precision because of --force: "
                     + ", ".join(overrides))
        layers = _Streamer(reader, plan, opts, device, transform).run(out, metadata)
    if opts.quant_error_sink is not None:
        notes += opts.quant_error_sink.finish()
    sampled = [x for x in layers if x.stats_rows is not None]
    if sampled:
        notes.append(f"error statistics of {len(sampled)} large layer(s) computed on a sample of evenly spaced "
                     f"rows (<= {opts.stats_limit} elements each)")
    report = Report(str(reader.path), str(out), plan.format, plan.preset, layers, notes)
    report.seconds = time.perf_counter() - start
    return report
