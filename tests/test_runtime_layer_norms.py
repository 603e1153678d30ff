"""Affine LayerNorms folded into the quantized linears they feed (``runtime.norms``, ``acts.shared_layer_norm``):
the bench SDXL block's three and ComfyUI's own CLIP encoder's two per layer; that the folded model computes what
the unfolded one does (on the CPU the dispatcher applies the norm in torch, as the module did; the quantizers'
fold is checked under the interpreter, ``triton_interp_modulated.check_shared_layer_norm``), that the weight and
bias stay under their keys and are read per call, and which norms do not fold."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_fixtures import patched
from comfyui_server_fixtures import rel_err
from torch import nn

from comfyquant.bench.blocks import Sdxl
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions
from comfyquant.runtime import QuantizeConfig, quantize_
from comfyquant.runtime.kernels.acts import (
    MODULATED_MAX_K,
    ModulatedNorm,
    norm_fits,
    rms_norm,
    shared_layer_norm,
)
from comfyquant.runtime.nn import NormSource
from comfyquant.runtime.norms import FoldedNorm, fold_norms, norm_spec


def _affine(mod: nn.Module, seed: int) -> None:
    """LayerNorm weights spread around 1 and small biases, as trained ones (a fold that drops them is seen)."""
    g = torch.Generator().manual_seed(seed)
    for m in mod.modules():
        if type(m).__name__ == "LayerNorm":
            k = m.weight.numel()
            m.weight.data = (torch.rand(k, generator=g) * 1.5 + 0.25).to(m.weight.dtype)
            m.bias.data = (torch.randn(k, generator=g) * 0.2).to(m.bias.dtype)


def _small_sdxl() -> Sdxl:
    torch.manual_seed(0)
    model = Sdxl()
    model.hi, model.lo = model.hi[:1], model.lo[:1]  # one block of each width
    _affine(model, seed=1)
    return model


def test_shared_layer_norm_is_the_modules_layer_norm() -> None:
    """One fp32 ``[bias, weight - 1]`` row: the torch path gives ``F.layer_norm`` with the module's own 16-bit
    weight exactly, fits any number of rows, and a missing weight / bias is ones / zeros."""
    x = torch.randn(3, 5, 32).bfloat16()
    w, b = (torch.rand(32) * 1.5 + 0.01).bfloat16(), (torch.randn(32) * 0.3).bfloat16()
    norm = shared_layer_norm(w, b, 32, 1e-5)
    assert norm.rows == 0 and norm.mod.shape == (1, 64) and norm.mod.dtype == torch.float32
    assert torch.equal(1 + norm.mod[0, 32:], w.float()) and torch.equal(norm.mod[0, :32], b.float())
    assert torch.equal(rms_norm(x, norm), F.layer_norm(x, (32,), w, b, 1e-5))
    assert norm_fits(norm, x) and norm_fits(norm, x.reshape(15, 32)) and not norm_fits(norm, x[..., :16])
    plain = shared_layer_norm(None, None, 32, 1e-5)
    assert torch.equal(rms_norm(x, plain), F.layer_norm(x, (32,), eps=1e-5))


@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8"])
@pytest.mark.cpu_int8
def test_bench_sdxl_folds_its_layer_norms_and_computes_what_it_did(fmt: str) -> None:
    flt = _small_sdxl()
    ref, model = copy.deepcopy(flt), copy.deepcopy(flt)
    quantize_(ref, QuantizeConfig(format=fmt, min_features=1, fold_norms=False))
    summary = quantize_(model, QuantizeConfig(format=fmt, min_features=1))
    assert [f for f in summary.folded if "->" in f] == [
        f"{lvl}.0.{n}" for lvl in ("hi", "lo")
        for n in ("norm1 -> attn1.to_q,to_k,to_v", "norm2 -> attn2.to_q", "norm3 -> ff.net.0.proj")]
    blk = model.hi[0]
    assert isinstance(blk.norm1, FoldedNorm) and torch.equal(blk.norm1.bias, flt.hi[0].norm1.bias)
    src = blk.attn1.to_q.input_norm
    assert src is blk.attn1.to_k.input_norm and src.holder is blk.norm1 and src.layer
    assert blk.attn2.to_k.input_norm is None and blk.attn1.to_out[0].input_norm is None
    assert list(model.state_dict()) == list(ref.state_dict())  # weight and bias under their own keys
    x = (torch.randn(1, 24, 640), torch.randn(1, 12, 1280), torch.randn(1, 7, 2048))
    with torch.no_grad():
        want, got = ref.hi[0](x[0], x[2]), model.hi[0](x[0], x[2])
        assert rel_err(got, want) < 1e-5 and 0 < rel_err(got, flt.hi[0](x[0], x[2])) < 0.05
        # the norm's weight is read per call: a patched weight reaches the layers it feeds
        for m in (ref, model):
            m.lo[0].norm3.weight.data = m.lo[0].norm3.weight.data * 0.5
        assert rel_err(model.lo[0](x[1], x[2]), ref.lo[0](x[1], x[2])) < 1e-5
    assert fold_norms(model) == []  # idempotent


def test_a_layer_norm_source_keeps_its_row_until_a_parameter_changes() -> None:
    """The ``[bias, weight - 1]`` row is made once for every layer the norm feeds, and again for a new weight or
    bias object, a ``.data`` swap (a move) or an in-place write (the version counter)."""
    ln = nn.LayerNorm(16)
    _affine(ln, seed=3)
    holder = FoldedNorm(ln, norm_spec(ln))
    src = holder.source()
    assert src is holder.source() and isinstance(src.row_norm(), ModulatedNorm)
    first = src.row_norm()
    assert src.row_norm() is first
    with torch.no_grad():
        holder.weight.mul_(2.0)  # in place
    second = src.row_norm()
    assert second is not first and torch.equal(1 + second.mod[0, 16:], holder.weight.detach())
    holder.bias = nn.Parameter(torch.ones(16))  # a new object (how ComfyUI patches a weight)
    assert torch.equal(src.row_norm().mod[0, :16], torch.ones(16))
    holder.weight.data = torch.full((16,), 3.0)  # a swap
    assert torch.equal(src.row_norm().mod[0, 16:], torch.full((16,), 2.0))
    with torch.inference_mode():  # ComfyUI's weights: inference tensors, no version; the object decides
        inf = nn.Parameter(torch.full((16,), 0.5), requires_grad=False)
    holder.weight = inf
    row = src.row_norm()
    assert src.row_norm() is row and torch.equal(row.mod[0, 16:], torch.full((16,), -0.5))


def test_layer_norms_that_are_not_the_fold_stay() -> None:
    """A LayerNorm whose forward is not ``layer_norm`` with its parameters, over more than one dimension, or wider
    than a quantizer holds in registers, is not folded; nor is a look-alike class of another module."""
    ln = nn.LayerNorm(64)
    _affine(ln, seed=4)
    assert norm_spec(ln) == (pytest.approx(1e-5), 0.0, True)
    ln.forward = lambda x: F.layer_norm(x, (64,), ln.weight, None, 1e-5)  # drops its bias
    assert norm_spec(ln) is None
    assert norm_spec(nn.LayerNorm((4, 16))) is None
    assert norm_spec(nn.LayerNorm(MODULATED_MAX_K + 64)) is None
    look_alike = type("LayerNorm", (nn.LayerNorm,), {"__module__": "somewhere.else"})
    assert norm_spec(look_alike(64)) is None


@pytest.mark.cpu_int8
def test_the_dispatch_report_names_a_folded_layer_norm() -> None:
    from comfyquant.runtime.dispatch_report import describe_dispatch

    model = _small_sdxl()
    quantize_(model, QuantizeConfig(format="int8", min_features=1))
    rows = {r.layer: r for r in describe_dispatch(model.hi[0].attn2, torch.randn(1, 9, 640), torch.randn(1, 7, 2048))}
    assert rows["to_q"].folded == "layer_norm: torch first"  # (the CPU's reference backend folds nothing)


def _comfy_clip(comfy: Any) -> tuple[nn.Module, Any]:
    clip = importlib.import_module("comfy.clip_model")
    ops = importlib.import_module("comfy.ops").disable_weight_init
    config = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 160,
              "hidden_act": "quick_gelu", "max_position_embeddings": 12, "eos_token_id": 2}
    torch.manual_seed(7)
    model = clip.CLIPTextModel_(config, torch.float32, "cpu", ops)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.1)
            if getattr(m, "bias", None) is not None:
                nn.init.normal_(m.bias, std=0.05)
    _affine(model, seed=8)
    embeds = torch.randn(1, 12, 64)

    def run(mod: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return mod(embeds=embeds.clone(), num_tokens=[12])[0]

    return model, run


@pytest.mark.comfyui
@pytest.mark.parametrize("fmt", ["int8", "int8-rot"])
@pytest.mark.cpu_int8
def test_comfyuis_clip_folds_its_layer_norms(comfy: Any, fmt: str) -> None:
    """ComfyUI 0.30's own CLIP text encoder (``comfy.clip_model``: SDXL's, SD3's and Flux's CLIP-L / G): each
    layer's ``layer_norm1`` folds into q / k / v and ``layer_norm2`` into ``fc1``; the final norm stays (it feeds
    no linear), the keys stay and the encoder computes what the unfolded one does."""
    flt, run = _comfy_clip(comfy)
    ref, model = copy.deepcopy(flt), copy.deepcopy(flt)
    quantize_(ref, QuantizeConfig(format=fmt, min_features=1, fold_norms=False))
    summary = quantize_(model, QuantizeConfig(format=fmt, min_features=1))
    assert [f for f in summary.folded if "->" in f] == [
        f"encoder.layers.{i}.{n}" for i in range(2)
        for n in ("layer_norm1 -> self_attn.q_proj,k_proj,v_proj", "layer_norm2 -> mlp.fc1")]
    assert type(model.final_layer_norm).__name__ == "LayerNorm"
    assert list(model.state_dict()) == list(ref.state_dict())
    want, got = run(ref), run(model)
    assert rel_err(got, want) < 1e-5 and 0 < rel_err(got, run(flt)) < 0.05


@pytest.mark.comfyui
@pytest.mark.cpu_int8
def test_node_pack_folds_clip_layer_norms_on_the_clone(comfy: Any) -> None:
    """Through the adapter (a ModelPatcher clone): the folded norms are object patches of the clone, whose
    layers share one source per norm; the model itself keeps its LayerNorms and its output."""
    import comfy.model_patcher

    enc, run = _comfy_clip(comfy)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.diffusion_model = enc

    float_out = run(enc)
    base = comfy.model_patcher.ModelPatcher(Model(), torch.device("cpu"), torch.device("cpu"))
    plain, _ = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_norms=False)),
                           cache=QuantCache())
    folded, report = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_layer_norms=True)),
                                 cache=QuantCache())
    assert [f for f in report.folded if "->" in f] == [
        f"encoder.layers.{i}.{n}" for i in range(2)
        for n in ("layer_norm1 -> self_attn.q_proj,k_proj,v_proj", "layer_norm2 -> mlp.fc1")]
    patches = folded.object_patches
    holder = patches["diffusion_model.encoder.layers.0.layer_norm1"]
    assert isinstance(holder, FoldedNorm) and holder.layer
    q, v = (patches[f"diffusion_model.encoder.layers.0.self_attn.{n}"] for n in ("q_proj", "v_proj"))
    assert q.input_norm is v.input_norm and isinstance(q.input_norm, NormSource) and q.input_norm.holder is holder

    def through(p: Any) -> torch.Tensor:
        with patched(p), torch.inference_mode():
            return run(enc)

    want, got = through(plain), through(folded)
    assert rel_err(got, want) < 1e-5 and 0 < rel_err(got, float_out) < 0.05
    assert type(enc.encoder.layers[0].layer_norm1).__name__ == "LayerNorm" and torch.equal(run(enc), float_out)


@pytest.mark.cpu_int8
def test_bench_clip_model_folds_its_layer_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyquant bench``'s CLIP-L-shaped encoder (``clip_l_77``, here narrow): each layer's two LayerNorms
    fold (the final one feeds no linear and stays), and the folded model computes what ``int8_nonorm`` (the
    same layers, norms in torch) computes."""
    from comfyquant.bench import blocks, models

    def build(name: str) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        model = blocks.ClipL(layers=2, d=64, heads=2, ff=128)
        _affine(model, seed=5)
        return model, (torch.randn(1, 7, 64),)

    monkeypatch.setattr(models, "build", build)
    got = {v: (m, a) for v, m, a in models.variants("clip", None, only=("bf16", "int8", "int8_nonorm"))}
    assert list(got) == ["bf16", "int8", "int8_nonorm"]
    folded = got["int8"][0]
    assert all(isinstance(getattr(layer, n), FoldedNorm) for layer in folded.layers for n in ("layer_norm1",
                                                                                              "layer_norm2"))
    assert isinstance(folded.final_layer_norm, nn.LayerNorm)
    with torch.no_grad():
        base, want, out = (got[v][0](*got[v][1]) for v in ("bf16", "int8_nonorm", "int8"))
    assert rel_err(out, want) < 1e-6 and rel_err(want, base) > 1e-3
