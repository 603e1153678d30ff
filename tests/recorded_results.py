"""Recorded benchmark results (``benchmarks/results``) that the cost-model tests replay."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# the int8 cost-model paths and the per-layer sweep's column that timed each
INT8_COLUMNS = {"triton": "w8a8_triton", "triton_fused": "w8a8_fused", "triton_w8a16": "w8a16", "dequant": "dequant"}


def recorded(name: str) -> dict:
    """The recorded result file ``name`` of ``benchmarks/results``, parsed."""
    return json.loads((RESULTS / name).read_text())
