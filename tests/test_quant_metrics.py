"""comfyquant.quant.metrics: the finiteness check both the converter and quantize_ rely on."""

from __future__ import annotations

import torch

from comfyquant.quant.metrics import all_finite


def test_all_finite_detects_nan_and_inf_anywhere():
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(64, 64, dtype=torch.bfloat16)
        x[37, 5] = bad
        assert not all_finite(x)
    assert all_finite(torch.randn(64, 64)) and all_finite(torch.empty(0, 3))


def test_all_finite_is_not_fooled_by_a_sum_that_overflows():
    # every element is finite, but their float32 sum overflows to inf: the full scan must confirm
    x = torch.full((8, 8), 3.0e38, dtype=torch.float32)
    assert not torch.isfinite(x.sum()).item() and all_finite(x)
