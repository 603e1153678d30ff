"""The calibration file: one ``.safetensors`` holding every layer's :class:`LayerStats`, written streamed.

Keys per layer ``L`` (the checkpoint's layer name): ``L.hessian`` ``[K, K]`` (sum x^T x), ``L.count`` (int64
rows), ``L.col_sum`` ``[K]`` float64, ``L.absmax`` ``[K]``, ``L.percentile`` ``[K]`` (|x| at
``meta.percentile``), ``L.sample`` ``[R, K]`` and ``L.sample_keys`` ``[R]`` (the mergeable reservoir). The
header's ``comfyquant.calibration`` entry is JSON: format version, source, settings, layer -> in_features.
Files are read lazily, one layer at a time (a Flux-sized file holds tens of GB of Hessians).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from comfyquant.calibration.stats import DEFAULT_PERCENTILE, CalibrationStats, LayerStats
from comfyquant.errors import UserError
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import StreamingWriter, TensorSpec

META_KEY = "comfyquant.calibration"
VERSION = 1
SUFFIXES = ("hessian", "count", "col_sum", "absmax", "percentile", "sample", "sample_keys")


def layer_specs(name: str, k: int, reservoir: int, hessian_dtype: torch.dtype) -> list[TensorSpec]:
    """The tensors one layer writes, in file order."""
    return [TensorSpec(f"{name}.hessian", hessian_dtype, (k, k)), TensorSpec(f"{name}.count", torch.int64, ()),
            TensorSpec(f"{name}.col_sum", torch.float64, (k,)), TensorSpec(f"{name}.absmax", torch.float32, (k,)),
            TensorSpec(f"{name}.percentile", torch.float32, (k,)),
            TensorSpec(f"{name}.sample", torch.float32, (reservoir, k)),
            TensorSpec(f"{name}.sample_keys", torch.float64, (reservoir,))]


def layer_tensors(name: str, s: LayerStats, q: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one layer in :func:`layer_specs` order, on the CPU."""
    yield f"{name}.hessian", s.hessian
    yield f"{name}.count", torch.tensor(s.count, dtype=torch.int64)
    yield f"{name}.col_sum", s.col_sum
    yield f"{name}.absmax", s.absmax
    yield f"{name}.percentile", s.percentile(q)
    yield f"{name}.sample", s.sample
    yield f"{name}.sample_keys", s.keys


class CalibrationWriter:
    """Stream layers into a calibration file in a fixed order (all shapes known up front).

    ``layers`` maps name -> in_features; :meth:`add` must be called once per layer, in that order. The
    file appears only when every layer was written (temp file + rename, as every output).
    """

    def __init__(self, path: str | Path, layers: Mapping[str, int], meta: Mapping[str, Any], *,
                 reservoir: int, hessian_dtype: torch.dtype, overwrite: bool = False) -> None:
        self.order = list(layers)
        self.percentile = float(meta.get("percentile", DEFAULT_PERCENTILE))
        header = {**meta, "version": VERSION, "reservoir": reservoir, "hessian_dtype": str(hessian_dtype),
                  "layers": dict(layers)}
        specs = [s for n, k in layers.items() for s in layer_specs(n, k, reservoir, hessian_dtype)]
        self.reservoir, self.hessian_dtype = reservoir, hessian_dtype
        self._w = StreamingWriter(path, specs, {META_KEY: json.dumps(header)}, overwrite=overwrite)
        self._i = 0

    def __enter__(self) -> CalibrationWriter:
        self._w.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._w.__exit__(*exc)

    def add(self, name: str, stats: LayerStats) -> None:
        if self._i >= len(self.order) or self.order[self._i] != name:
            raise ValueError(f"calibration layer '{name}' written out of order")
        if stats.reservoir != self.reservoir:
            raise ValueError(f"{name}: reservoir {stats.reservoir}, file {self.reservoir}")
        s = stats.to("cpu")
        s.hessian = s.hessian.to(self.hessian_dtype)
        for key, t in layer_tensors(name, s, self.percentile):
            self._w.write(key, t.contiguous())
        self._i += 1


def save_stats(stats: CalibrationStats, path: str | Path, *, overwrite: bool = False) -> None:
    """Write in-memory statistics to ``path`` (layer by layer)."""
    if not stats.layers:
        raise UserError("no layer statistics to save: the model ran no nn.Linear layer that was hooked")
    first = next(iter(stats.layers.values()))
    with CalibrationWriter(path, stats.in_features(), stats.meta, reservoir=first.reservoir,
                           hessian_dtype=first.hessian.dtype, overwrite=overwrite) as w:
        for name, s in stats.layers.items():
            w.add(name, s)


class CalibrationFile:
    """Lazy read access to a calibration file: names and shapes from the header, one layer loaded per call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = CheckpointReader(self.path)
        raw = self.reader.metadata.get(META_KEY)
        if raw is None:
            raise UserError(f"{self.path}: not a comfyquant calibration file (no '{META_KEY}' metadata); "
                            "make one with `comfyquant calibrate`")
        try:
            self.meta: dict[str, Any] = json.loads(raw)
            self.features: dict[str, int] = {str(k): int(v) for k, v in self.meta["layers"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path}: corrupt calibration metadata ({e})") from None
        for name, k in self.features.items():
            h = self.reader.infos.get(f"{name}.hessian")
            if h is None or h.shape != (k, k):
                raise UserError(f"{self.path}: layer '{name}' has no [{k}, {k}] Hessian")

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def get(self, name: str) -> LayerStats | None:
        return self.layer(name) if name in self.features else None

    def layer(self, name: str, device: torch.device | str = "cpu") -> LayerStats:
        """One layer's statistics (copied out of the memory map)."""
        def t(suffix: str) -> torch.Tensor:
            return self.reader.get(f"{name}.{suffix}").clone().to(device)

        return LayerStats(t("hessian"), int(self.reader.get(f"{name}.count")), t("col_sum"), t("absmax"),
                          t("sample"), t("sample_keys"))

    def percentile(self, name: str) -> torch.Tensor:
        """The stored per-channel percentile of |x| (at ``meta['percentile']``)."""
        return self.reader.get(f"{name}.percentile").clone()

    def load(self, names: Iterable[str] | None = None) -> CalibrationStats:
        """Everything (or ``names``) in memory, for small models and merging."""
        return CalibrationStats({n: self.layer(n) for n in (names or self.features)}, dict(self.meta))


def check_compatible(calib: CalibrationFile | CalibrationStats, weights: Mapping[str, tuple[int, ...]],
                     source: str) -> None:
    """One-line UserError naming the first layer whose calibration does not fit the checkpoint.

    ``weights`` maps the checkpoint's quantized layer names to their weight shapes ``[N, K]``; every one
    with statistics must have K inputs, and a file that shares no layer name with the checkpoint is from
    another model.
    """
    have = calib.features if isinstance(calib, CalibrationFile) else calib.in_features()
    common = [n for n in weights if n in have]
    if weights and not common:
        first = next(iter(weights))
        raise UserError(f"calibration {source} is from another model: it has no statistics for layer "
                        f"'{first}' (nor any other layer of this checkpoint)")
    for name in common:
        k = weights[name][-1]
        if have[name] != k:
            raise UserError(f"calibration {source} does not match this checkpoint: layer '{name}' has "
                            f"{have[name]} input features there and {k} here")
