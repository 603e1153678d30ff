"""Finished tensors from the rank that computed them to rank 0, in the order rank 0 writes them.

One message per item: its size as one int64, a JSON description (names, dtypes, shapes, and whatever the
item's report needs), then each tensor's bytes. Tensors travel on the CPU (gloo): they are on their way to
disk anyway. A sender keeps at most ``window`` items in flight and waits for the oldest before sending more,
so the memory a rank holds for results rank 0 has not taken yet is bounded; rank 0 receives one item at
a time, when the file reaches it. No pickles: the description is JSON.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from comfyquant.distributed.session import watched
from comfyquant.io.reader import DTYPE_NAMES, DTYPES

WINDOW = 2  # items a sender may have in flight (like the writer's queue depth)

Item = tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


class Outbox:
    """Send items to rank 0 with at most ``window`` in flight."""

    def __init__(self, dst: int = 0, window: int = WINDOW) -> None:
        self.dst, self.window = dst, window
        self._pending: deque[tuple[list[Any], list[torch.Tensor]]] = deque()

    def send(self, meta: dict[str, Any], tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Queue one item: ``meta`` (JSON-able) and its named tensors."""
        while len(self._pending) >= self.window:
            self._wait_oldest()
        bufs = [_as_bytes(t) for _, t in tensors]
        desc = {**meta, "tensors": [[n, DTYPE_NAMES[t.dtype], list(t.shape)] for n, t in tensors]}
        head = torch.frombuffer(bytearray(json.dumps(desc).encode("utf-8")), dtype=torch.uint8)
        size = torch.tensor([head.numel()], dtype=torch.int64)
        keep = [size, head, *bufs]
        works = [watched(lambda b=b: dist.isend(b, self.dst), f"sending to rank {self.dst}")
                 for b in keep if b.numel()]
        self._pending.append((works, keep))

    def _wait_oldest(self) -> None:
        works, _ = self._pending.popleft()
        for w in works:
            watched(w.wait, f"sending to rank {self.dst}")

    def flush(self) -> None:
        """Wait until rank 0 has taken every queued item."""
        while self._pending:
            self._wait_oldest()


def receive(src: int) -> Item:
    """The next item from ``src``: its description and its named tensors (CPU)."""
    what = f"receiving from rank {src}"
    size = torch.zeros(1, dtype=torch.int64)
    watched(lambda: dist.recv(size, src), what)
    head = torch.empty(int(size[0]), dtype=torch.uint8)
    watched(lambda: dist.recv(head, src), what)
    desc = json.loads(bytes(head.numpy()).decode("utf-8"))
    tensors = []
    for name, dtype, shape in desc.pop("tensors"):
        dt = DTYPES[dtype]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            watched(lambda b=buf: dist.recv(b, src), what)
        tensors.append((name, buf.view(dt).reshape(shape)))
    return desc, tensors
