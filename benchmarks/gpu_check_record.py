"""What the GPU check scripts share: the results list, ``record`` (print, keep, then poison the allocator's free
memory so an output a kernel never wrote fails the next check) and the relative L2 error."""

from __future__ import annotations

import json

import torch

RESULTS: list[dict] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def record(name: str, ok: bool, **info: object) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(info)}", flush=True)
    poison()


def poison() -> None:
    """Leave a 512 MiB NaN-filled free block in the caching allocator: the next outputs (carved from it) start as
    NaN, so an output element a kernel never wrote fails the finiteness and accuracy checks."""
    junk = torch.full((128 << 20,), float("nan"), device="cuda")
    del junk
