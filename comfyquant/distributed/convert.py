"""The converter across processes: each rank converts the layers it owns, rank 0 writes one ordinary file.

Every rank opens the input and builds the same plan (it depends on headers only); :func:`plan_owners` shares
the layers out. Rank 0 walks the plan in file order through the normal :class:`StreamingWriter`, converting
its own entries and receiving the others' from their owners, who compute theirs in the same order and send
them with a bounded number in flight. The per-entry work is the single-process :class:`Streamer`'s, so
round to nearest is bit-identical to one process, and an optimizer runs the same math per layer.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from comfyquant.convert.pipeline import (
    ConvertOptions,
    Finished,
    Streamer,
    conversion_report,
    prepare_conversion,
)
from comfyquant.convert.plan import DROP, QUANTIZE, Plan
from comfyquant.convert.report import LayerReport, Report
from comfyquant.distributed.assign import plan_owners
from comfyquant.distributed.session import Session, rank_device
from comfyquant.distributed.transport import Outbox, receive
from comfyquant.errors import UserError
from comfyquant.io.writer import StreamingWriter, temp_path_for


def _encode(done: Finished) -> dict[str, object]:
    rep = asdict(done.report)
    rep["shape"] = list(done.report.shape)
    return {"report": rep, "fallback": done.fallback}


def _decode(meta: dict[str, object], tensors: list[tuple[str, torch.Tensor]]) -> Finished:
    rep = dict(meta["report"])  # type: ignore[arg-type]
    rep["shape"] = tuple(rep["shape"])
    return Finished(LayerReport(**rep), tensors, meta["fallback"])  # type: ignore[arg-type]


def _announce(session: Session, plan: Plan, owners: list[int], device: torch.device) -> None:
    quant = [i for i, e in enumerate(plan.entries) if e.action == QUANTIZE]
    mine = sum(1 for i in quant if owners[i] == session.rank)
    print(f"comfyquant convert [{session.cfg.label}]: {mine} of {len(quant)} quantized layer(s) here, on {device}",
          file=sys.stderr, flush=True)


def refuse_in_job(opts: ConvertOptions) -> None:
    """Refuse what needs every layer in one process. Call it before joining the job: a rank that refused
    after joining could see a faster rank's ABORT before saying its own reason."""
    if opts.quant_error_sink is not None:
        raise UserError("--extract-lora needs every layer's error in one process: run it without torchrun")
    if opts.format == "auto":
        raise UserError("--format auto plans every layer against the others in one process: run it without "
                        "torchrun (the plan's cost is a fraction of its calibration's, docs/PERFORMANCE.md)")


def convert_distributed(input: str | Path, output: str | Path, opts: ConvertOptions, session: Session,
                        *, announce: bool = True) -> Report | None:
    """Convert as :func:`comfyquant.convert.pipeline.run_conversion` does, with every rank of ``session``
    converting its share; returns the report on rank 0 and None elsewhere. ``announce``: one line per rank
    on stderr when its work starts (what it owns, on which device)."""
    start = time.perf_counter()
    refuse_in_job(opts)
    session.claim()
    dev = rank_device(opts.device, session.cfg)
    opt = opts.optimizer
    if opt is not None and opt.device is not None:
        opt = opt.with_(device=rank_device(opt.device, session.cfg))
    progress = opts.progress
    if session.rank != 0:  # every rank plans alike and would say the same warnings: rank 0 says them once
        progress = replace(progress, mode="off", stream=io.StringIO())
    opts = replace(opts, device=dev, optimizer=opt, progress=progress)
    c = prepare_conversion(input, output, opts)
    optimizing = c.hooks is not None and opts.optimizer is not None and opts.optimizer.method != "rtn"
    follow_bias = c.hooks is not None and bool(opts.optimizer.bias_correction)
    owners = plan_owners(c.plan, session.world, optimizing=optimizing, follow_bias=follow_bias)
    streamer = Streamer(c.reader, c.plan, opts, c.device, c.hooks)
    if session.rank != 0:
        if announce:
            _announce(session, c.plan, owners, c.device)
        _serve(streamer, owners, session.rank)
        session.finish()
        return None
    session.on_abort(temp_path_for(c.output))
    layers = _write(streamer, c.output, c.metadata, owners, session, announce)
    session.release()
    return conversion_report(c, layers, streamer.fallbacks, opts, start)


def _serve(streamer: Streamer, owners: list[int], rank: int) -> None:
    """A rank other than 0: compute the owned entries in file order and send each to rank 0."""
    entries = [e for e, o in zip(streamer.plan.entries, owners, strict=True) if o == rank]
    outbox = Outbox()
    for i, e in enumerate(entries):
        if i + 1 < len(entries) and entries[i + 1].action != DROP:
            streamer.reader.prefetch(entries[i + 1].name)
        done = streamer.compute(e)
        outbox.send(_encode(done), done.tensors)
        del done
        if streamer.opts.low_memory and streamer.device.type == "cuda":
            torch.cuda.empty_cache()
    outbox.flush()


def _write(streamer: Streamer, output: Path, metadata: dict[str, str], owners: list[int], session: Session,
           announce: bool) -> list[LayerReport]:
    """Rank 0: the whole file in plan order, own entries computed here, the others received."""
    plan, opts = streamer.plan, streamer.opts
    layers: list[LayerReport] = []
    entries = plan.entries
    mine = [i for i, o in enumerate(owners) if o == 0]
    with StreamingWriter(output, plan.specs, metadata, overwrite=opts.force, background=True,
                         amendable=True) as w, \
            opts.progress.task(f"convert ({session.world} ranks)", len(entries), "tensors",
                               total_bytes=plan.bytes_in) as bar:
        if announce:
            _announce(session, plan, owners, streamer.device)
        k = 0
        for i, e in enumerate(entries):
            if owners[i] == 0:
                k += 1
                nxt = next((entries[j] for j in mine[k:k + 2] if entries[j].action != DROP), None)
                if nxt is not None:
                    streamer.reader.prefetch(nxt.name)
                layers.append(streamer.process(e, w))
            else:
                meta, tensors = receive(owners[i])
                layers.append(streamer.write(e, _decode(meta, tensors), w))
            bar.update(1, e.bytes_in)
            if opts.low_memory and streamer.device.type == "cuda":
                torch.cuda.empty_cache()
        session.wait_peers_done()
    return layers
