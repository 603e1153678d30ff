"""``benchmarks/results`` keeps the convention its README states: result JSON over 20 KB is stored as ``.json.gz``.
A device call copies the tracked tree with a 37.5 MB wheel bundle under a 64 MiB limit, so an uncompressed sweep
(100-400 KB a file) left in the tree costs device calls later."""

from __future__ import annotations

from recorded_results import RESULTS

from comfyquant.bench.saved import read_saved_json

LIMIT = 20 * 1024


def test_large_result_json_is_compressed() -> None:
    big = sorted(p.name for p in RESULTS.glob("*.json") if p.stat().st_size > LIMIT)
    assert not big, f"compress with `gzip -9 -n` (benchmarks/results/README.md): {big}"


def test_compressed_results_are_json_and_not_kept_twice() -> None:
    gz = sorted(RESULTS.glob("*.json.gz"))
    assert len(gz) > 100
    for p in gz:
        assert not p.with_suffix("").exists(), f"{p.name} and its uncompressed copy are both in the tree"
        read_saved_json(p)  # gzip-compressed JSON that the readers take
