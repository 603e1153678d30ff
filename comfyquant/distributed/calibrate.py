"""Calibration across processes: every rank runs its share of the calibration inputs, each layer's
statistics are reduced onto the rank that owns it, and rank 0 writes the one calibration file in order.

Owners are chosen by Hessian size (:func:`hessian_owners`), so the reduced statistics, and the work of
adding them up, are spread over the ranks and no rank holds every Hessian. Hessians, row counts and column
sums add and absmax takes the maximum (the same statistics as one process, up to the order of the float
additions); the reservoir samples are merged by smallest key (each rank draws its own keys, so the sample is
a different uniform sample of the same rows than one process would keep).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from comfyquant.calibration.collector import (
    CalibrationConfig,
    Collector,
    Data,
    NameMap,
    plan_run,
    run_data,
)
from comfyquant.calibration.fileio import CalibrationWriter
from comfyquant.calibration.stats import LayerStats
from comfyquant.distributed.assign import hessian_owners
from comfyquant.distributed.session import Session, watched
from comfyquant.distributed.transport import Outbox, receive
from comfyquant.io.writer import temp_path_for

SEED_STRIDE = 1_000_000_007  # rank r draws reservoir keys from seed + r * SEED_STRIDE (independent per rank)
_PARTS = ("hessian", "col_sum", "absmax", "sample", "keys")


def reduce_to_owner(s: LayerStats, owner: int, rank: int, world: int) -> LayerStats | None:
    """Add up one layer's statistics of every rank on ``owner`` (collective: every rank calls it, in the
    same layer order). Returns the merged statistics on the owner, None elsewhere."""
    what = f"reducing statistics onto rank {owner}"
    count = torch.tensor([s.count], dtype=torch.int64, device=s.hessian.device)
    for t, op in ((s.hessian, dist.ReduceOp.SUM), (s.col_sum, dist.ReduceOp.SUM), (count, dist.ReduceOp.SUM),
                  (s.absmax, dist.ReduceOp.MAX)):
        watched(lambda t=t, op=op: dist.reduce(t, owner, op=op), what)
    keys = [torch.empty_like(s.keys) for _ in range(world)] if rank == owner else None
    rows = [torch.empty_like(s.sample) for _ in range(world)] if rank == owner else None
    watched(lambda: dist.gather(s.keys, keys, dst=owner), what)
    watched(lambda: dist.gather(s.sample, rows, dst=owner), what)
    if rank != owner:
        return None
    out = LayerStats(s.hessian, int(count[0]), s.col_sum, s.absmax, torch.zeros_like(s.sample),
                     torch.full_like(s.keys, float("inf")))
    for k, r in zip(keys, rows, strict=True):  # type: ignore[arg-type]
        out.offer_sample(k, r)
    return out


def _stats_tensors(s: LayerStats) -> list[tuple[str, torch.Tensor]]:
    return [(p, getattr(s, p)) for p in _PARTS]


def _stats_from(meta: Mapping[str, Any], tensors: list[tuple[str, torch.Tensor]]) -> LayerStats:
    t = dict(tensors)
    return LayerStats(t["hessian"], int(meta["count"]), t["col_sum"], t["absmax"], t["sample"], t["keys"])


def calibrate_to_file_distributed(model: nn.Module, data: Data, path: str | Path, session: Session, *,
                                  name_map: NameMap | None = None, layers: Iterable[str] | None = None,
                                  config: CalibrationConfig | None = None, meta: Mapping[str, Any] | None = None,
                                  overwrite: bool = False, progress: bool = False) -> dict[str, Any] | None:
    """:func:`comfyquant.calibration.calibrate_to_file` with every rank of ``session`` running ``data``, its
    own share of the calibration inputs. Rank 0 writes ``path`` and returns the summary; other ranks None."""
    session.claim()
    config = config or CalibrationConfig()
    rank, world = session.rank, session.world
    run = plan_run(model, data, name_map, layers, config)
    features, dev, dtype, groups = run.features, run.device, run.dtype, run.groups
    names = list(features)
    owner = dict(zip(names, hessian_owners([features[n] for n in names], world), strict=True))
    local = replace(config, seed=config.seed + SEED_STRIDE * rank)
    header = {"percentile": config.percentile, **(meta or {}), "processes": world}
    rows: dict[str, int] = {}
    if rank != 0:
        outbox = Outbox()
        for group in groups:
            for name, s in _reduced_group(model, data, group, features, local, dtype, dev, name_map, owner,
                                          rank, world):
                outbox.send({"layer": name, "count": s.count}, _stats_tensors(s.to("cpu")))
        outbox.flush()
        session.finish()
        return None
    session.on_abort(temp_path_for(Path(path)))
    with CalibrationWriter(path, features, header, reservoir=config.reservoir, hessian_dtype=dtype,
                           overwrite=overwrite) as w:
        for gi, group in enumerate(groups):
            if progress:
                print(f"calibrating: group {gi + 1}/{len(groups)} ({len(group)} layers, {world} ranks)",
                      file=sys.stderr)
            mine = dict(_reduced_group(model, data, group, features, local, dtype, dev, name_map, owner, 0, world))
            for name in group:
                if owner[name] == 0:
                    s = mine.pop(name)
                else:
                    desc, tensors = receive(owner[name])
                    if desc["layer"] != name:  # pragma: no cover - the ranks disagree on the layer order
                        raise RuntimeError(f"rank {owner[name]} sent '{desc['layer']}', expected '{name}'")
                    s = _stats_from(desc, tensors)
                rows[name] = s.count
                w.add(name, s)
                del s
        session.wait_peers_done()
    session.release()
    return {"layers": len(features), "groups": len(groups), "rows": rows,
            "not_run": [n for n, r in rows.items() if r == 0], "processes": world}


def _reduced_group(model: nn.Module, data: Data, group: list[str], features: Mapping[str, int],
                   config: CalibrationConfig, dtype: torch.dtype, dev: torch.device, name_map: NameMap | None,
                   owner: Mapping[str, int], rank: int, world: int) -> list[tuple[str, LayerStats]]:
    """Run this rank's data over one group of layers, reduce each layer onto its owner; the owned results."""
    with Collector(model, name_map, group, config) as c:
        run_data(model, data)
    out = []
    for name in group:
        s = c.layers.pop(name, None) or LayerStats.empty(features[name], config.reservoir, dtype, dev)
        merged = reduce_to_owner(s, owner[name], rank, world)
        del s
        if merged is not None:
            out.append((name, merged))
    return out
