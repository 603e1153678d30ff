"""The format registry: every registered format keeps its own contracts, and a format declared in this one file
goes through convert -> inspect -> load_quantized -> forward with no edit anywhere else."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import comfyquant
from comfyquant.convert.inspect import inspect_checkpoint
from comfyquant.errors import UserError
from comfyquant.formats import (
    REGISTRY,
    AffineFormat,
    FormatShapeError,
    Params,
    dequantize_weight,
    get_format,
    quantize_weight,
    register_format,
)
from comfyquant.formats.grids import FP4_E2M1, FP8_E4M3, FP8_E5M2, INT4, INT8, Fp4Grid, IntGrid
from comfyquant.formats.scaling import Block
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.runtime import QuantLinear, load_quantized
from comfyquant.runtime.kernels.registry import KernelKind, register_kernel_kind

QUANTIZED = [f.name for f in REGISTRY.formats() if f.is_quantized]


class Int6Group8(AffineFormat):
    """A test-only format: 6-bit integers (+-31), one fp32 scale per 8 consecutive inputs of a row."""

    name = "test-int6-g8"
    comfy_format = "test_int6_group8"
    stock_comfy = False
    kernel_kind = "test_int6_g8"  # its reference kernel is registered below, in this file
    storage_dtype = torch.int8
    element_grid = IntGrid("int6", 31)
    bits = 6.0 + 32 / 8
    description = "test: int6, one scale per 8 inputs"

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        return (1, 8)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        if shape[1] % 8:
            raise FormatShapeError(f"{self.name}: in_features {shape[1]} is not a multiple of 8")
        return self._common(options)


    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors["weight_scale"],), (8,)


def int6_reference(x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                   bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """The dummy kind's reference kernel: weight-only, group scales expanded along K, float32 matmul."""
    calls.append(tuple(x.shape))
    w_f = w.float() * scales[0].float().repeat_interleave(opts[0], dim=1)
    y = x.float() @ w_f.T
    return (y if bias is None else y + bias.float()).to(out_dtype)


calls: list[tuple[int, ...]] = []
DUMMY = register_format(Int6Group8()) if "test-int6-g8" not in REGISTRY else get_format("test-int6-g8")
register_kernel_kind(KernelKind("test_int6_g8", {"reference": int6_reference}), replace=True)


def _weight(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] *= 30  # an outlier input channel
    w[7] *= 10  # a loud row
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("name", [*QUANTIZED, "test-int6-g8"])
def test_format_contracts(name: str) -> None:
    fmt = get_format(name)
    w = _weight()
    qw = quantize_weight(w, fmt)
    slots = fmt.slots(tuple(w.shape), qw.params)
    assert [s.suffix for s in slots] == list(qw.tensors), "quantize writes exactly the declared slots, in order"
    for s in slots:
        t = qw.tensors[s.suffix]
        assert t.dtype == s.dtype and tuple(t.shape) == s.shape, s
    conf = qw.comfy_quant
    assert conf is not None and conf["format"] == fmt.comfy_format
    shapes = {k: tuple(t.shape) for k, t in qw.tensors.items()}
    assert REGISTRY.identify(conf, shapes) is fmt
    assert fmt.params_from_conf(conf) == {k: v for k, v in qw.params.items() if k != "input_scale"}
    assert fmt.validate("L", conf, {k: (t.dtype, tuple(t.shape)) for k, t in qw.tensors.items()},
                        tuple(w.shape)) == []
    # round to nearest through the grid an optimizer sees gives the very same stored tensors
    w_t = fmt.transform(w.float(), qw.params)
    grid = fmt.grid(w_t, qw.params)
    for k, t in grid.encode(w_t).items():
        assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
                           qw.tensors[k].view(torch.uint8) if t.dtype.itemsize == 1 else qw.tensors[k]), k
    # a column slice rounds like the whole (GPTQ rounds one column block at a time)
    full = grid.fake_quant(w_t)
    torch.testing.assert_close(grid.fake_quant(w_t[:, 37:101], slice(37, 101)), full[:, 37:101], rtol=0, atol=0)
    # dequantize undoes the transform, and the error is at most half a grid step where nothing clips
    deq = dequantize_weight(qw.tensors, conf, torch.float64)
    w_back = fmt.untransform(full.double(), qw.params)
    # fake_quant computes in float32, dequantize here in float64: they agree to float32 rounding
    torch.testing.assert_close(deq, w_back, rtol=1e-6, atol=1e-6 * float(w_back.abs().max()))
    err = (fmt.transform(deq, qw.params) - w_t.double()).abs()
    scale = grid.scale_for().double()
    # elements beyond the grid's range clip (int4-rot and nvfp4 choose clipped scales): error |w| - max * scale
    clipped = (w_t.double().abs() - fmt.element_grid.max * scale).clamp_min(0) * (1 + 1e-5)
    if isinstance(fmt.element_grid, IntGrid):
        assert bool((err <= torch.maximum(scale / 2 * (1 + 1e-5), clipped) + 1e-12).all())
    elif isinstance(fmt.element_grid, Fp4Grid):  # E2M1 steps are 0.5, 1 and 2 units: half a step <= 1 unit
        assert bool((err <= torch.maximum(scale * (1 + 1e-5), clipped) + 1e-12).all())
    else:  # a float grid: half an ulp relative, plus half the smallest subnormal step
        finfo = torch.finfo(fmt.storage_dtype)
        assert bool((err <= (w_t.double().abs() * finfo.eps / 2 + finfo.smallest_normal * scale) * 1.0001).all())


