"""``benchmarks/fit_costs.py`` on a recorded run: the shipped resident-kernel constants read run 149's 127 launches
as the docs say, and the fit, started far off, comes back to a fit as good as the shipped one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from recorded_results import path, recorded

from comfyquant.runtime.kernels import costs as cm

RUN149 = "resident_run149_h100_2026-12-07.json"


@pytest.fixture
def fit_costs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fit_costs

    return fit_costs


def test_shipped_constants_read_run_149_as_documented(fit_costs) -> None:
    """costs.py's comment: 127 configurations, geometric-mean error 1.10, worst 1.34."""
    model, samples = fit_costs.resident_samples(recorded(RUN149)["rows"], 132)
    gm, worst = fit_costs.summary(fit_costs.errors(model, cm.RESIDENT_MODEL, samples))
    assert len(samples) == 127 and round(gm, 2) == 1.10 and round(worst, 2) == 1.34


def test_fit_from_far_off_constants_recovers_the_shipped_fit(fit_costs) -> None:
    """Every constant 1.6x over, or 1.6x under (geometric-mean error 1.7-1.75x): the fit returns to within 1% of
    the shipped constants' error, the procedure a new kernel's constants (the warp-specialized one's) will be
    fitted by."""
    model, samples = fit_costs.resident_samples(recorded(RUN149)["rows"], 132)
    shipped = fit_costs.summary(fit_costs.errors(model, cm.RESIDENT_MODEL, samples))[0]
    for factor in (1.6, 1 / 1.6):
        off = dataclasses.replace(cm.RESIDENT_MODEL, **{f.name: getattr(cm.RESIDENT_MODEL, f.name) * factor
                                                        for f in dataclasses.fields(cm.RESIDENT_MODEL)})
        start = fit_costs.summary(fit_costs.errors(model, off, samples))[0]
        fitted, gm, worst = fit_costs.fit(model, off, samples)
        assert start > 1.6 and gm <= shipped * 1.01 and worst < 1.4, (factor, start, gm, worst)
        assert all(getattr(fitted, f.name) > 0 for f in dataclasses.fields(fitted))


def test_cli_prints_the_fit_and_refuses_what_it_cannot_read(fit_costs, capsys, tmp_path: Path) -> None:
    assert fit_costs.main(["resident", "--from", str(path(RUN149))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("127 launches") and set(json.loads(out[-1])) == {
        f.name for f in dataclasses.fields(cm.ResidentModel)}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert fit_costs.main(["resident", "--from", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0]
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"rows": [{"m": 1024, "n": 3072, "k": 3072, "configs": {}, "graph_us": {}}]}))
    assert fit_costs.main(["resident", "--from", str(none)]) == 2
    assert "no resident launch" in capsys.readouterr().err
