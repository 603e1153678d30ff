"""Activation modules folded into the quantized layer they feed (``runtime.fold``, ``QuantLinear.input_act``).

On the CPU every backend applies the folded activation with the same torch op the model ran, so a folded
model must compute exactly what the unfolded one does: on a toy model, on the digits DiT (Flux layout: GELU
tanh MLPs, SiLU-fed modulation), with a dynamic LoRA, under torch.compile, and after load_quantized.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyquant.runtime import QuantizeConfig, QuantLinear, fold_input_activations, load_quantized, quantize_
from comfyquant.runtime.kernels.acts import act_code, act_of_module, apply_input_act

pytestmark = pytest.mark.cpu_int8


class _GELU(nn.GELU):
    """A subclass: its forward may differ, so it is never folded."""


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 64)),
        nn.Sequential(nn.SiLU(), nn.Linear(64, 64)),
        nn.Sequential(nn.GELU(), nn.Linear(64, 96), _GELU(), nn.Linear(96, 64)),
        nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(64, 8)),  # 8 < min_features: stays float
    )


def test_fold_names_each_pair_and_keeps_outputs_and_keys() -> None:
    ref, model = _toy(), _toy()
    quantize_(ref, QuantizeConfig(format="int8", fold_activations=False))
    summary = quantize_(model, QuantizeConfig(format="int8"))
    assert summary.folded == ["0.2: gelu_tanh", "1.1: silu", "2.1: gelu"]
    assert isinstance(model[0][1], nn.Identity) and isinstance(model[2][2], _GELU)  # the subclass stays
    assert model[0][2].input_act == "gelu_tanh" and "input_act=gelu_tanh" in repr(model[0][2])
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        xb = x.bfloat16()
        assert torch.equal(model.bfloat16()(xb), ref.bfloat16()(xb))
    assert fold_input_activations(model) == []  # idempotent


def test_digits_dit_folded_equals_unfolded_and_survives_load_quantized(tmp_path) -> None:
    from safetensors.torch import save_file

    from comfyquant.eval.workloads import DigitsWorkload

    wl = DigitsWorkload()
    models = []
    for fold in (False, True):
        m = wl.float_model()
        s = quantize_(m, QuantizeConfig(format="int8", model="flux", fold_activations=fold))
        models.append((m, s))
    (ref, s0), (model, s1) = models
    assert s0.folded == [] and any("mlp" in f and f.endswith("gelu_tanh") for f in s1.folded), s1.folded
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    labels = torch.tensor([1, 7, 10])
    with torch.no_grad():
        want = ref.velocity(x, t, labels)
        assert torch.equal(model.velocity(x, t, labels), want)
    # a file written from the quantized model loads folded (and computes the same)
    path = tmp_path / "dit-int8.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_quantized(wl.empty_model(), path, compute_dtype=torch.float32).eval()
    assert any(getattr(mod, "input_act", None) == "gelu_tanh" for mod in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, t, labels), want)


def test_folded_layer_with_a_dynamic_lora_reads_the_activated_input() -> None:
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry

    ref, model = _toy(), _toy()
    quantize_(ref, QuantizeConfig(format="int8-rot", fold_activations=False))
    quantize_(model, QuantizeConfig(format="int8-rot"))
    g = torch.Generator().manual_seed(1)
    entry = SideEntry(down=torch.randn(4, 128, generator=g) * 0.1, up=torch.randn(64, 4, generator=g) * 0.1)
    for net in (ref, model):
        side = LoRASidePath()
        side.add(1, entry)
        net[0][2].adapter = side
    x = torch.randn(7, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_folded_model_compiles_fullgraph() -> None:
    model = _toy()
    quantize_(model, QuantizeConfig(format="int8"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_act_names_codes_and_modules() -> None:
    x = torch.linspace(-4, 4, 33)
    assert torch.equal(apply_input_act(x, "gelu_tanh"), nn.GELU(approximate="tanh")(x))
    assert torch.equal(apply_input_act(x, "silu"), nn.SiLU()(x)) and apply_input_act(x, None) is x
    assert [act_code(n) for n in (None, "gelu_tanh", "gelu", "silu")] == [0, 1, 2, 3]
    assert act_of_module(nn.ReLU()) is None and act_of_module(_GELU()) is None
    with pytest.raises(ValueError, match="unknown input activation"):
        act_code("relu")
    lin = QuantLinear.from_linear(nn.Linear(32, 16), "int8")
    lin.input_act = "silu"
    x2 = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(lin(x2), torch.nn.functional.linear(nn.SiLU()(x2), lin.weight, lin.bias),
                                   rtol=0, atol=0)


class SiLUActivation(nn.Module):
    """Named as ComfyUI's Flux.2 MLP activation: ``silu(first half) * second half`` (SwiGLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return nn.functional.silu(a) * b


