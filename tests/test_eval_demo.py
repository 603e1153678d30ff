"""``comfyquant demo`` from the committed fixture: converts, loads, samples, writes and names its files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from comfyquant.eval.demo import run_demo
from comfyquant.eval.sampling import SampleConfig
from comfyquant.progress import Progress


@pytest.mark.cpu_int8
def test_demo_writes_what_it_announces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = io.StringIO()
    report = run_demo(tmp_path / "demo", "int8", SampleConfig(steps=3, cfg=3.0, per_class=1, seed=7),
                      Progress(mode="lines", prog="comfyquant demo", stream=log, delay=0.0, interval=0.0))
    text = capsys.readouterr().out
    steps = [x for x in log.getvalue().splitlines() if x.startswith("comfyquant demo: sampling 2/2: ")]
    assert steps[-1].startswith("comfyquant demo: sampling 2/2: 3/3 steps")  # where it is, not silence
    assert "comfyquant demo: metrics: " in log.getvalue()
    for name in ("samples.png", "layers.png", "report.json", "report.md", "digits-dit-int8.safetensors"):
        path = tmp_path / "demo" / name
        assert path.stat().st_size > 0 and str(path) in text
    assert report["summary"]["layers"] == 20
    assert report["file_bytes"] < report["reference_bytes"]
    assert "| sample PSNR dB mean |" in text
