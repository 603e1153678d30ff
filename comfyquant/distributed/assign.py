"""Which rank does which layer: greedy balancing of estimated work, in file order.

llm-compressor's data-parallel GPTQ gives each module to a rank by Hessian size (greedy bin packing); here
the same greedy rule runs in file order (each item to the least-loaded rank so far), because rank 0 writes
the file in that order: owners that interleave keep every rank busy while rank 0 writes, where a
largest-first packing could hand one rank a long run of consecutive layers that the others then wait for.
"""

from __future__ import annotations

from collections.abc import Sequence

from comfyquant.convert.plan import CAST, QUANTIZE, Plan

# Rank 0 also receives and writes every output byte; in an RTN conversion that costs about half of what
# reading and quantizing an input byte does (the 8 GiB benchmark: convert 1.11x a plain copy), so the writer
# is charged this much per output byte and gets fewer layers to quantize.
WRITE_COST_PER_BYTE = 0.5


def greedy_owners(costs: Sequence[float | None], world: int, writer_costs: Sequence[float] | None = None
                  ) -> list[int]:
    """Owner rank of every item: ``None`` cost = pinned to rank 0 (no work to share); others go, in order, to
    the rank with the least load so far (ties to the lowest rank). ``writer_costs[i]`` is charged to rank 0
    for item i whoever owns it (the writer's share). Deterministic: every rank computes the same answer."""
    if world < 1:
        raise ValueError("world must be >= 1")
    load = [0.0] * world
    owners: list[int] = []
    for i, c in enumerate(costs):
        if writer_costs is not None:
            load[0] += writer_costs[i]
        if c is None:
            owners.append(0)
            continue
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += c
        owners.append(r)
    return owners


def gptq_cost(n: int, k: int) -> float:
    """Floating-point work of GPTQ on an ``[N, K]`` weight: the K x K Cholesky work plus N rows updated
    through K columns of the K x K inverse factor (learned rounding and QuIP scale alike)."""
    return float(k) ** 3 + float(n) * float(k) ** 2


def plan_owners(plan: Plan, world: int, *, optimizing: bool, follow_bias: bool) -> list[int]:
    """Owner rank of every plan entry.

    Quantized and cast weights are shared out (by GPTQ work when ``optimizing``, else by input bytes, with
    rank 0 charged for writing); kept and dropped tensors stay on rank 0, which reads them while it writes.
    ``follow_bias``: ``L.bias`` goes to the owner of ``L.weight`` (bias correction computes it from the
    optimized weight there).
    """
    entries = plan.entries
    costs: list[float | None] = []
    for e in entries:
        if e.action == QUANTIZE and optimizing:
            costs.append(gptq_cost(e.shape[0], e.shape[1]))
        elif e.action in (QUANTIZE, CAST):
            costs.append(float(max(e.bytes_in, 1)))
        else:
            costs.append(None)
    writer = None if optimizing else [WRITE_COST_PER_BYTE * e.bytes_out for e in entries]
    owners = greedy_owners(costs, world, writer)
    if follow_bias:
        weight_owner = {e.layer: owners[i] for i, e in enumerate(entries) if e.action == QUANTIZE}
        for i, e in enumerate(entries):
            if e.name.endswith(".bias") and e.name[: -len(".bias")] in weight_owner:
                owners[i] = weight_owner[e.name[: -len(".bias")]]
    return owners


def hessian_owners(features: Sequence[int], world: int) -> list[int]:
    """Owner rank of every calibrated layer by Hessian size (``K * K``), in layer order."""
    return greedy_owners([float(k) * k for k in features], world)
