"""Measured dispatch: time every candidate backend on a layer's first call of an input shape, keep the fastest.

The cost model (``costs.py``) predicts each path from a few device constants; on shapes it models badly (narrow
N, small K, the host-bound middle) it picks a path that measures up to 2x slower than another (the H200 sweep of
2026-12-02). With ``DispatchPolicy(measure=True)`` the first eager call of each (kind, M, N, K, options, dtype,
bias) instead runs each candidate backend the way a bound layer runs it from its second call on (its plan where
it has one, else the general path): one call to compile, then the best of three rounds of back-to-back calls,
synchronized, so the time per call is what eager mode pays (host and GPU overlapped). The winner is kept in a
JSON file per GPU model, torch and triton version (``cache_path``), so later layers of the same shape and later
processes reuse it without timing. Candidates that refuse the shape (a ``UserError``) are skipped with their
reason; a backend that fails otherwise raises, as it would when called.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.io.writer import write_small_file
from comfyquant.runtime.kernels.backends import device_cache_file
from comfyquant.runtime.kernels.registry import KernelBackend, KernelKind

CACHE_VERSION = 4  # bumped when a candidate's kernels change speed, so kept choices are timed again (2: the
# rotating activation kernels' configurations and split form, runs 41-42: convrot W8A8 up to 1.6x faster against
# candidates that did not change; 3: the group-rows rotating kernel on 3,072-column rows, runs 127 / 141; 4: the
# int8 codes' epilogue without float-to-int conversions and the short rows' 2-warp schedule, runs 147-148)


@dataclass
class Decision:
    """One measured choice: the backend, each candidate's µs per call, and why others were not timed."""

    backend: str
    us: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # what else the choice rests on (an output comparison)


def cache_path(device: torch.device, root: Path | None = None) -> Path:
    """Where measured choices for ``device`` are kept (one file per GPU model, torch and triton version)."""
    return device_cache_file("measured", CACHE_VERSION, device, root)


