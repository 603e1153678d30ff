"""The ``cuda_graphs`` option: replay the model's forward from CUDA graphs, one graph per input shape.

``enable_cuda_graphs(patcher)`` adds an ``APPLY_MODEL`` wrapper (ComfyUI's model wrapper mechanism; every model
class runs it, and it composes with other nodes' wrappers) that calls ``BaseModel._apply_model`` through
``comfyquant.runtime.cuda_graphs.capture``: the sampler calls the model with the same shapes at every step, so
after two warm-up steps each step is one graph replay (no Python, no per-kernel launch cost).

A graph replays the weight addresses it recorded, so every ComfyUI load or unload of the model drops the graphs
(``ON_LOAD`` / ``ON_DETACH`` callbacks); the next steps capture again. Runs a graph cannot serve run eagerly, each
reason logged once per node run: inputs on the CPU (the CPU server), a partial (lowvram) load or ComfyUI's
dynamic-VRAM loader (both move weights during the forward), and the runtime's own reasons (a host sync in the
forward, more than ``max_graphs`` shapes).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from comfyquant.runtime.cuda_graphs import CudaGraphModule, capture

logger = logging.getLogger("comfyquant.nodes")

WRAPPER_KEY = "comfyquant_cuda_graphs"
REASON_LOWVRAM = "the model is partially loaded (lowvram): ComfyUI moves weights during the forward"
REASON_DYNAMIC = ("ComfyUI's dynamic-VRAM loader streams weights during the forward (start ComfyUI with "
                  "--disable-dynamic-vram, or load the model with Load Quantized Diffusion Model)")


class ApplyModel(nn.Module):
    """The module the graphs capture: one ``BaseModel._apply_model`` call through the executor of this step."""

    def __init__(self) -> None:
        super().__init__()
        self.executor: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.executor(*args, **kwargs)


class GraphWrapper:
    """The ``APPLY_MODEL`` wrapper and the load callbacks of one patched MODEL (its clones share it: only one
    clone of a model is loaded at a time, and each load drops the graphs)."""

    def __init__(self, warmup: int = 2, max_graphs: int = 8) -> None:
        self.runner = ApplyModel()
        self.graphed: CudaGraphModule = capture(self.runner, warmup=warmup, max_graphs=max_graphs)
        self._logged: set[str] = set()

    def _eager(self, reason: str, executor: Any, args: tuple, kwargs: dict) -> Any:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("cuda_graphs: running the model eagerly: %s", reason)
        return executor(*args, **kwargs)

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        model = executor.class_obj
        if getattr(model, "model_lowvram", False):
            return self._eager(REASON_LOWVRAM, executor, args, kwargs)
        patcher = getattr(model, "current_patcher", None)
        if patcher is not None and patcher.is_dynamic():
            return self._eager(REASON_DYNAMIC, executor, args, kwargs)
        self.runner.executor = executor
        try:
            return self.graphed(*args, **kwargs)
        finally:
            self.runner.executor = None

    def reset(self, *_args: Any, **_kwargs: Any) -> None:
        """Drop the captured graphs (ComfyUI loaded, patched or unloaded the weights)."""
        self.graphed.reset()


def enable_cuda_graphs(patcher: Any, *, warmup: int = 2, max_graphs: int = 8) -> GraphWrapper:
    """Add the wrapper and its callbacks to ``patcher`` (a clone the caller owns), replacing an earlier one."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    wrapper = GraphWrapper(warmup, max_graphs)
    patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    for kind in (CallbacksMP.ON_LOAD, CallbacksMP.ON_DETACH):
        patcher.remove_callbacks_with_key(kind, WRAPPER_KEY)
        patcher.add_callback_with_key(kind, WRAPPER_KEY, wrapper.reset)
    return wrapper
