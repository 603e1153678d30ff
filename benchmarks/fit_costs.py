"""Fit a kernel's cost-model constants to its measured GPU times, and say how far the model reads from them.

The model is a function of (constants, one launch); the constants a frozen dataclass of positive floats
(``costs.ResidentModel``). The fit minimizes the mean absolute log error (the geometric-mean error the docs
quote) over the log of every constant (Nelder-Mead: the models step where a wave or a tile count does), from the
shipped constants. Runs on the CPU from a saved bench result.

    python benchmarks/fit_costs.py resident --from results/resident/resident.json [--sms 132]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

Sample = tuple[Any, float]  # (a launch the model prices, its measured µs)


def errors(model: Callable[[Any, Any], float], consts: Any, samples: Sequence[Sample]) -> list[float]:
    """``|log(model / measured)|`` of each sample under ``consts``."""
    return [abs(math.log(model(consts, launch) / us)) for launch, us in samples]


def summary(errs: Sequence[float]) -> tuple[float, float]:
    """(geometric-mean error, worst error) as ratios >= 1."""
    return math.exp(sum(errs) / len(errs)), math.exp(max(errs))


def fit(model: Callable[[Any, Any], float], start: Any, samples: Sequence[Sample],
        max_evals: int = 4000) -> tuple[Any, float, float]:
    """(the fitted constants, their geometric-mean error, their worst) from ``start`` (a dataclass of positive
    floats), minimizing the mean absolute log error over the constants' logs."""
    from scipy.optimize import minimize

    names = [f.name for f in dataclasses.fields(start)]
    x0 = [math.log(getattr(start, n)) for n in names]

    def consts(x: Sequence[float]) -> Any:
        return dataclasses.replace(start, **{n: math.exp(v) for n, v in zip(names, x, strict=True)})

    def loss(x: Sequence[float]) -> float:
        errs = errors(model, consts(x), samples)
        return sum(errs) / len(errs)

    res = minimize(loss, x0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "xatol": 1e-4, "fatol": 1e-7, "adaptive": True})
    best = consts(res.x) if res.fun <= loss(x0) else start
    return (best, *summary(errors(model, best, samples)))


def resident_samples(rows: Sequence[dict], sms: int) -> tuple[Callable[[Any, Any], float], list[Sample]]:
    """(model, samples) of the resident kernel from ``bench_resident.py`` rows: every launch of it (the default
    and the ``r<rows>x<width>...`` alternatives, not the warp-specialized ones) timed under graph replay, where the
    model prices it (K up to ``costs.RESIDENT_PRICED_MAX_K``)."""
    from comfyquant.runtime.kernels import costs as cm
    from comfyquant.runtime.kernels.configs import ResidentConfig

    device = dataclasses.replace(cm.DEFAULT_COSTS, sms=sms, resident=True)
    samples = []
    for r in rows:
        if r["k"] > cm.RESIDENT_PRICED_MAX_K:
            continue
        for name, cfg in r["configs"].items():
            ours = name == "resident" or (name[:1] == "r" and name[1:2].isdigit())
            if ours and name in r.get("graph_us", {}):
                samples.append(((r["m"], r["n"], r["k"], ResidentConfig(**cfg)), r["graph_us"][name]))

    def model(consts: cm.ResidentModel, launch: tuple) -> float:
        m, n, k, cfg = launch
        return cm.resident_us(m, n, k, device, cfg, consts)

    return model, samples


KERNELS = {"resident": (resident_samples, "comfyquant.runtime.kernels.costs", "RESIDENT_MODEL")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=sorted(KERNELS))
    p.add_argument("--from", dest="src", type=Path, required=True, help="a bench_resident.py result (json or json.gz)")
    p.add_argument("--sms", type=int, default=132, help="the timed GPU's multiprocessors (H100 SXM / H200: 132)")
    a = p.parse_args(argv)
    import importlib

    from comfyquant.bench.saved import read_saved_json

    try:
        rows = read_saved_json(a.src)["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"fit_costs: cannot read bench rows from {a.src}: {e}", file=sys.stderr)
        return 2
    make, module, attr = KERNELS[a.kernel]
    model, samples = make(rows, a.sms)
    if not samples:
        print(f"fit_costs: {a.src} has no {a.kernel} launch the model prices", file=sys.stderr)
        return 2
    shipped = getattr(importlib.import_module(module), attr)
    before = summary(errors(model, shipped, samples))
    fitted, gm, worst = fit(model, shipped, samples)
    print(f"{len(samples)} launches; shipped constants: geometric-mean error {before[0]:.3f}, worst {before[1]:.3f}")
    print(f"fitted: geometric-mean error {gm:.3f}, worst {worst:.3f}")
    for f in dataclasses.fields(fitted):
        print(f"  {f.name} = {getattr(fitted, f.name):.4g}  (shipped {getattr(shipped, f.name):.4g})")
    print(json.dumps(dataclasses.asdict(fitted)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