class _LookAlike(nn.Module):
    """The same name, another computation (the halves swapped): never folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return nn.functional.silu(b) * a


_LookAlike.__name__ = "SiLUActivation"


def _swiglu_mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256, bias=False), act, nn.Linear(128, 64, bias=False))


@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8", "int4-rot"])
def test_swiglu_module_folds_into_the_down_projection(fmt: str) -> None:
    ref, model = _swiglu_mlp(SiLUActivation()), _swiglu_mlp(SiLUActivation())
    quantize_(ref, QuantizeConfig(format=fmt, fold_activations=False))
    assert quantize_(model, QuantizeConfig(format=fmt)).folded == ["2: swiglu"]
    assert isinstance(model[1], nn.Identity) and model[2].input_act == "swiglu"
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        xb = x.bfloat16()
        assert torch.equal(model.bfloat16()(xb), ref.bfloat16()(xb))


def test_swiglu_detection_needs_the_computation_not_just_the_name() -> None:
    assert act_of_module(SiLUActivation()) == "swiglu" and act_of_module(_LookAlike()) is None
    with_param = SiLUActivation()
    with_param.w = nn.Parameter(torch.ones(1))
    assert act_of_module(with_param) is None
    model = _swiglu_mlp(_LookAlike())
    assert quantize_(model, QuantizeConfig(format="int8")).folded == []
    x = torch.randn(2, 10)
    assert torch.equal(apply_input_act(x, "swiglu"), nn.functional.silu(x[:, :5]) * x[:, 5:])
    assert act_code("swiglu") == 4


@pytest.mark.comfyui
def test_comfyui_flux2_mlp_swiglu_is_folded(comfy) -> None:
    """ComfyUI 0.30's own Flux.2 MLP (``build_mlp(mlp_silu_act=True)``: Linear, its SiLUActivation, Linear):
    the activation is recognized and folded, and the quantized MLP computes what the unfolded one does."""
    import importlib

    layers = importlib.import_module("comfy.ldm.flux.layers")
    mlps = []
    for fold in (False, True):
        torch.manual_seed(1)
        mlp = layers.build_mlp(64, 96, mlp_silu_act=True, operations=nn)
        mlps.append((mlp, quantize_(mlp, QuantizeConfig(format="int8", fold_activations=fold))))
    (ref, s0), (mlp, s1) = mlps
    assert type(ref[1]).__module__ == "comfy.ldm.flux.layers" and s0.folded == [] and s1.folded == ["2: swiglu"]
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.equal(mlp(x), ref(x))


def test_dispatch_report_counts_the_rows_of_the_activated_input() -> None:
    """A folded SwiGLU halves the width the kernel reads: the report's M is the token count, not twice it."""
    from comfyquant.runtime.dispatch_report import describe_dispatch

    model = _swiglu_mlp(SiLUActivation())
    quantize_(model, QuantizeConfig(format="int8"))
    rows = describe_dispatch(model, torch.randn(6, 64))
    assert [(r.layer, r.m, r.k) for r in rows] == [("0", 6, 64), ("2", 6, 128)]


def test_bench_flux2_blocks_fold_their_double_block_swiglu() -> None:
    """The whole-model benchmark's Flux.2 (at a toy width): the double blocks' SwiGLU modules fold into their
    down projections (the single blocks apply theirs in forward), and the quantized model tracks the float one."""
    from comfyquant.bench import blocks as bm

    torch.manual_seed(0)
    model = bm.Flux2.__new__(bm.Flux2)
    nn.Module.__init__(model)
    model.doubles = nn.ModuleList([bm.Flux2Double(64, 4, 96)])
    model.singles = nn.ModuleList([bm.Flux2Single(64, 4, 96) for _ in range(2)])
    args = (torch.randn(1, 16, 64), torch.randn(1, 8, 64), torch.randn(1, 6 * 64) * 0.1)
    with torch.no_grad():
        ref = model(*args)
        summary = quantize_(model, QuantizeConfig(format="int8", min_features=1))
        out = model(*args)
    assert summary.folded == ["doubles.0.mlp.0.2: swiglu", "doubles.0.mlp.1.2: swiglu"]
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3


