"""``docs/targets.json`` (the latest figure of each issue-12 target) and its plot: every figure names a run that
docs/PERFORMANCE.md records, and the script draws a PNG from the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_target_figure_cites_a_recorded_run() -> None:
    data = json.loads((ROOT / "docs" / "targets.json").read_text())
    perf = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    rows = data["whole_models"] + data["counts"]
    assert len(rows) >= 16
    for r in rows:
        assert r["device"] in ("H100", "H200") and r["value"] > 0 and r["bar"] > 0
        assert re.search(rf"\bruns? [0-9 /,-]*\b{r['run']}\b", perf), f"run {r['run']} of {r['target']}"
        if "of" in r:
            assert 0 < r["value"] <= r["of"] and r["bar"] <= r["of"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "targets.png"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_targets.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
