"""The runtime on a CUDA GPU: device moves and pinned offload keep weights quantized, the GPU kernels behind
``F.linear`` meet the activation-quantization bound, and torch.compile (inductor, CUDA graphs) sees through it.

These need a GPU; the same behaviour is covered on the CPU by the other test_runtime_* files.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.runtime import QuantizeConfig, QuantizedTensor, QuantLinear, quantize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FORMATS = ["int8", "int8-tensor", "int8-rot", "int8-block", "fp8"]


def _net(width: int = 512, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)).eval()


def test_device_moves_and_pinned_offload_keep_it_quantized() -> None:
    qt = QuantizedTensor.from_float(torch.randn(256, 512), "int8_tensorwise")
    pinned = qt.pin_memory()
    assert isinstance(pinned, QuantizedTensor) and pinned.is_pinned() and not qt.is_pinned()
    g = pinned.to("cuda", non_blocking=True)
    assert isinstance(g, QuantizedTensor) and g.is_cuda and g.qdata.is_cuda and g.params.scale.is_cuda
    assert g.qdata.dtype == torch.int8
    torch.testing.assert_close(g.dequantize().cpu(), qt.dequantize())
    back = g.cpu()
    assert isinstance(back, QuantizedTensor) and torch.equal(back.qdata, qt.qdata)
    model = _net()
    quantize_(model, QuantizeConfig(format="int8"))
    model.cuda()
    w = model[0].weight
    assert isinstance(w, QuantizedTensor) and w.qdata.is_cuda and w.params.scale.is_cuda


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_linear_within_activation_bound(fmt: str) -> None:
    model = _net()
    quantize_(model, QuantizeConfig(format=fmt, block_size=128))
    model.to("cuda", torch.bfloat16)
    lin: QuantLinear = model[0]
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (64, 1024)
    w = lin.qweight.to(torch.float64).dequantize()  # float64 logical dtype: no bf16 rounding of the weight
    ref = x.double() @ w.t() + lin.bias.double()
    # per-token activation error (int8: rowmax/254; fp8 e4m3: 2^-4 relative + half a subnormal step) times
    # sum |W|, plus bf16 rounding (2^-8 of sum |x||W|); rotated layers quantize x H against the rotated weight
    xq, wq = x.double(), w
    if fmt == "int8-rot":
        p = lin.qweight.params
        xq = fast_hadamard(x.double(), p.convrot_groupsize)
        wq = lin.qweight.qdata.double() * p.scale.double()
    xa = xq.abs()
    amax = xa.amax(1, keepdim=True)
    dx = (amax / 254).expand_as(xa) if fmt.startswith("int8") else xa * 2 ** -4 + amax / 448 * 2 ** -10
    bound = dx @ wq.abs().t() + (x.double().abs() @ w.abs().t()) * 2 ** -8 + 1e-3
    assert bool(((y.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_compile_and_cuda_graphs(fmt: str) -> None:
    torch._dynamo.reset()
    model = _net()
    quantize_(model, QuantizeConfig(format=fmt))
    model.to("cuda", torch.bfloat16)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
        graphed = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            out = graphed(x)
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_state_dict_round_trip_on_gpu() -> None:
    model = _net()
    quantize_(model, QuantizeConfig(format="int8-rot"))
    model.cuda()
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    fresh = _net(seed=1)
    quantize_(fresh, QuantizeConfig(format="int8-rot"))
    fresh.load_state_dict(sd)
    fresh.cuda()
    x = torch.randn(8, 512, device="cuda")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
