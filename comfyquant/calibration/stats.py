"""Per-layer input statistics of a linear layer, accumulated while a model runs, and mergeable.

For inputs ``x`` (rows of ``[M, K]``) a :class:`LayerStats` keeps the Hessian ``sum x^T x``, the row count,
the column sums (for the mean input of bias correction), the per-input-channel absmax, and a bounded uniform
sample of input rows (a *priority reservoir*: every row draws a uniform key and the ``R`` smallest keys are
kept, so two reservoirs merge exactly by keeping the smallest keys of both). Percentiles of ``|x|`` per
channel are read from that sample. Everything merges by sums and maxima, so statistics gathered on several
machines, shards or passes add up to those of one run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_PERCENTILE = 99.9


@dataclass
class LayerStats:
    """Input statistics of one linear layer with ``in_features`` K (see the module docstring)."""

    hessian: torch.Tensor  # [K, K] sum of x^T x
    count: int  # rows seen
    col_sum: torch.Tensor  # [K] float64 sum of x
    absmax: torch.Tensor  # [K] float32 max |x|
    sample: torch.Tensor  # [R, K] float32 reservoir rows; rows with key == inf are empty
    keys: torch.Tensor  # [R] float64 priorities, ascending; inf = empty slot

    @classmethod
    def empty(cls, k: int, reservoir: int, hessian_dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> LayerStats:
        return cls(torch.zeros(k, k, dtype=hessian_dtype, device=device), 0,
                   torch.zeros(k, dtype=torch.float64, device=device), torch.zeros(k, device=device),
                   torch.zeros(reservoir, k, device=device),
                   torch.full((reservoir,), math.inf, dtype=torch.float64, device=device))

    @property
    def in_features(self) -> int:
        return int(self.hessian.shape[0])

    @property
    def reservoir(self) -> int:
        return int(self.keys.shape[0])

    def rows(self) -> torch.Tensor:
        """The sampled input rows (float32 ``[n, K]``, n <= reservoir)."""
        return self.sample[torch.isfinite(self.keys)]

    def mean(self) -> torch.Tensor:
        """Mean input row (float64 ``[K]``; zeros before any row was seen)."""
        return self.col_sum / max(self.count, 1)

    def hessian_mean(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``X^T X / rows``: the Hessian of the mean squared output error (up to a factor 2)."""
        return self.hessian.to(dtype) / max(self.count, 1)

    def percentile(self, q: float = DEFAULT_PERCENTILE) -> torch.Tensor:
        """Per-channel ``q``-th percentile of ``|x|`` over the sampled rows (float32 ``[K]``)."""
        rows = self.rows()
        if rows.shape[0] == 0:
            return torch.zeros_like(self.absmax)
        return torch.quantile(rows.abs().float(), q / 100.0, dim=0)

    @torch.no_grad()
    def update(self, x: torch.Tensor, gen: torch.Generator | None = None) -> None:
        """Add the rows of ``x`` (any leading shape, last dim K)."""
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} features, the layer {k}")
        x = x.detach().reshape(-1, k)
        if x.shape[0] == 0:
            return
        dev = self.hessian.device
        x = x.to(dev)
        xh = x.to(self.hessian.dtype)
        self.hessian.addmm_(xh.T, xh)
        self.col_sum += x.to(torch.float64).sum(0)
        torch.maximum(self.absmax, x.abs().amax(0).float(), out=self.absmax)
        self.count += int(x.shape[0])
        keys = torch.rand(x.shape[0], generator=gen, dtype=torch.float64,
                          device=gen.device if gen is not None else "cpu").to(dev)
        self._offer(keys, x)

    def _offer(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the ``reservoir`` smallest keys of the current sample plus these rows."""
        r = self.reservoir
        if r == 0:
            return
        take = keys < self.keys[-1]  # only rows that can enter (keys sorted ascending)
        if not bool(take.any()):
            return
        keys, rows = keys[take], rows[take]
        if keys.shape[0] > r:
            keys, idx = torch.topk(keys, r, largest=False, sorted=False)
            rows = rows[idx]
        all_keys = torch.cat((self.keys, keys))
        all_rows = torch.cat((self.sample, rows.to(device=self.sample.device, dtype=torch.float32)))
        self.keys, order = torch.sort(all_keys)
        self.keys, order = self.keys[:r].contiguous(), order[:r]
        self.sample = all_rows[order].contiguous()

    def offer_sample(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge another reservoir's rows (``keys`` ``[R']``, inf = empty slot) into this one's sample: the
        reservoir half of :meth:`merge`, for statistics whose sums were already added up elsewhere."""
        valid = torch.isfinite(keys)
        dev = self.keys.device
        self._offer(keys[valid].to(dev), rows[valid].to(dev))

    def merge(self, other: LayerStats) -> LayerStats:
        """Statistics of both inputs together (sums, max, the smallest reservoir keys of both)."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge statistics of {self.in_features} and {other.in_features} features")
        dev = self.hessian.device
        r = max(self.reservoir, other.reservoir)
        out = LayerStats(self.hessian + other.hessian.to(device=dev, dtype=self.hessian.dtype),
                         self.count + other.count, self.col_sum + other.col_sum.to(dev),
                         torch.maximum(self.absmax, other.absmax.to(dev)),
                         torch.zeros(r, self.in_features, device=dev),
                         torch.full((r,), math.inf, dtype=torch.float64, device=dev))
        for s in (self, other):
            valid = torch.isfinite(s.keys)
            out._offer(s.keys[valid].to(dev), s.sample[valid].to(dev))
        return out

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(self.hessian.to(device), self.count, self.col_sum.to(device), self.absmax.to(device),
                          self.sample.to(device), self.keys.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hessian, self.col_sum, self.absmax, self.sample,
                                                            self.keys))


def layer_bytes(k: int, reservoir: int, hessian_dtype: torch.dtype = torch.float64) -> int:
    """Memory of one layer's statistics (what the collector budgets per layer)."""
    item = torch.empty((), dtype=hessian_dtype).element_size()
    return k * k * item + k * (8 + 4) + reservoir * (k * 4 + 8)


@dataclass
class CalibrationStats:
    """Statistics of every calibrated layer, keyed by the checkpoint's layer name (``x.y.weight`` -> ``x.y``).

    ``meta`` says where they came from (source, model, settings) and goes into the file header.
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def get(self, name: str) -> LayerStats | None:
        return self.layers.get(name)

    def in_features(self) -> dict[str, int]:
        return {n: s.in_features for n, s in self.layers.items()}

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Layer-wise merge; layers present in one side only are kept as they are."""
        layers = dict(self.layers)
        for name, s in other.layers.items():
            layers[name] = layers[name].merge(s) if name in layers else s
        meta = dict(self.meta)
        if other.meta and other.meta != self.meta:
            meta["merged"] = [*self.meta.get("merged", [self.meta]), other.meta]
        return CalibrationStats(layers, meta)


def merge_all(parts: Mapping[str, CalibrationStats] | list[CalibrationStats]) -> CalibrationStats:
    """Merge several statistics (e.g. one per GPU or per shard of the calibration data)."""
    items = list(parts.values()) if isinstance(parts, Mapping) else list(parts)
    if not items:
        return CalibrationStats()
    out = items[0]
    for p in items[1:]:
        out = out.merge(p)
    return out
