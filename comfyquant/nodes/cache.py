"""A memo of quantized weights, so that re-running a workflow (or changing only runtime options) does not
quantize again.

Entries are keyed weakly by the *source* weight tensor object (a cached entry dies with the model it came
from) and by everything that changes the quantized values: the format, the tensor's in-place version counter
and the identity of any LoRA patches baked in before quantization. The memo never changes a result: a miss
quantizes, a hit returns the same tensor a miss would have produced.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable

import torch

from comfyquant.runtime.tensor import QuantizedTensor
from comfyquant.runtime.versions import version


class QuantCache:
    """``get``/``put`` quantized weights by (source tensor, key); thread-safe; holds no strong ref to sources."""

    def __init__(self) -> None:
        # id(source) -> (weak ref to source, entries); tensors compare by value, so a WeakKeyDictionary cannot be used
        self._entries: dict[int, tuple[weakref.ref, dict[Hashable, QuantizedTensor]]] = {}
        self._lock = threading.RLock()

    def _table(self, source: torch.Tensor, create: bool) -> dict[Hashable, QuantizedTensor] | None:
        sid = id(source)
        slot = self._entries.get(sid)
        if slot is not None and slot[0]() is source:
            return slot[1]
        if not create:
            return None

        def drop(_ref: weakref.ref, sid: int = sid) -> None:
            with self._lock:
                cur = self._entries.get(sid)
                if cur is not None and cur[0] is _ref:
                    del self._entries[sid]

        table: dict[Hashable, QuantizedTensor] = {}
        self._entries[sid] = (weakref.ref(source, drop), table)
        return table

    @staticmethod
    def _full_key(source: torch.Tensor, key: Hashable) -> Hashable:
        return (key, version(source))  # -1 for inference tensors: see runtime.versions

    def get(self, source: torch.Tensor, key: Hashable) -> QuantizedTensor | None:
        with self._lock:
            table = self._table(source, create=False)
            return None if table is None else table.get(self._full_key(source, key))

    def put(self, source: torch.Tensor, key: Hashable, value: QuantizedTensor) -> None:
        with self._lock:
            table = self._table(source, create=True)
            assert table is not None
            table[self._full_key(source, key)] = value

    def clear(self) -> None:
        with self._lock:
            self._entries = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(t) for _, t in self._entries.values())


CACHE = QuantCache()
