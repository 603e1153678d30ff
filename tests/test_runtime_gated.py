"""Gated MLPs folded into their down projection (``runtime.gated``): T5's ``wo(gelu_tanh(wi_0(x)) * wi_1(x))`` and
Llama-style ``down_proj(act(gate_proj(x)) * up_proj(x))`` run their two input projections as one GEMM and the
down projection applies ``gated_gelu_tanh`` / ``swiglu`` to the side-by-side output.

On the CPU every backend applies the activation with the model's own torch ops, so a folded model computes exactly
what the unfolded quantized one does (and is as close to the float model); a module whose forward computes
anything else is left alone. The node pack's side runs ComfyUI 0.30's own Llama ``MLP`` class under its
ModelPatcher (T5's, through the CLIP node: ``test_nodes_clip``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_fixtures import patched
from gemm_counter import count_gemms
from torch import nn

from comfyquant.bench.blocks import T5
from comfyquant.lora.sidepath import LoRASidePath, SideEntry
from comfyquant.runtime import QuantizeConfig, QuantLinear, fold_input_activations, load_quantized, quantize_
from comfyquant.runtime.gated import GatedForward, gated_act_of_module
from comfyquant.runtime.kernels.acts import GATED, GATED_CODES, GATED_GELU_TANH, act_code, apply_input_act
from comfyquant.runtime.siblings import SiblingGroup, fuse_sibling_projections

pytestmark = pytest.mark.cpu_int8

LLAMA = ("gate_proj", "up_proj", "down_proj")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh")


# ---- the activation ------------------------------------------------------------------------------------------
def test_gated_gelu_tanh_is_gelu_tanh_of_the_first_half_times_the_second() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 80, generator=g) * 3
    a, b = x[..., :40].double(), x[..., 40:].double()
    ref = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))) * b  # float64, by hand
    got = apply_input_act(x, "gated_gelu_tanh")
    assert got.shape == (2, 6, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert _rel(apply_input_act(x, "geglu"), ref) > 0.5  # the activation on the other half is another function
    xb = x.bfloat16()  # in x's dtype, with the op the model runs (T5's act)
    assert torch.equal(apply_input_act(xb, "gated_gelu_tanh"), _gelu_tanh(xb[..., :40]) * xb[..., 40:])
    assert act_code("gated_gelu_tanh") == GATED_GELU_TANH == 6 and "gated_gelu_tanh" in GATED and 6 in GATED_CODES
    lin = QuantLinear.from_linear(nn.Linear(40, 16), "int8")
    lin.input_act = "gated_gelu_tanh"
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(apply_input_act(x, "gated_gelu_tanh"), lin.weight, lin.bias),
                                   rtol=0, atol=0)


# ---- T5: the bench model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8"])
def test_bench_t5_folds_its_gated_feed_forward(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    flt = T5(2, 64, 4, 160)
    ref, model = copy.deepcopy(flt), copy.deepcopy(flt)
    quantize_(ref, QuantizeConfig(format=fmt, min_features=1, fold_activations=False))
    # the norms stay (their fold: test_runtime_norms), so the two models' outputs compare bit for bit
    summary = quantize_(model, QuantizeConfig(format=fmt, min_features=1, fold_norms=False))
    assert summary.folded == [f"layers.{i}.layer.1.DenseReluDense.wo: gated_gelu_tanh" for i in range(2)]
    ff = model.layers[0].layer[1].DenseReluDense
    assert isinstance(ff.__dict__["forward"], GatedForward) and ff.wo.input_act == "gated_gelu_tanh"
    assert ff.wi_0.sibling[1] == 0 and ff.wi_1.sibling[1] == 1 and ff.wi_0.sibling[0] is ff.forward.group
    ref_ff = ref.layers[0].layer[1].DenseReluDense
    assert "forward" not in ref_ff.__dict__ and ref_ff.wo.input_act is None
    assert list(model.state_dict()) == list(ref.state_dict())
    # sibling fusion afterwards groups the attention's q,k,v and leaves the folded module's wi_0 / wi_1 to it
    assert fuse_sibling_projections(model) == [f"layers.{i}.layer.0.SelfAttention: q,k,v" for i in range(2)]
    widths = count_gemms(monkeypatch)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        want, got = ref(x), model(x)
        widths.clear()
        again = model(x)
        assert widths == [192, 64, 320, 64] * 2, widths  # q,k,v; o; wi_0|wi_1 as one GEMM; wo
        assert torch.equal(got, want) and torch.equal(again, want)
        assert 0 < _rel(got, flt(x)) < (0.03 if fmt == "fp8" else 0.01)
        xb = x.bfloat16()
        assert torch.equal(model.bfloat16()(xb), ref.bfloat16()(xb))  # the move drops the consolidation: rebuilt
    assert ff.forward.group.fused_calls == 3
    assert fold_input_activations(model, norms=False) == []  # idempotent


# ---- Llama-style MLPs ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """ComfyUI's ``comfy.text_encoders.llama.MLP``: ``down_proj(activation(gate_proj(x)) * up_proj(x))``, the
    activation a plain attribute (silu, or gelu-tanh as Gemma's)."""

    def __init__(self, act: str = "silu", bias: bool = False, width: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=bias)
        self.up_proj = nn.Linear(width, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, width, bias=bias)
        self.activation = F.silu if act == "silu" else (lambda a: F.gelu(a, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def _mlps(cls: type = MLP, fmt: str = "int8", **kw: Any) -> tuple[nn.Module, nn.Module, nn.Module, list[str]]:
    """(float, quantized unfolded, quantized with folds, what the fold summary lists) of one module in a dict."""
    torch.manual_seed(1)
    flt = nn.ModuleDict({"mlp": cls(**kw)})
    ref, model = copy.deepcopy(flt), copy.deepcopy(flt)
    quantize_(ref, QuantizeConfig(format=fmt, min_features=1, fold_activations=False))
    return flt, ref, model, quantize_(model, QuantizeConfig(format=fmt, min_features=1)).folded


@pytest.mark.parametrize(("act", "name"), [("silu", "swiglu"), ("gelu_tanh", "gated_gelu_tanh")])
@pytest.mark.parametrize("bias", [False, True])
def test_llama_mlp_folds_and_computes_what_the_unfolded_one_does(act: str, name: str, bias: bool,
                                                                 tmp_path: Path) -> None:
    flt, ref, model, folded = _mlps(act=act, bias=bias)
    assert folded == [f"mlp.down_proj: {name}"] and model["mlp"].down_proj.input_act == name
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = ref["mlp"](x)
        assert torch.equal(model["mlp"](x), want) and 0 < _rel(want, flt["mlp"](x)) < 0.03  # measured 0.014-0.017
        assert torch.equal(torch.compile(model["mlp"], backend="eager", fullgraph=True)(x), want)  # traced: alone
    # a file written from the unfolded model loads folded
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "mlp.safetensors"))
    torch.manual_seed(9)
    loaded = load_quantized(nn.ModuleDict({"mlp": MLP(act, bias)}), tmp_path / "mlp.safetensors")
    assert isinstance(loaded["mlp"].forward, GatedForward) and loaded["mlp"].down_proj.input_act == name
    with torch.no_grad():
        assert torch.equal(loaded["mlp"](x), want)


def test_dynamic_loras_on_every_projection_of_a_folded_mlp() -> None:
    """The input projections' LoRAs go into the fused GEMM as one stacked low-rank term (bias diffs on their
    slices); the down projection's reads the activated input. Same output as the unfolded model's."""
    _, ref, model, _ = _mlps(fmt="int8-rot", bias=True)
    g = torch.Generator().manual_seed(5)
    for name, (k, n) in {"gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}.items():
        side = LoRASidePath()
        side.add(1, SideEntry(down=torch.randn(4, k, generator=g) * 0.3, up=torch.randn(n, 4, generator=g) * 0.3,
                              bias=torch.randn(n, generator=g) if name == "up_proj" else None))
        model["mlp"].get_submodule(name).adapter, ref["mlp"].get_submodule(name).adapter = side, side.copy()
    x = torch.randn(2, 7, 64, generator=g)
    with torch.inference_mode():
        want = ref["mlp"](x)
        got = model["mlp"](x)
        plain = copy.deepcopy(ref)
        for m in plain.modules():
            if isinstance(m, QuantLinear):
                m.adapter = None
        assert _rel(plain["mlp"](x), want) > 0.05  # the LoRAs matter
    group = model["mlp"].forward.group
    assert group.fused_calls == 1 and group._term is not None and group._term[3].operands[2] == 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_where_the_inputs_cannot_fuse_at_call_time_they_compute_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ref, model, _ = _mlps()
    monkeypatch.setattr(SiblingGroup, "fused_product", lambda self, x: None)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model["mlp"](x), ref["mlp"](x))


def test_sibling_fusion_first_then_the_fold_takes_the_module_over() -> None:
    _, ref, _, _ = _mlps()
    model = copy.deepcopy(ref)  # quantized without folds
    assert fuse_sibling_projections(model) == ["mlp: gate_proj,up_proj"]
    assert fold_input_activations(model) == ["mlp.down_proj: swiglu"]
    mlp = model["mlp"]
    assert isinstance(mlp.forward, GatedForward) and mlp.gate_proj.sibling[0] is mlp.forward.group
    assert fuse_sibling_projections(model) == [] and fold_input_activations(model) == []
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(mlp(x), ref["mlp"](x)) and mlp.forward.group.fused_calls == 1


class _SiluWrittenOut(MLP):  # SiLU as a * sigmoid(a): the same function, other roundings than F.silu's
    def __init__(self) -> None:
        super().__init__()
        self.activation = lambda a: a * torch.sigmoid(a)


class _ErfGelu(MLP):  # exact GELU: 4.6e-4 from the tanh form on the probe, no input activation of ours
    def __init__(self) -> None:
        super().__init__()
        self.activation = F.gelu


def test_the_activation_is_recognised_to_a_few_ulps_not_bit_for_bit() -> None:
    """A forward that computes SiLU its own way (``a * sigmoid(a)``) differs from ours in the last bits, as
    ATen's AVX2 kernels made every model's activation differ on a 6-wide probe against half of a 12-wide one (no
    gated MLP folded at all there): it folds as swiglu. Exact GELU, 4.6e-4 away from the tanh form, does not."""
    probe = torch.linspace(-4.0, 4.0, 18).reshape(3, 6)
    assert not torch.equal(probe * torch.sigmoid(probe), F.silu(probe))  # the two differ in the last bits
    assert gated_act_of_module(_SiluWrittenOut(), LLAMA) == "swiglu"
    assert gated_act_of_module(_ErfGelu(), LLAMA) is None


# ---- what is not folded --------------------------------------------------------------------------------------
class _Sum(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) + self.up_proj(x))


