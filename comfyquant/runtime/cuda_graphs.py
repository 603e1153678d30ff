"""Whole-model low-overhead mode: replay a module's forward from CUDA graphs, one graph per input signature.

``capture(module)`` returns a :class:`CudaGraphModule`. Each call's inputs are flattened (``torch.utils._pytree``)
into tensors and a signature: the tree structure, every non-tensor leaf, and each tensor's shape, dtype, device
and strides. ComfyUI's sampler calls the diffusion model with the same signature at every step, so after
``warmup`` eager calls one graph is captured (inputs copied into static buffers, outputs cloned out of the
graph's memory) and every later step is one ``graph.replay()``: no Python, no per-kernel launch cost.

Situations a graph cannot serve run eagerly instead, each reason logged once: inputs not on CUDA, autograd
recording, a non-hashable non-tensor argument, more than ``max_graphs`` signatures, or a capture that fails
(a host sync such as ``.item()`` inside the forward). The quantized linears see the capture
(``torch.cuda.is_current_stream_capturing``) and choose their backend by GPU time alone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph, or None: this signature runs eagerly
    static_in: list[torch.Tensor]
    static_out: Any


def _signature(args: tuple, kwargs: dict) -> tuple[Hashable, list[torch.Tensor]] | str:
    """(signature, tensor leaves) of a call, or the reason it cannot be graphed."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors, parts = [], [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda":
                return f"an input tensor is on {leaf.device.type}, not CUDA"
            tensors.append(leaf)
            parts.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        else:
            try:
                hash(leaf)
            except TypeError:
                return f"a non-tensor argument of type {type(leaf).__name__} is not hashable"
            parts.append(("V", type(leaf).__name__, leaf))
    if not tensors:
        return "no CUDA tensor among the inputs"
    return tuple(parts), tensors


class CudaGraphModule(nn.Module):
    """``module`` whose forward replays a CUDA graph per input signature (see the module docstring)."""

    def __init__(self, module: nn.Module, *, warmup: int = 2, max_graphs: int = 8) -> None:
        super().__init__()
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._entries: dict[Hashable, _Entry] = {}
        self._seen: dict[Hashable, int] = {}
        self._logged: set[str] = set()
        self._pool = None

    def _eager(self, reason: str, args: tuple, kwargs: dict) -> Any:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("cuda_graphs: running %s eagerly: %s", type(self.module).__name__, reason)
        return self.module(*args, **kwargs)

    def reset(self) -> None:
        """Drop every captured graph and warm-up count (the wrapped module's weights moved or were replaced:
        a graph replays the addresses it recorded). The next calls warm up and capture again."""
        self._entries.clear()
        self._seen.clear()

    @property
    def graphs(self) -> int:
        """How many signatures have a captured graph."""
        return sum(e.graph is not None for e in self._entries.values())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return self._eager("autograd is recording (run under torch.no_grad / inference_mode)", args, kwargs)
        sig = _signature(args, kwargs)
        if isinstance(sig, str):
            return self._eager(sig, args, kwargs)
        key, tensors = sig
        entry = self._entries.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup:  # compile kernels, measure the device, settle lazy state first
                self._seen[key] = seen + 1
                return self.module(*args, **kwargs)
            if len(self._entries) >= self.max_graphs:
                return self._eager(f"more than {self.max_graphs} input signatures", args, kwargs)
            entry = self._entries[key] = self._capture(args, kwargs, tensors)
        if entry.graph is None:
            return self._eager("capturing this input signature failed (see the earlier log line)", args, kwargs)
        for dst, src in zip(entry.static_in, tensors, strict=True):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.static_out)

    def _capture(self, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> _Entry:
        static_in = [t.clone() for t in tensors]
        it = iter(static_in)
        s_args, s_kwargs = pytree.tree_map(lambda x: next(it) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        side = torch.cuda.Stream(device=tensors[0].device)
        side.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with torch.cuda.stream(side):
            self.module(*s_args, **s_kwargs)  # allocator and kernels warm on the capture stream
        torch.cuda.current_stream(tensors[0].device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # "relaxed": a Triton kernel first used inside the capture may still load its module
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="relaxed"):
                static_out = self.module(*s_args, **s_kwargs)
        except Exception as e:  # any failure: this signature runs eagerly, logged
            log.warning("cuda_graphs: capture of %s failed (%s: %s); this input signature runs eagerly",
                        type(self.module).__name__, type(e).__name__, str(e).splitlines()[0][:200])
            torch.cuda.synchronize()
            return _Entry(None, [], None)
        return _Entry(graph, static_in, static_out)


def capture(module: nn.Module, *, warmup: int = 2, max_graphs: int = 8) -> CudaGraphModule:
    """Wrap ``module`` so its forward replays CUDA graphs per input signature (eager where it cannot)."""
    return CudaGraphModule(module, warmup=warmup, max_graphs=max_graphs)
