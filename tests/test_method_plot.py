"""The optimizer-comparison plot's data path: reports and baseline rows to (model, format, method, metric)."""

import json

import pytest

from comfyquant.eval.method_plot import nines, plot, point


def test_point_reads_reports_and_baselines(tmp_path):
    dit = {"model": "digits-dit", "format": "int4-rot", "quantizer": "comfyquant (learned-adamw)",
           "optimizer": "learned-adamw", "metrics": {"psnr_db": {"mean": 29.5, "min": 20.0}}}
    lm = {"model": "minilm", "format": "int8", "quantizer": "comfyquant (rtn)", "optimizer": None,
          "metrics": {"cosine": {"mean": 0.997, "min": 0.9949}}}
    (tmp_path / "a.json").write_text(json.dumps(dit))
    (tmp_path / "b.json").write_text(json.dumps(lm))
    assert point(str(tmp_path / "a.json")) == ("digits-dit", "int4-rot", "learned", 29.5)
    assert point(str(tmp_path / "b.json")) == ("minilm", "int8", "comfyquant (rtn)", 0.9949)
    assert point("minilm,int8-rot,rtn,0.99943") == ("minilm", "int8-rot", "rtn", 0.99943)
    assert nines(0.999) == pytest.approx(3.0) and nines(1.0) == 7.0
    out = tmp_path / "p.png"
    plot(out, [point(str(tmp_path / "a.json")), point(str(tmp_path / "b.json"))])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