class _SecondHalf(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x) * self.activation(self.up_proj(x)))


class _Residual(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x)) + x


class _ScaledInput(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(2 * x)) * self.up_proj(x))


class _Relu(MLP):  # T5 v1.0-style gated ReLU: no such input activation
    def __init__(self) -> None:
        super().__init__()
        self.activation = F.relu


class _ExtraArgument(MLP):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x) * scale)


class _Dropout(MLP):  # a live dropout (training mode) between the product and the down projection
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.activation(self.gate_proj(x)) * self.up_proj(x)))


@pytest.mark.parametrize("cls", [_Sum, _SecondHalf, _Residual, _ScaledInput, _Relu, _ExtraArgument, _Dropout])
def test_a_forward_that_computes_anything_else_is_not_folded(cls: type) -> None:
    _, ref, model, folded = _mlps(cls)
    mlp = model["mlp"]
    assert mlp.training and folded == [] and gated_act_of_module(mlp, LLAMA) is None
    assert "forward" not in mlp.__dict__ and mlp.down_proj.input_act is None and mlp.gate_proj.sibling is None
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.manual_seed(3)  # (the same dropout mask for both)
        want = ref["mlp"](x)
        torch.manual_seed(3)
        assert torch.equal(mlp(x), want)


def test_a_dropout_folds_only_at_zero_probability_and_a_float_down_projection_does_not() -> None:
    """A dropout with p > 0 blocks the fold even in eval mode (the folded forward has no place for it: a later
    ``train()`` would skip it silently); at p = 0 the module folds."""
    torch.manual_seed(1)
    live = nn.ModuleDict({"mlp": _Dropout()}).eval()
    assert gated_act_of_module(live["mlp"], LLAMA) is None
    assert quantize_(copy.deepcopy(live), QuantizeConfig(format="int8", min_features=1)).folded == []
    flt = copy.deepcopy(live)
    flt["mlp"].dropout.p = 0.0
    assert gated_act_of_module(flt["mlp"], LLAMA) == "swiglu"
    model = copy.deepcopy(flt)
    assert quantize_(model, QuantizeConfig(format="int8", min_features=1)).folded == ["mlp.down_proj: swiglu"]
    kept = copy.deepcopy(flt)
    assert quantize_(kept, QuantizeConfig(format="int8", min_features=1, exclude=r"down_proj")).folded == []
    assert "forward" not in kept["mlp"].__dict__ and kept["mlp"].gate_proj.sibling is None


