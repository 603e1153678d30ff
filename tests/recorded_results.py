"""Recorded benchmark results (``benchmarks/results``) that the cost-model tests replay. Result JSON over 20 KB is
stored gzip-compressed (``<name>.json.gz``); callers name the ``.json`` file and get either form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfyquant.bench.saved import read_saved_json, saved_path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# the int8 cost-model paths and the per-layer sweep's column that timed each
INT8_COLUMNS = {"triton": "w8a8_triton", "triton_fused": "w8a8_fused", "triton_w8a16": "w8a16", "dequant": "dequant"}


def path(name: str) -> Path:
    """The stored file of the recorded result ``name`` of ``benchmarks/results``: ``name`` where it is there, else
    ``name`` + ``.gz`` (the compressed form)."""
    return saved_path(RESULTS / name)


def recorded(name: str) -> Any:
    """The recorded result file ``name`` of ``benchmarks/results`` (stored as ``name`` or ``name.gz``), parsed."""
    return read_saved_json(RESULTS / name)
