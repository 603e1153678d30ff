"""Choosing one option per layer: a multiple-choice knapsack, solved by dynamic programming.

Each layer ``l`` has options ``j`` with exact bytes ``b[l][j]`` and a cost ``c[l][j]`` (its predicted share of
the end-to-end distortion). :class:`Frontier` runs the DP once over a byte grid (bytes rounded *up* to
``unit``, so every plan it returns fits in true bytes) and then answers, for any byte budget, the plan of
least total cost; a pass on true bytes spends what the rounding left. A size budget reads the frontier at the
budget; a quality floor bisects it for the smallest budget whose plan meets the floor (the floor is checked
on the caller's exact metric, e.g. per-sample PSNR, not on the summed cost).
With ``unit == 1`` the DP is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESOLUTION = 1 << 16  # grid steps between the smallest and the largest plan


class Frontier:
    """Least-cost plans for every byte budget between the smallest and the largest plan."""

    def __init__(self, nbytes: Sequence[Sequence[int]], cost: Sequence[Sequence[float]],
                 resolution: int = RESOLUTION) -> None:
        if any(len(b) != len(c) or not b for b, c in zip(nbytes, cost, strict=True)):
            raise ValueError("every layer needs at least one option, with as many costs as sizes")
        self.nbytes = [np.asarray(b, dtype=np.int64) for b in nbytes]
        self.cost = [np.asarray(c, dtype=np.float64) for c in cost]
        self.min_bytes = int(sum(int(b.min()) for b in self.nbytes))
        self.max_bytes = int(sum(int(b.max()) for b in self.nbytes))
        span = self.max_bytes - self.min_bytes
        self.unit = max(1, -(-span // max(1, resolution)))
        self._base = [int(b.min()) for b in self.nbytes]
        # extra units over each layer's smallest option, rounded up
        self._units = [-(-(b - b.min()) // self.unit) for b in self.nbytes]
        cap = int(sum(int(u.max()) for u in self._units))
        self._cap = cap
        f = np.zeros(cap + 1)
        self._arg: list[np.ndarray] = []
        for u, c in zip(self._units, self.cost, strict=True):
            g = np.full(cap + 1, np.inf)
            arg = np.zeros(cap + 1, dtype=np.int16)
            for j in range(len(u)):
                cand = np.full(cap + 1, np.inf)
                cand[u[j]:] = f[: cap + 1 - u[j]] + c[j]
                better = cand < g
                g[better] = cand[better]
                arg[better] = j
            f = g
            self._arg.append(arg)
        self._f = f

    def plan(self, budget: int) -> list[int] | None:
        """The least-cost choice (one option index per layer) within ``budget`` bytes, or None when even the
        smallest plan does not fit."""
        if budget < self.min_bytes:
            return None
        s = min(self._cap, (budget - self.min_bytes) // self.unit)
        choice = [0] * len(self._arg)
        for layer in range(len(self._arg) - 1, -1, -1):
            j = int(self._arg[layer][s])
            choice[layer] = j
            s -= int(self._units[layer][j])
        return fill(choice, self.nbytes, self.cost, budget)

    def total_bytes(self, choice: Sequence[int]) -> int:
        return int(sum(int(b[j]) for b, j in zip(self.nbytes, choice, strict=True)))

    def total_cost(self, choice: Sequence[int]) -> float:
        return float(sum(float(c[j]) for c, j in zip(self.cost, choice, strict=True)))

    def smallest(self) -> list[int]:
        """Every layer in its smallest option (least cost among equally small ones)."""
        return [int(np.lexsort((c, b))[0]) for b, c in zip(self.nbytes, self.cost, strict=True)]

    def smallest_meeting(self, accept: Callable[[list[int]], bool]) -> list[int] | None:
        """The plan of the smallest budget on the frontier that ``accept`` takes (bisection: the frontier's cost
        falls as the budget grows), then trimmed on true bytes; None when not even the largest plan is
        accepted."""
        hi = self.plan(self.max_bytes)
        if hi is None or not accept(hi):
            return None
        lo_b, hi_b = self.min_bytes, self.max_bytes
        best = hi
        first = self.plan(lo_b)
        if first is not None and accept(first):
            return trim(first, self.nbytes, accept)
        while hi_b - lo_b > self.unit:
            mid = (lo_b + hi_b) // 2
            p = self.plan(mid)
            if p is not None and accept(p):
                hi_b, best = mid, p
            else:
                lo_b = mid
        return trim(best, self.nbytes, accept)


def fill(choice: list[int], nbytes: Sequence[np.ndarray], cost: Sequence[np.ndarray], budget: int) -> list[int]:
    """Spend bytes left under ``budget`` (exact bytes) on the single-layer changes that lower the cost most,
    one at a time, until none fits."""
    choice = list(choice)
    used = int(sum(int(b[j]) for b, j in zip(nbytes, choice, strict=True)))
    while True:
        best, move = 0.0, None
        for layer, (b, c) in enumerate(zip(nbytes, cost, strict=True)):
            cur = choice[layer]
            gain = c[cur] - c
            ok = (gain > best) & (b - b[cur] <= budget - used)
            if ok.any():
                j = int(np.argmax(np.where(ok, gain, -np.inf)))
                best, move = float(gain[j]), (layer, j)
        if move is None:
            return choice
        layer, j = move
        used += int(nbytes[layer][j] - nbytes[layer][choice[layer]])
        choice[layer] = j


def trim(choice: list[int], nbytes: Sequence[np.ndarray], accept: Callable[[list[int]], bool]) -> list[int]:
    """Take back bytes the plan does not need: repeatedly the single-layer change to a smaller option that
    saves the most bytes while ``accept`` still holds."""
    choice = list(choice)
    while True:
        moves = sorted(((int(b[choice[layer]] - b[j]), layer, j) for layer, b in enumerate(nbytes)
                        for j in range(len(b)) if b[j] < b[choice[layer]]), reverse=True)
        for _, layer, j in moves:
            trial = list(choice)
            trial[layer] = j
            if accept(trial):
                choice = trial
                break
        else:
            return choice
