"""Hook-based collection of per-layer input statistics from any ``nn.Module`` while it runs.

The collector knows nothing about how the model is called: it registers forward pre-hooks on the named
``nn.Linear`` modules (ComfyUI's ``comfy.ops`` Linear classes subclass it), maps each module name to the
checkpoint's layer name through a function (``strip_prefix("diffusion_model.")`` for a ComfyUI model), and
removes its hooks on exit, also on errors. Statistics accumulate on the device of the inputs (the GPU when
the model runs there) unless ``CalibrationConfig.device`` says otherwise.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.calibration.stats import DEFAULT_PERCENTILE, CalibrationStats, LayerStats, layer_bytes
from comfyquant.errors import UserError

NameMap = Callable[[str], "str | None"]


@dataclass(frozen=True)
class CalibrationConfig:
    """How statistics are gathered.

    ``reservoir``: input rows kept per layer; ``percentile``: the |x| percentile stored per channel;
    ``hessian_dtype``: None = float64 on the CPU, float32 on a GPU; ``device``: where statistics live (None:
    where the inputs are); ``max_bytes``: statistics held at once when writing a file (layers are then
    collected in groups, one run of the model per group); ``seed``: the reservoir's randomness.
    """

    reservoir: int = 512
    percentile: float = DEFAULT_PERCENTILE
    hessian_dtype: torch.dtype | None = None
    device: str | None = None
    max_bytes: int | None = None
    seed: int = 0

    def dtype_for(self, device: torch.device) -> torch.dtype:
        if self.hessian_dtype is not None:
            return self.hessian_dtype
        return torch.float64 if device.type == "cpu" else torch.float32


def identity(name: str) -> str | None:
    return name


def strip_prefix(prefix: str) -> NameMap:
    """A name map for modules under ``prefix`` (e.g. ComfyUI's ``diffusion_model.``); others are skipped."""
    def f(name: str) -> str | None:
        return name[len(prefix):] if name.startswith(prefix) else None
    return f


def linear_modules(model: nn.Module, name_map: NameMap | None = None,
                   layers: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """Checkpoint layer name -> ``nn.Linear`` module, optionally only ``layers``."""
    name_map = name_map or identity
    wanted = set(layers) if layers is not None else None
    out: dict[str, nn.Linear] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        name = name_map(mod_name)
        if name is None or (wanted is not None and name not in wanted):
            continue
        if name in out:
            raise ValueError(f"two modules map to the checkpoint layer '{name}'")
        out[name] = mod
    return out


class Collector:
    """``with Collector(model) as c: run(model)``; then ``c.stats()``. Hooks exist only inside the block."""

    def __init__(self, model: nn.Module, name_map: NameMap | None = None, layers: Iterable[str] | None = None,
                 config: CalibrationConfig | None = None) -> None:
        self.config = config or CalibrationConfig()
        self.modules = linear_modules(model, name_map, layers)
        self.layers: dict[str, LayerStats] = {}
        self._gens: dict[str, torch.Generator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Collector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                self.add(name, x)
        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        """Accumulate one input of layer ``name`` (also usable without hooks)."""
        s = self.layers.get(name)
        if s is None:
            dev = torch.device(self.config.device) if self.config.device else x.device
            s = LayerStats.empty(x.shape[-1], self.config.reservoir, self.config.dtype_for(dev), dev)
            self.layers[name] = s
            gen = torch.Generator(device=dev)
            gen.manual_seed(self.config.seed * 1_000_003 + zlib.crc32(name.encode()))
            self._gens[name] = gen
        s.update(x, self._gens[name])

    def stats(self, meta: Mapping[str, Any] | None = None) -> CalibrationStats:
        """The statistics gathered so far, in module order (layers never run are absent)."""
        ordered = {n: self.layers[n] for n in self.modules if n in self.layers}
        return CalibrationStats(ordered, {"percentile": self.config.percentile, **(meta or {})})

    def not_run(self) -> list[str]:
        return [n for n in self.modules if n not in self.layers]


Data = Callable[[nn.Module], Any] | Iterable[Any]


def run_data(model: nn.Module, data: Data) -> None:
    """Run ``data`` through ``model``: a callable gets the model; batches are passed as args/kwargs."""
    with torch.no_grad():
        if callable(data):
            data(model)
            return
        for batch in data:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, tuple | list):
                model(*batch)
            else:
                model(batch)


def calibrate(model: nn.Module, data: Data, *, name_map: NameMap | None = None,
              layers: Iterable[str] | None = None, config: CalibrationConfig | None = None,
              meta: Mapping[str, Any] | None = None) -> CalibrationStats:
    """Run ``data`` through ``model`` once and return the input statistics of every ``nn.Linear`` it ran.

    ``data`` is a callable taking the model (e.g. a sampling loop) or an iterable of batches (a tensor, a
    tuple of args or a dict of kwargs per call). Module names are mapped to checkpoint layer names by
    ``name_map`` (default: unchanged); ``layers`` limits collection to those names.
    """
    with Collector(model, name_map, layers, config) as c:
        run_data(model, data)
    if not c.layers:
        raise UserError("calibration ran no nn.Linear layer: check the name mapping and the data")
    return c.stats(meta)


def plan_groups(features: Mapping[str, int], config: CalibrationConfig, dtype: torch.dtype) -> list[list[str]]:
    """Layers split into runs whose statistics fit ``config.max_bytes`` together (one group if no limit)."""
    if config.max_bytes is None:
        return [list(features)]
    groups: list[list[str]] = [[]]
    used = 0
    for name, k in features.items():
        b = layer_bytes(k, config.reservoir, dtype)
        if groups[-1] and used + b > config.max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += b
    return groups


@dataclass(frozen=True)
class RunPlan:
    """What a file-writing calibration decided before running any data: the layers and their widths, the
    device and statistics dtype, and the groups of layers collected per run of the data."""

    features: dict[str, int]
    device: torch.device
    dtype: torch.dtype
    groups: list[list[str]]


def plan_run(model: nn.Module, data: Data, name_map: NameMap | None, layers: Iterable[str] | None,
             config: CalibrationConfig) -> RunPlan:
    """The layers to calibrate and their groups under ``config.max_bytes``; UserError for a model with no
    linear layer, or for several groups over data that can be run only once."""
    mods = linear_modules(model, name_map, layers)
    if not mods:
        raise UserError("the model has no nn.Linear layer to calibrate (check the name mapping)")
    features = {n: m.in_features for n, m in mods.items()}
    dev = torch.device(config.device) if config.device else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    dtype = config.dtype_for(dev)
    groups = plan_groups(features, config, dtype)
    if len(groups) > 1 and not callable(data) and iter(data) is data:  # type: ignore[arg-type]
        raise UserError("calibration in several groups runs the data once per group: pass a callable or a list")
    return RunPlan(features, dev, dtype, groups)


def calibrate_to_file(model: nn.Module, data: Data, path: str | Path, *, name_map: NameMap | None = None,
                      layers: Iterable[str] | None = None, config: CalibrationConfig | None = None,
                      meta: Mapping[str, Any] | None = None, overwrite: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    """Collect statistics and stream them to ``path``, at most ``config.max_bytes`` of them at a time.

    With a budget, the layers are collected in groups and ``data`` is run once per group (so it must be a
    callable or a re-iterable sequence). Layers the data never runs are written with ``count`` 0. Returns
    a summary (layers, groups, rows per layer, layers not run).
    """
    from comfyquant.calibration.fileio import CalibrationWriter

    config = config or CalibrationConfig()
    run = plan_run(model, data, name_map, layers, config)
    features, dtype, groups = run.features, run.dtype, run.groups
    header = {"percentile": config.percentile, **(meta or {})}
    rows: dict[str, int] = {}
    with CalibrationWriter(path, features, header, reservoir=config.reservoir, hessian_dtype=dtype,
                           overwrite=overwrite) as w:
        for gi, group in enumerate(groups):
            if progress:
                print(f"calibrating: group {gi + 1}/{len(groups)} ({len(group)} layers)", file=sys.stderr)
            with Collector(model, name_map, group, config) as c:
                run_data(model, data)
            for name in group:
                s = c.layers.get(name) or LayerStats.empty(features[name], config.reservoir, dtype)
                rows[name] = s.count
                w.add(name, s)
            del c
    return {"layers": len(features), "groups": len(groups), "rows": rows,
            "not_run": [n for n, r in rows.items() if r == 0]}