class ChoiceCache:
    """The measured choices of one device, read from and written back to its JSON file (atomically:
    ``io.writer.write_small_file``)."""

    def __init__(self, path: Path, version: int = CACHE_VERSION) -> None:
        self.path, self.version = path, version
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:  # a broken cache is re-measured, never trusted
                raise UserError(f"measured-dispatch cache {path} is unreadable ({e}); delete it to re-measure") from e
            if isinstance(data, dict) and isinstance(data.get("choices"), dict):
                self.entries = data["choices"]

    def get(self, key: str) -> str | None:
        e = self.entries.get(key)
        return None if e is None else str(e["backend"])

    def put(self, key: str, decision: Decision) -> None:
        self.entries[key] = {"backend": decision.backend, "us": decision.us, "skipped": decision.skipped,
                             **({"notes": decision.notes} if decision.notes else {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file renamed when complete, removed if the write fails (a full disk: a one-line UserError)
        write_small_file(self.path, json.dumps({"version": self.version, "choices": self.entries}, indent=1,
                                               sort_keys=True))


_CACHES: dict[Path, ChoiceCache] = {}  # one reader/writer per file in this process


def open_cache(path: Path, version: int = CACHE_VERSION) -> ChoiceCache:
    """This process's reader / writer of the choice file ``path`` (opened once; ``version`` written into it)."""
    c = _CACHES.get(path)
    if c is None:
        c = _CACHES[path] = ChoiceCache(path, version)
    return c


def drop_caches(prefix: str) -> None:
    """Forget the open choice files whose name starts with ``prefix`` (read again on next use)."""
    for path in [p for p in _CACHES if p.name.startswith(prefix)]:
        del _CACHES[path]


def _cache(device: torch.device, root: Path | None) -> ChoiceCache:
    return open_cache(cache_path(device, root))


def choice_key(kind: str, x: torch.Tensor, n: int, k: int, opts: tuple, bias: torch.Tensor | None,
               scales: tuple) -> str:
    """What a measured choice depends on: kind, rows, N, K, options, x's dtype, bias and scale layout."""
    m = x.numel() // k if k else 0
    sc = ",".join("-" if s is None else f"{s.numel()}:{str(s.dtype).removeprefix('torch.')}" for s in scales)
    dt = str(x.dtype).removeprefix("torch.")
    return f"{kind}|m={m}|n={n}|k={k}|opts={list(opts)}|x={dt}|bias={bias is not None}|scales={sc}"


def _steady(b: KernelBackend, x: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
            opts: tuple) -> Callable[[], object]:
    """The backend's eager steady state on ``x``: its plan (made after one compiling call) or the general path."""
    b.impl(x, w, scales, bias, opts, x.dtype)
    plan = b.plan(x, w, scales, bias, opts, x.dtype, 0) if b.plan is not None else None
    return (lambda: plan(x)) if plan else (lambda: b.impl(x, w, scales, bias, opts, x.dtype))


def timer(device: torch.device, calls: int = 5, rounds: int = 3) -> Callable[[Callable[[], object]], float]:
    """``time_us(fn)``: eager cost per call, µs: best of ``rounds`` rounds of ``calls`` back-to-back calls
    (synchronized on CUDA), which is max(host, GPU); on CUDA the GPU part is also timed with an L2-sized scratch
    write before each call (the write's own time, measured once here, subtracted) and the larger is returned: in
    a model a layer's weight comes from HBM, while a lone layer called again and again reads it from L2 and
    looks faster than it is (weight-only kernels most of all: measured dispatch picked them for SDXL's
    1280-wide layers on the H200 in run 7, 0.76x vs the cost model's 1.04x). One timer serves every candidate
    of a measurement: one scratch buffer, one baseline."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loop(body: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(calls):
                body()
            sync()
            best = min(best, (time.perf_counter() - t) / calls * 1e6)
        return best

    flush: Callable[[], object] | None = None
    flush_us = 0.0
    if device.type == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20))
        flush = torch.empty(2 * l2, dtype=torch.uint8, device=device).zero_
        flush()
        flush_us = loop(flush)

    def time_us(fn: Callable[[], object]) -> float:
        fn()
        sync()
        hot = loop(fn)  # max(host, GPU with the weight in L2): back-to-back calls overlap the two
        if flush is None:
            return hot

        def flushed() -> None:
            flush()
            fn()

        cold_gpu = loop(flushed) - flush_us  # the flush is GPU-bound: the difference is the layer's cold GPU time
        return max(hot, cold_gpu)  # = max(host, cold GPU): what the layer costs inside a model in eager mode

    return time_us


def measure(kk: KernelKind, x: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
            opts: tuple, allow: tuple[str, ...] = ()) -> Decision:
    """Time every backend of ``kk`` that runs on x's device (the reference only when nothing else does; those
    in ``allow`` only, if given; never a pinned-only one, ``KernelBackend.timed`` False) on this very call and
    return the fastest."""
    names = [n for n, b in kk.backends.items() if b.requires(x.device) is None and b.timed
             and (not allow or n in allow)]
    fast = [n for n in names if n != kk.reference] or names
    if len(fast) == 1:  # nothing to compare
        return Decision(backend=fast[0])
    d = Decision(backend="")
    time_us = timer(x.device)
    with torch.no_grad():
        for name in fast:
            try:
                d.us[name] = time_us(_steady(kk.backends[name], x, w, scales, bias, opts))
            except UserError as e:  # the backend refuses this shape (e.g. _scaled_mm with K % 16)
                d.skipped[name] = str(e)
    if not d.us:
        raise UserError(f"{kk.name} linear: no backend runs this shape on {x.device}: {d.skipped}")
    d.backend = min(d.us, key=d.us.__getitem__)
    return d


def measured_backend(kk: KernelKind, x: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
                     opts: tuple, n: int, k: int, allow: tuple[str, ...] = (),
                     root: Path | None = None) -> str:
    """The measured choice for this call's shape: from the device's cache file, else measured now and saved."""
    cache = _cache(x.device, root)
    key = choice_key(kk.name, x, n, k, opts, bias, scales) + (f"|allow={list(allow)}" if allow else "")
    name = cache.get(key)
    if name is not None and name in kk.backends:
        return name
    decision = measure(kk, x, w, scales, bias, opts, allow)
    cache.put(key, decision)
    return decision.backend
