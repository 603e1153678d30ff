"""``python -m comfyquant.testing``: write a synthetic checkpoint of a real architecture (real key names and
shapes, heavy-tailed random weights with outlier channels) for tests and benchmarks."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from comfyquant.exits import run_cli
from comfyquant.testing.architectures import ARCHS, SIZES
from comfyquant.testing.synthetic import DTYPES, write_synthetic_checkpoint

PROG = "python -m comfyquant.testing"


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic checkpoint; exit 2 with one line on bad arguments."""
    return run_cli(PROG, _write, argv)


def _write(argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix", default="", help="prepended to every key, e.g. model.diffusion_model.")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    info = write_synthetic_checkpoint(args.output, args.arch, args.size, dtype=DTYPES[args.dtype],
                                      seed=args.seed, prefix=args.prefix)
    print(f"wrote {args.output}: {info.tensors} tensors, {info.parameters / 1e9:.3f}B parameters, "
          f"{info.bytes / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
