"""Reused intermediates of the two-launch eager plans: the quantized activation and its row scales.

A two-launch W8A8 layer writes x's int8 (or fp8) copy and its scales, which only its own GEMM reads, right after,
on the same stream. Allocating them per call cost the eager host two ``torch.empty`` calls (~2 µs each), and a
fresh address per call missed the plan's cache of TMA descriptors (one driver call to encode a new one). A pool
hands every layer of one input shape the same buffers instead: kernels on one stream run in issue order, so the
next layer's activation kernel starts only after this layer's GEMM has read them. Buffers are per CUDA stream
and per Python thread (two threads issuing on one stream could interleave a layer's two launches), small ones
only (``MAX_BYTES``: the host-bound sizes; larger calls are GPU-bound and allocate as before), at most
``MAX_ENTRIES`` per device, oldest dropped first (a dropped buffer goes back to the caching allocator, which
orders its reuse on the stream like any freed tensor). Plans never hold these buffers themselves.

Also here: the split-K weight-only GEMM's partials and counters (:class:`SplitWorkspace`) and the buffer a
per-call unpacked weight is written to (:class:`WeightWorkspace`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

MAX_BYTES = 16 << 20  # per quantized activation: M x K bytes (M = 1024 at K = 15360 fits)
MAX_ENTRIES = 16


def row_scales(m: int, extra: int, device: torch.device | str) -> torch.Tensor:
    """A fresh ``[m, 1]`` float32 row-scale tensor followed in its storage by ``extra`` floats (the split
    rotation's absmax parts, ``triton_quant.scale_floats``): the kernels write past the view, its users see m."""
    return torch.empty(m + extra, dtype=torch.float32, device=device)[:m].view(m, 1)


class ScratchPool:
    """The (quantized activation, row scales) pairs of one device, keyed by stream, thread, shape and dtype."""

    def __init__(self, device: torch.device, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._pairs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(self, stream: int, m: int, k: int, qdtype: torch.dtype,
             extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q [m, k] qdtype, s [m, 1] float32)`` for a call issued on ``stream`` by this thread: the same two
        tensors on every call of this shape, or fresh ones when they are over ``max_bytes``; ``extra`` floats
        after s's (the split rotation's absmax parts)."""
        key = (stream, threading.get_ident(), m, k, qdtype, extra)
        got = self._pairs.get(key)
        if got is not None:
            return got
        got = (torch.empty((m, k), dtype=qdtype, device=self.device),
               row_scales(m, extra, self.device))
        if m * k * got[0].element_size() <= self.max_bytes:
            if len(self._pairs) >= self.max_entries:
                self._pairs.pop(next(iter(self._pairs)))
            self._pairs[key] = got
        return got

    def __len__(self) -> int:
        return len(self._pairs)


_POOLS: dict[torch.device, ScratchPool] = {}  # one per device, made on first use (like the allocator's own cache)


def _for_device(cache: dict, device: torch.device, make: type) -> Any:
    """``cache[device]``, made by ``make(device)`` on first use."""
    got = cache.get(device)
    if got is None:
        got = cache[device] = make(device)
    return got


def pool(device: torch.device) -> ScratchPool:
    """The scratch pool of ``device``."""
    return _for_device(_POOLS, device, ScratchPool)


SPLIT_COUNTERS = 8192  # output tiles one split-K launch may have (each owns one counter)


class SplitWorkspace:
    """The split-K weight-only GEMM's state on one device: per stream, fp32 partial sums (grown as needed; a
    replaced buffer is kept, since a captured CUDA graph may still point at it) and tile counters that every
    launch leaves zeroed (so they are zeroed once, here). Launches on one stream run in issue order, so one
    buffer serves every layer of that stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ws: dict[int, torch.Tensor] = {}
        self._counters: dict[int, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def buffers(self, stream: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(partials: >= numel float32, counters: SPLIT_COUNTERS zeroed int32)`` for launches on ``stream``."""
        ws = self._ws.get(stream)
        if ws is None or ws.numel() < numel:
            if ws is not None:
                self._retired.append(ws)
            ws = self._ws[stream] = torch.empty(max(numel, 1 << 16), dtype=torch.float32, device=self.device)
        return ws, self.counters(stream)

    def counters(self, stream: int) -> torch.Tensor:
        """The ``SPLIT_COUNTERS`` zeroed int32 counters of ``stream`` (the split-K GEMM's tiles; the row-block
        W8A8 kernel's and the one-read rotation's tickets and row blocks), without a partials buffer."""
        cnt = self._counters.get(stream)
        if cnt is None:
            cnt = self._counters[stream] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=self.device)
        return cnt


_SPLITS: dict[torch.device, SplitWorkspace] = {}


def split_workspace(device: torch.device) -> SplitWorkspace:
    """The split-K workspace of ``device``."""
    return _for_device(_SPLITS, device, SplitWorkspace)


class WeightWorkspace:
    """Per stream and Python thread (as :class:`ScratchPool`), one int8 buffer for a weight unpacked per call
    (``int4_rot`` on the W8A8 GEMM, ``triton_unpack``), grown to the largest layer that asked. A replaced buffer
    is kept: plans and captured CUDA graphs point at the one they were made with (the growth happens in a
    model's first steps, so this costs at most the few sizes below the largest)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[tuple[int, int], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def codes(self, stream: int, n: int, k: int) -> torch.Tensor:
        """An int8 ``[n, k]`` view (rows contiguous, at the buffer's start) for launches on ``stream``."""
        key = (stream, threading.get_ident())
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n * k:
            if buf is not None:
                self._retired.append(buf)
            buf = self._bufs[key] = torch.empty(n * k, dtype=torch.int8, device=self.device)
        return buf[: n * k].view(n, k)

    def retired_bytes(self) -> int:
        """Bytes held by replaced buffers."""
        return sum(b.numel() for b in self._retired)


_WEIGHTS: dict[torch.device, WeightWorkspace] = {}


def weight_workspace(device: torch.device) -> WeightWorkspace:
    """The unpacked-weight workspace of ``device``."""
    return _for_device(_WEIGHTS, device, WeightWorkspace)