# ---- the node pack on ComfyUI's own Llama MLP ----------------------------------------------------------------
@pytest.mark.comfyui
@pytest.mark.parametrize(("act", "name"), [("silu", "swiglu"), ("gelu_pytorch_tanh", "gated_gelu_tanh")])
def test_node_pack_folds_comfyuis_llama_mlp(comfy: Any, act: str, name: str) -> None:
    """ComfyUI 0.30's ``comfy.text_encoders.llama.MLP`` under its ModelPatcher: the adapter patches the module's
    forward on the clone and gives ``down_proj`` the gated activation; the same output as the adapter without
    fusion (and with a weight wrapper on two of the layers: ComfyUI's float path per layer), close to the float
    module, and the shared model computes its float output again once the clone is unloaded."""
    import importlib
    from types import SimpleNamespace

    import comfy.model_patcher

    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.cache import QuantCache
    from comfyquant.nodes.ops import ComfyQuantLinear
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    llama = importlib.import_module("comfy.text_encoders.llama")
    config = SimpleNamespace(hidden_size=64, intermediate_size=160, mlp_activation=act)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.diffusion_model = nn.ModuleDict({"mlp": llama.MLP(config, ops=torch.nn)})

    model = Model()
    mlp = model.diffusion_model["mlp"]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        float_out = mlp(x)
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fuse_projections=False)),
                            cache=QuantCache())
    folded, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert r0.folded == [] and r0.fused == []
    assert r1.folded == [f"mlp.down_proj: {name}"] and r1.fused == ["mlp: gate_proj,up_proj"]
    assert isinstance(folded.object_patches["diffusion_model.mlp.forward"], GatedForward)
    down = folded.object_patches["diffusion_model.mlp.down_proj"]
    assert isinstance(down, ComfyQuantLinear) and down.input_act == name
    assert ComfyQuantLinear.derive(down).input_act == name  # a LoRA node's replacement layer keeps it

    def run(patcher: Any) -> torch.Tensor:
        with patched(patcher), torch.inference_mode():
            return mlp(x)

    outs = [run(p) for p in (plain, folded, folded)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert 0 < _rel(outs[1], float_out) < 0.05  # measured 0.018
    assert folded.object_patches["diffusion_model.mlp.forward"].group.fused_calls == 2
    for p in (plain, folded):  # ComfyUI's weight wrappers: the members and the down projection run in float
        for layer in ("gate_proj", "down_proj"):
            p.add_weight_wrapper(f"diffusion_model.mlp.{layer}.weight", lambda w: w * 0.5)
    wrapped = [run(p) for p in (plain, folded)]
    assert torch.equal(wrapped[0], wrapped[1]) and _rel(wrapped[1], outs[1]) > 0.1
    assert folded.object_patches["diffusion_model.mlp.forward"].group.fused_calls == 2  # computed alone
    assert type(mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(mlp(x), float_out)
