"""``DispatchPolicy``: an explicit, frozen object that steers the automatic backend choice of the layers given it.

A policy travels with a layer (``QuantLinear.set_backend(policy)`` / ``QuantizeConfig(backend=policy)``) or a
call (``quant_linear(..., backend=policy)``); under torch.compile it crosses the custom op as a compact string
key (``auto|<key>``) that :func:`policy_from_key` turns back into the same policy. Nothing is process-wide.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from comfyquant.runtime.kernels.costs import DeviceCosts
from comfyquant.runtime.kernels.dense_copy import CopyBudget

MODES = ("eager", "graph")


@dataclass(frozen=True)
class DispatchPolicy:
    """How the automatic choice is made.

    ``mode``: ``"eager"`` counts each path's host launch cost (plain PyTorch / ComfyUI), ``"graph"`` only GPU
    time (CUDA graphs, ``reduce-overhead``; a capture in progress is detected without it). ``allow``: if
    non-empty, only these backend names may be chosen. ``costs``: the cost table to decide with (None: this
    device's measured table, ``calibrate.device_costs``). ``measure``: eager calls time every candidate
    backend at the first call of each shape and keep the fastest (``measured.py``; a few ms per new shape plus
    the candidates' compiles, then cached in ``measure_cache`` or ``~/.cache/comfyquant``); CUDA-graph
    captures and torch.compile use the cost model. ``copies``: a byte budget for dense 16-bit copies of the layers whose
    every quantized path the cost model puts over bf16 (``dense_copy.wants_copy``): those run ``F.linear`` on the copy
    (eager and CUDA graphs; not under torch.compile, whose policy key leaves it out). One budget per model.
    """

    mode: str = "eager"
    allow: tuple[str, ...] = ()
    costs: DeviceCosts | None = None
    measure: bool = False
    measure_cache: str | None = None
    copies: CopyBudget | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DispatchPolicy.mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "allow", tuple(self.allow))
        # built once here, outside any trace: torch.compile reads it as a constant attribute
        d = {"mode": self.mode, "allow": list(self.allow),
             "costs": None if self.costs is None else self.costs.to_json(), "measure": self.measure,
             "measure_cache": self.measure_cache}
        object.__setattr__(self, "_key", json.dumps(d, separators=(",", ":"), sort_keys=True))

    def key(self) -> str:
        """A compact string that :func:`policy_from_key` maps back to this policy (crosses the custom op)."""
        return self._key


@functools.lru_cache(maxsize=64)
def policy_from_key(key: str) -> DispatchPolicy:
    """Inverse of :meth:`DispatchPolicy.key`."""
    d = json.loads(key)
    costs = d.get("costs")
    return DispatchPolicy(mode=d.get("mode", "eager"), allow=tuple(d.get("allow", ())),
                          costs=None if costs is None else DeviceCosts.from_json(costs),
                          measure=bool(d.get("measure", False)), measure_cache=d.get("measure_cache"))