@pytest.mark.parametrize("name", [f.name for f in REGISTRY.formats() if f.rotated])
def test_rotated_formats_rotate_the_hessian_like_the_inputs(name: str) -> None:
    fmt = get_format(name)
    params = fmt.resolve((8, 256), {})
    x = torch.randn(64, 256, dtype=torch.float64)
    h = x.T @ x
    x_rot = fmt.transform(x, params)  # rows of x get the same group-wise rotation as rows of W
    torch.testing.assert_close(fmt.transform_hessian(h, params), x_rot.T @ x_rot, rtol=1e-10, atol=1e-9)


def test_shape_errors_fall_back_as_declared() -> None:
    with pytest.raises(FormatShapeError, match="not a multiple"):
        get_format("int8-rot").resolve((8, 40), {})
    assert get_format("int8-rot").fallback == "int8"
    with pytest.raises(UserError, match="unknown format 'int9'"):
        get_format("int9")
    with pytest.raises(ValueError, match="already taken"):
        register_format(Int6Group8())  # a second format under the same name


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(256, 64)
        self.odd = nn.Linear(60, 64)  # K = 60: not a multiple of 8, the dummy format cannot take it
        self.proj_out = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        return self.proj_out(h + self.odd(h[..., :60]))


def _float_file(tmp: Path) -> tuple[Path, TinyNet]:
    torch.manual_seed(0)
    net = TinyNet()
    path = tmp / "tiny.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def test_a_format_declared_in_one_file_converts_inspects_loads_and_runs(tmp_path: Path) -> None:
    src, net = _float_file(tmp_path)
    out = tmp_path / "tiny-int6.safetensors"
    report = comfyquant.convert(src, out, format="test-int6-g8", model="none", progress=False)
    actions = {x.name: (x.action, x.format) for x in report.layers}
    assert actions["proj_in.weight"] == ("quantize", "test-int6-g8")
    assert actions["proj_out.weight"] == ("quantize", "test-int6-g8")
    assert actions["odd.weight"][0] == "keep"  # no fallback declared: kept, with the reason
    assert "not a multiple of 8" in next(x.reason for x in report.layers if x.name == "odd.weight")
    with safe_open(str(out), "pt") as f:
        conf = decode_comfy_quant(f.get_tensor("proj_in.comfy_quant"))
        assert conf == {"format": "test_int6_group8"}
        assert tuple(f.get_tensor("proj_in.weight_scale").shape) == (64, 32)
        assert int(f.get_tensor("proj_in.weight").abs().max()) == 31

    res = inspect_checkpoint(out)
    assert res.kind == "quantized" and not res.problems
    assert {x.name: x.format for x in res.layers} == {"proj_in": "test_int6_group8", "proj_out": "test_int6_group8"}
    assert not res.stock_comfy and "NOT loadable" in res.to_text()

    model = load_quantized(TinyNet(), out)
    assert isinstance(model.proj_in, QuantLinear) and isinstance(model.odd, nn.Linear)
    x = torch.randn(5, 256)
    calls.clear()
    with torch.no_grad():
        y, ref = model(x), net(x)
    assert calls == [(5, 256), (5, 64)], "both quantized layers ran the format's own kernel"
    rel = float((y - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel
    assert math.isfinite(rel)


def test_fallback_option_chooses_where_misfit_layers_go(tmp_path: Path) -> None:
    src, _ = _float_file(tmp_path)
    rep = comfyquant.convert(src, tmp_path / "a.safetensors", format="test-int6-g8", model="none",
                             fallback="int8-tensor", progress=False)
    odd = next(x for x in rep.layers if x.name == "odd.weight")
    assert (odd.action, odd.format) == ("quantize", "int8-tensor") and "stored as int8-tensor" in odd.reason
    rep = comfyquant.convert(tmp_path / "tiny.safetensors", tmp_path / "b.safetensors", format="int8-rot",
                             model="none", fallback="none", progress=False)
    odd = next(x for x in rep.layers if x.name == "odd.weight")
    assert odd.action == "keep" and "kept in high precision" in odd.reason
    with pytest.raises(UserError, match="unknown format 'int3'"):
        comfyquant.convert(src, tmp_path / "c.safetensors", fallback="int3", progress=False)


@pytest.mark.parametrize("grid", [INT8, INT4, FP8_E4M3, FP8_E5M2, FP4_E2M1], ids=lambda g: g.name)
def test_snap_is_values_of_round(grid):
    """``snap`` (GPTQ's per-column rounding) is ``values(round(y))`` exactly: ties, out-of-range values, zeros."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(4096, generator=g) * grid.max * 0.6, torch.tensor([0.5, 1.5, -2.5, 0.0, -0.0]),
                   torch.tensor([grid.max * 3, -grid.max * 3, grid.max + 0.25])])
    torch.testing.assert_close(grid.snap(y), grid.values(grid.round(y), torch.float32), rtol=0, atol=0)
