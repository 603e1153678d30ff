"""Linear-layer kernel sweep (same as ``comfyquant bench``): ``python benchmarks/bench_kernels.py --out DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.bench.layers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