class GEGLU(nn.Module):
    """Named and computed as SD1.x / SDXL's gated projection: ``x * gelu(gate)`` of one doubled projection."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * nn.functional.gelu(gate)


def _geglu_ff(gate: type = GEGLU, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(gate(64, 96), nn.Dropout(dropout), nn.Linear(96, 64))


@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8"])
def test_geglu_projection_folds_into_the_next_layer_keeping_its_keys(fmt: str) -> None:
    ref, model = _geglu_ff(), _geglu_ff()
    quantize_(ref, QuantizeConfig(format=fmt, fold_activations=False))
    assert quantize_(model, QuantizeConfig(format=fmt)).folded == ["2: geglu"]
    assert type(model[0]).__name__ == "ProjectionOnly" and model[2].input_act == "geglu"
    assert list(model.state_dict()) == list(ref.state_dict())  # 0.proj.* kept
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_geglu_detection_needs_the_computation_and_no_live_dropout() -> None:
    from comfyquant.runtime.kernels.acts import projected_act_of_module

    class Swapped(GEGLU):  # the same name, gelu on the other half
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, x = self.proj(x).chunk(2, dim=-1)
            return x * nn.functional.gelu(gate)

    Swapped.__name__ = "GEGLU"
    assert projected_act_of_module(GEGLU(8, 4)) == "geglu" and projected_act_of_module(Swapped(8, 4)) is None
    assert quantize_(_geglu_ff(Swapped), QuantizeConfig(format="int8")).folded == []
    assert quantize_(_geglu_ff(dropout=0.1), QuantizeConfig(format="int8")).folded == []
    x = torch.randn(2, 10)
    assert torch.equal(apply_input_act(x, "geglu"), x[:, :5] * nn.functional.gelu(x[:, 5:]))


@pytest.mark.comfyui
def test_comfyui_sdxl_feedforward_geglu_is_folded(comfy) -> None:
    """ComfyUI 0.30's own ``FeedForward(glu=True)`` (SD1.x / SDXL transformer blocks: GEGLU, Dropout, Linear)."""
    import importlib

    attention = importlib.import_module("comfy.ldm.modules.attention")
    ffs = []
    for fold in (False, True):
        torch.manual_seed(2)
        ff = attention.FeedForward(64, glu=True, operations=nn)
        ffs.append((ff, quantize_(ff, QuantizeConfig(format="int8", fold_activations=fold))))
    (ref, s0), (ff, s1) = ffs
    assert type(ref.net[0]).__module__ == "comfy.ldm.modules.attention" and s0.folded == []
    assert s1.folded == ["net.2: geglu"]
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.equal(ff(x), ref(x))


@pytest.mark.comfyui
def test_comfyui_ltxv_feedforward_gelu_projection_is_folded(comfy) -> None:
    """ComfyUI 0.30's LTXV ``FeedForward`` (``Sequential(GELU_approx(proj), Dropout, Linear)``): the projection's
    tanh GELU folds into the next layer; Qwen-Image's ``GELU`` module is recognized too (its ``approximate``
    attribute read from the module), but its feed-forward runs a ``ModuleList`` in its own loop: not folded."""
    import importlib

    from comfyquant.runtime.kernels.acts import projected_act_of_module

    ltx = importlib.import_module("comfy.ldm.lightricks.model")
    qwen = importlib.import_module("comfy.ldm.qwen_image.model")
    ffs = []
    for fold in (False, True):
        torch.manual_seed(4)
        ff = ltx.FeedForward(64, 64, operations=nn)
        ffs.append((ff, quantize_(ff, QuantizeConfig(format="int8", fold_activations=fold))))
    (ref, s0), (ff, s1) = ffs
    assert s0.folded == [] and s1.folded == ["net.2: gelu_tanh"]
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.equal(ff(x), ref(x))
    assert projected_act_of_module(qwen.GELU(8, 8, approximate="tanh", operations=nn)) == "gelu_tanh"
    assert projected_act_of_module(qwen.GELU(8, 8, operations=nn)) == "gelu"
    qff = qwen.FeedForward(64, operations=nn)
    assert quantize_(qff, QuantizeConfig(format="int8")).folded == []
