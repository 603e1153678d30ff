"""RMSNorms folded into the quantized linears they feed (``runtime.norms``): which modules fold, that the folded
model computes what the unfolded one does (on the CPU the dispatcher applies ``acts.rms_norm`` first; the Triton
quantizer's fold is checked under the interpreter, ``triton_interp_norm``, and on the GPU), that the norm's
weight stays under its key and is read per call, and ComfyUI's own T5 classes."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_fixtures import patched
from torch import nn

from comfyquant.bench.blocks import T5, Qwen3, T5LayerNorm
from comfyquant.runtime import QuantizeConfig, QuantLinear, quantize_
from comfyquant.runtime.kernels.acts import RowNorm, rms_norm
from comfyquant.runtime.nn import NormSource
from comfyquant.runtime.norms import FoldedNorm, fold_norms, norm_spec
from comfyquant.runtime.siblings import fuse_sibling_projections

pytestmark = pytest.mark.cpu_int8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _with_and_without_fold(flt: nn.Module, fmt: str = "int8") -> tuple[nn.Module, nn.Module, Any]:
    """(a copy of ``flt`` quantized without folding its norms, a copy quantized with, the latter's summary)."""
    ref, model = copy.deepcopy(flt), copy.deepcopy(flt)
    quantize_(ref, QuantizeConfig(format=fmt, min_features=1, fold_norms=False))
    return ref, model, quantize_(model, QuantizeConfig(format=fmt, min_features=1))


def _t5(seed: int = 0) -> T5:
    torch.manual_seed(seed)
    model = T5(2, 64, 4, 160)
    for m in model.modules():  # norm weights away from 1, so a fold that drops them is seen
        if isinstance(m, T5LayerNorm):
            m.weight.data = torch.rand(64) * 1.5 + 0.25
    return model


@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8"])
def test_bench_t5_folds_its_norms_and_computes_what_it_did(fmt: str) -> None:
    flt = _t5()
    ref, model, summary = _with_and_without_fold(flt, fmt)
    norms = [f for f in summary.folded if "->" in f]
    assert norms == [f"layers.{i}.layer.{j}.layer_norm -> {c}" for i in range(2)
                     for j, c in ((0, "SelfAttention.q,k,v"), (1, "DenseReluDense.wi_0,wi_1"))]
    att = model.layers[0].layer[0]
    assert isinstance(att.layer_norm, FoldedNorm) and isinstance(att.SelfAttention.q.input_norm, NormSource)
    assert att.SelfAttention.q.input_norm.holder is att.layer_norm and att.SelfAttention.o.input_norm is None
    assert "input_norm=rms_norm" in repr(att.SelfAttention.k)
    assert list(model.state_dict()) == list(ref.state_dict())  # the norm's weight under its own key
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        want, got = ref(x), model(x)
        assert _rel(got, want) < 1e-5 and 0 < _rel(got, flt(x)) < (0.03 if fmt == "fp8" else 0.01)
        # traced whole (the issue's torch.compile(fullgraph=True)): the folded norm is applied in the graph
        assert _rel(torch.compile(model, backend="aot_eager", fullgraph=True)(x), want) < 1e-5
        # sibling fusion after the fold: q,k,v as one GEMM, the norm passed to it once
        assert fuse_sibling_projections(model) == [f"layers.{i}.layer.0.SelfAttention: q,k,v" for i in range(2)]
        assert _rel(model(x), want) < 1e-5 and _rel(model(x), want) < 1e-5
        # a loaded norm weight reaches the layers (they read it per call, from the key's Parameter)
        sd = {k: v * 3 if k.endswith("layer_norm.weight") else v for k, v in ref.state_dict().items()}
        ref.load_state_dict(sd)
        model.load_state_dict(sd)
        assert _rel(model(x), ref(x)) < 1e-5 and _rel(model(x), want) > 1e-3
    assert fold_norms(model) == []  # idempotent


def test_a_norm_that_is_not_rms_norm_of_its_weight_is_not_folded() -> None:
    norm = T5LayerNorm(32)
    norm.weight.data = torch.rand(32) + 0.5
    assert norm_spec(norm) == (pytest.approx(1e-6), 0.0, False)
    # 1 + weight (Gemma's computation) from a class that does not say so (no ``add``): not this norm
    norm.forward = lambda x: F.rms_norm(x, (32,), 1.0 + norm.weight, 1e-6)
    assert norm_spec(norm) is None
    other = _t5()
    ln = other.layers[1].layer[1].layer_norm
    ln.forward = lambda x: F.layer_norm(x, (64,), ln.weight, None, 1e-6)  # a LayerNorm: the mean subtracted
    summary = quantize_(other, QuantizeConfig(format="int8", min_features=1))
    assert "layers.1.layer.1.layer_norm -> DenseReluDense.wi_0,wi_1" not in summary.folded
    assert "layers.1.layer.0.layer_norm -> SelfAttention.q,k,v" in summary.folded


def test_a_class_of_another_module_is_not_folded() -> None:
    """The table names classes with the module that defines them: a look-alike elsewhere is not trusted."""
    model = _t5()
    look_alike = type("T5LayerFF", (nn.Module,), {"forward": lambda self, x: x + self.DenseReluDense(x)})
    ff = model.layers[0].layer[1]
    ff.__class__ = type("T5LayerFF", (look_alike, type(ff)), {"__module__": "somewhere.else"})
    summary = quantize_(model, QuantizeConfig(format="int8", min_features=1))
    assert "layers.0.layer.1.layer_norm -> DenseReluDense.wi_0,wi_1" not in summary.folded
    assert "layers.1.layer.1.layer_norm -> DenseReluDense.wi_0,wi_1" in summary.folded


def test_a_layer_with_a_norm_computes_the_norm_then_itself() -> None:
    """The dispatcher's general path (CPU: the torch reference does not fold): ``rms_norm`` first, then the layer;
    a dynamic LoRA side path reads the normed input too."""
    torch.manual_seed(3)
    lin = nn.Linear(48, 40)
    layer = QuantLinear.from_linear(lin, "int8")
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.rand(48) + 0.5, requires_grad=False)
    x = torch.randn(5, 48) * 4
    plain = layer(rms_norm(x, RowNorm(holder.weight, 1e-5)))
    layer.input_norm = NormSource(holder, 1e-5)
    assert torch.equal(layer(x), plain) and torch.equal(layer(x), plain)
    seen: list[torch.Tensor] = []
    layer.adapter = lambda xa, y: (seen.append(xa), y + 1)[1]
    assert torch.equal(layer(x), plain + 1)
    assert torch.equal(seen[0], rms_norm(x, RowNorm(holder.weight, 1e-5)))


@pytest.mark.comfyui
@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "int4-rot"])
def test_comfyuis_t5_folds_its_norms(comfy: Any, fmt: str) -> None:
    """ComfyUI 0.30's own ``comfy.text_encoders.t5.T5`` (its T5LayerNorm, T5Attention, gated feed-forward): both
    norms of every block fold, for rotated weights too (their quantizer takes the norm since 2026-12-04), the state
    dict keys stay, and the encoder computes what the unfolded one does."""
    t5 = importlib.import_module("comfy.text_encoders.t5")
    config = {"num_layers": 2, "d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 160, "vocab_size": 50,
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}
    torch.manual_seed(5)
    ops = importlib.import_module("comfy.ops").disable_weight_init  # its Embedding takes out_dtype
    flt = t5.T5(config, torch.float32, "cpu", ops)
    for m in flt.modules():
        if type(m).__name__ == "T5LayerNorm":
            m.weight.data = torch.rand(64) * 1.5 + 0.25
        elif isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.1)
    ref, model, summary = _with_and_without_fold(flt, fmt)
    assert [f for f in summary.folded if "->" in f] == [
        f"encoder.block.{i}.layer.{j}.layer_norm -> {c}" for i in range(2)
        for j, c in ((0, "SelfAttention.q,k,v"), (1, "DenseReluDense.wi_0,wi_1"))]
    assert list(model.state_dict()) == list(ref.state_dict())
    embeds = torch.randn(1, 9, 64)
    with torch.no_grad():  # (ComfyUI's T5 adds into its input in place: each call gets a copy)
        want = ref(None, None, embeds=embeds.clone())[0]
        got = model(None, None, embeds=embeds.clone())[0]
    assert _rel(got, want) < 1e-5


def _comfy_block(cls: str, seed: int, norm_weight: Callable[[int], torch.Tensor],
                 **config: Any) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """One of ComfyUI 0.30's Llama-family blocks (``comfy.text_encoders.llama.<cls>``, 64 wide, 4 query / 2 kv
    heads of 16, 160-wide MLP; ``config`` sets further config attributes) with its RMSNorms' weights from
    ``norm_weight(width)`` and its linears N(0, 0.1); and ``run(block) -> output`` on a fixed 7-token input with
    the rotary embedding and attention function ComfyUI hands the block."""
    llama = importlib.import_module("comfy.text_encoders.llama")
    attention = importlib.import_module("comfy.ldm.modules.attention")
    ops = importlib.import_module("comfy.ops").disable_weight_init
    cfg = llama.Llama2Config(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    cfg.head_dim = 16
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    block = getattr(llama, cls)(cfg, 0, ops=ops)
    for m in block.modules():
        if type(m).__name__ == "RMSNorm":
            m.weight.data = norm_weight(m.weight.numel())
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.1)
    x = torch.randn(1, 7, 64)
    freqs = llama.precompute_freqs_cis(16, torch.arange(7).unsqueeze(0), cfg.rope_theta)
    attn = attention.optimized_attention_for_device(x.device, mask=False, small_input=True)

    def run(b: nn.Module) -> torch.Tensor:
        return b(x, freqs_cis=freqs, optimized_attention=attn)[0]

    return block, run


def _spread(width: int) -> torch.Tensor:
    return torch.rand(width) * 1.5 + 0.25


@pytest.mark.comfyui
def test_comfyuis_llama_block_folds_both_norms(comfy: Any) -> None:
    """ComfyUI 0.30's ``comfy.text_encoders.llama.TransformerBlock`` (Qwen / Llama / Mistral text encoders): its
    ``input_layernorm`` folds into ``self_attn``'s q / k / v and ``post_attention_layernorm`` into the MLP's
    gate / up projections, and the block computes what the unfolded one does (rotary embedding, grouped kv)."""
    block, run = _comfy_block("TransformerBlock", 6, _spread)
    flt = nn.ModuleDict({"block": block})
    ref, model, summary = _with_and_without_fold(flt)
    assert [f for f in summary.folded if "->" in f] == ["block.input_layernorm -> self_attn.q_proj,k_proj,v_proj",
                                                        "block.post_attention_layernorm -> mlp.gate_proj,up_proj"]
    assert list(model.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        want, got, flt_out = run(ref["block"]), run(model["block"]), run(flt["block"])
    assert _rel(got, want) < 1e-5 and 0 < _rel(got, flt_out) < 0.02


def test_bench_llm_encoder_folds_its_block_norms_not_the_per_head_ones() -> None:
    """The Qwen3-shaped bench encoder (ComfyUI's Llama module tree): each block's two norms fold into q / k / v
    and gate / up, its MLP's SwiGLU into the down projection; the per-head q / k norms, which act on the
    projections' outputs, stay; the output is the unfolded model's."""
    torch.manual_seed(2)
    flt = Qwen3(layers=2, d=64, heads=4, kv_heads=2, head_dim=16, ff=96)
    for name, p in flt.named_parameters():
        if name.endswith("layernorm.weight"):
            p.data = torch.rand_like(p) * 1.5 + 0.25
    ref, model, summary = _with_and_without_fold(flt)
    assert summary.folded == [
        f"layers.{i}.{n}" for i in range(2) for n in ("input_layernorm -> self_attn.q_proj,k_proj,v_proj",
                                                      "post_attention_layernorm -> mlp.gate_proj,up_proj")
    ] + [f"layers.{i}.mlp.down_proj: swiglu" for i in range(2)]
    assert type(model.layers[0].self_attn.q_norm).__name__ == "RMSNorm"
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 1e-5 and 0 < _rel(model(x), flt(x)) < 0.02


def test_a_file_written_from_the_unfolded_model_loads_folded(tmp_path: Any) -> None:
    """``load_quantized`` folds the norms as ``quantize_`` does (the file is the same with or without the fold)."""
    from safetensors.torch import save_file

    from comfyquant.runtime import load_quantized

    ref = _t5()
    quantize_(ref, QuantizeConfig(format="int8", min_features=1, fold_norms=False))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "t5.safetensors"))
    loaded = load_quantized(_t5(seed=9), tmp_path / "t5.safetensors")
    assert isinstance(loaded.layers[1].layer[1].layer_norm, FoldedNorm)
    assert loaded.layers[1].layer[1].DenseReluDense.wi_1.input_norm is not None
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        assert _rel(loaded(x), ref(x)) < 1e-5


@pytest.mark.comfyui
def test_comfyuis_gemma_block_folds_its_pre_norms_with_one_plus_weight(comfy: Any) -> None:
    """ComfyUI 0.30's ``TransformerBlockGemma2`` (Gemma 2 / 3 text encoders: Lumina 2, LTX-2): its input and
    pre-feed-forward norms scale by ``1 + weight`` (``add``) and fold with that offset; the post-attention and
    post-feed-forward norms act on outputs and stay; the block computes what the unfolded one does, also after
    the norm's weight changes in place (the cached ``1 + weight`` follows its version)."""
    block, run_block = _comfy_block(  # Gemma's norm weights sit around 0 (scale 1 + w)
        "TransformerBlockGemma2", 8, lambda width: torch.rand(width) - 0.5, rms_norm_add=True,
        transformer_type="gemma2", sliding_attention=None, mlp_activation="gelu_pytorch_tanh")
    flt = nn.ModuleDict({"block": block})
    ref, model, summary = _with_and_without_fold(flt)
    assert [f for f in summary.folded if "->" in f] == ["block.input_layernorm -> self_attn.q_proj,k_proj,v_proj",
                                                        "block.pre_feedforward_layernorm -> mlp.gate_proj,up_proj"]
    block = model["block"]
    assert isinstance(block.input_layernorm, FoldedNorm) and block.input_layernorm.offset == 1.0
    assert type(block.post_attention_layernorm).__name__ == "RMSNorm"

    def run(m: nn.ModuleDict) -> torch.Tensor:
        return run_block(m["block"])

    with torch.no_grad():
        want = run(ref)
        assert _rel(run(model), want) < 1e-5 and 0 < _rel(run(model), run(flt)) < 0.02
        for m in (ref, model):  # an in-place update of the norm's weight (a patch applied in place)
            m["block"].input_layernorm.weight.mul_(-1.0)
        assert _rel(run(model), run(ref)) < 1e-5 and _rel(run(model), want) > 1e-3
        traced = torch.compile(model["block"], backend="aot_eager", fullgraph=True)
        assert _rel(run_block(traced), run(ref)) < 1e-5


@pytest.mark.comfyui
def test_node_pack_folds_a_llama_blocks_norms_on_the_clone(comfy: Any) -> None:
    """The node pack on ComfyUI's Llama ``TransformerBlock`` under its ModelPatcher: the norms become object patches
    on the clone (the shared model keeps its RMSNorm modules), the converted q / k / v share one norm source, the
    clone computes what the adapter without the norm fold computes, a weight wrapper on a member runs it in float
    after the norm, and the shared block computes its float output again once the clone is unpatched."""
    import comfy.model_patcher

    from comfyquant.nodes.adapter import adapt_model
    from comfyquant.nodes.cache import QuantCache
    from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

    block, run_block = _comfy_block("TransformerBlock", 10, _spread)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.diffusion_model = nn.ModuleDict({"block": block})

    model = Model()
    with torch.no_grad():
        float_out = run_block(block)
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_norms=False)),
                            cache=QuantCache())
    folded, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert not [f for f in r0.folded if "->" in f]
    assert [f for f in r1.folded if "->" in f] == ["block.input_layernorm -> self_attn.q_proj,k_proj,v_proj",
                                                   "block.post_attention_layernorm -> mlp.gate_proj,up_proj"]
    patches = folded.object_patches
    assert isinstance(patches["diffusion_model.block.input_layernorm"], FoldedNorm)
    q, k = patches["diffusion_model.block.self_attn.q_proj"], patches["diffusion_model.block.self_attn.k_proj"]
    assert q.input_norm is k.input_norm and q.input_norm.holder is patches["diffusion_model.block.input_layernorm"]

    def run(patcher: Any) -> torch.Tensor:
        with patched(patcher), torch.inference_mode():
            return run_block(block)

    want, got = run(plain), run(folded)
    assert _rel(got, want) < 1e-5 and 0 < _rel(got, float_out) < 0.03
    for p in (plain, folded):  # ComfyUI's weight wrapper on a member: that layer runs in float, after the norm
        p.add_weight_wrapper("diffusion_model.block.self_attn.k_proj.weight", lambda w: w * 0.5)
    wrapped = [run(p) for p in (plain, folded)]
    assert _rel(wrapped[1], wrapped[0]) < 1e-5 and _rel(wrapped[1], got) > 1e-3
    assert type(block.input_layernorm).__name__ == "RMSNorm"
    with torch.no_grad():
        assert torch.equal(run_block(block), float_out)


def test_the_dispatch_report_says_what_each_layer_applies_first_and_where() -> None:
    """``describe_dispatch`` names a layer's folded norm or activation and whether the chosen backend's kernel
    applies it (on the CPU the torch reference does not: "torch first"), and reports the GEMMs that run for
    several layers at once: the gated MLP's wi_0 / wi_1 (one GEMM outside their modules' forward) and, once the
    sibling groups have learned their plan, q / k / v, each as one row in place of its members'."""
    from comfyquant.runtime.dispatch_report import describe_dispatch, format_dispatch

    model = _t5()
    quantize_(model, QuantizeConfig(format="int8", min_features=1))
    x = torch.randn(1, 5, 64)
    rows = {r.layer: r for r in describe_dispatch(model, x)}
    assert rows["layers.0.layer.0.SelfAttention.q"].folded == "rms_norm: torch first"
    assert rows["layers.0.layer.1.DenseReluDense.wo"].folded == "gated_gelu_tanh: torch first"
    assert rows["layers.0.layer.0.SelfAttention.o"].folded == ""
    gated = rows["layers.0.layer.1.DenseReluDense.wi_0+wi_1"]
    assert (gated.m, gated.k, gated.n, gated.folded) == (5, 64, 320, "rms_norm: torch first")
    assert "layers.0.layer.1.DenseReluDense.wi_0" not in rows and len(rows) == 2 * 6  # q, k, v, o, wi_0+wi_1, wo
    assert "| rms_norm: torch first |" in format_dispatch(list(rows.values()))
    fuse_sibling_projections(model)
    with torch.no_grad():
        model(x)  # the groups' first round learns which members share an input
    rows = {r.layer: r for r in describe_dispatch(model, x)}
    qkv = rows["layers.1.layer.0.SelfAttention.q+k+v"]
    assert (qkv.n, qkv.k, qkv.folded) == (192, 64, "rms_norm: torch first")
    assert not {"layers.1.layer.0.SelfAttention.q", "layers.1.layer.0.SelfAttention.v"} & set(rows)
    assert len(rows) == 2 * 4  # per block: q+k+v, o, wi_0+wi_1, wo


def test_a_layer_pinned_to_a_backend_that_cannot_fold_keeps_the_norm_module() -> None:
    """Pinned to ``dequant`` (or a policy allowing no folding backend) every layer would apply the norm in torch,
    three times for q / k / v: the model's own norm module stays."""
    from comfyquant.runtime.kernels.policy import DispatchPolicy

    for backend, folds in (("dequant", False), (DispatchPolicy(allow=("dequant", "triton_w8a16")), False),
                           (DispatchPolicy(allow=("triton_fused",)), True), ("triton", True)):
        model = _t5()
        summary = quantize_(model, QuantizeConfig(format="int8", min_features=1, backend=backend))
        assert bool([f for f in summary.folded if "->" in f]) is folds, backend
        assert isinstance(model.layers[0].layer[0].layer_norm, FoldedNorm) is folds


def test_gemmas_one_plus_weight_follows_a_data_swap() -> None:
    """``NormSource`` keeps ``1 + weight`` per weight object, version and storage: a ``.data`` swap (what a module
    move or dtype change does, without a version bump) is seen."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(8), requires_grad=False)
    src = NormSource(holder, 1e-6, offset=1.0)
    assert torch.equal(src.row_norm().weight, torch.ones(8))
    assert src.row_norm().weight is src.row_norm().weight  # kept while nothing changed
    holder.weight.data = torch.full((8,), 2.0, dtype=torch.float64)
    got = src.row_norm().weight
    assert got.dtype == torch.float64 and torch.equal(got, torch.full((8,), 3.0, dtype=torch.float64))


def test_bench_variants_time_int8_rot_with_and_without_the_norm_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyquant bench``'s whole-model variants: ``int8_rot`` folds the T5 norms into its rotating quantizer,
    ``int8_rot_nonorm`` is the same without (timed beside it), and a model without foldable norms gets no
    ``int8_rot_nonorm`` (it would time ``int8_rot`` twice)."""
    from comfyquant.bench import models

    def build(name: str) -> tuple[nn.Module, tuple]:
        model = _t5() if name == "t5" else nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        return model, (torch.randn(1, 5, 64),)

    monkeypatch.setattr(models, "build", build)
    got = {v: m for v, m, _ in models.variants("t5", None, only=("int8_rot", "int8_rot_nonorm"))}
    assert list(got) == ["int8_rot", "int8_rot_nonorm"]
    assert isinstance(got["int8_rot"].layers[0].layer[0].layer_norm, FoldedNorm)
    assert isinstance(got["int8_rot_nonorm"].layers[0].layer[0].layer_norm, T5LayerNorm)
    assert [v for v, _, _ in models.variants("mlp", None, only=("int8_rot", "int8_rot_nonorm"))] == ["int8_rot"]


def test_bench_gemma_model_folds_its_pre_norms_with_one_plus_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyquant bench``'s Gemma-3-shaped encoder (``gemma3_12b_256``, here narrow): its input and
    pre-feed-forward norms fold into the quantizers with ``1 + weight`` (``NormSource.offset``), its post-norms
    stay, and the folded model computes what ``int8_nonorm`` (the same layers, norms in torch) computes."""
    from comfyquant.bench import blocks, models

    def build(name: str) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        model = blocks.Gemma3(layers=2, d=64, heads=2, kv_heads=1, head_dim=32, ff=96)
        for mod in model.modules():
            if getattr(mod, "add", False) is True:
                nn.init.uniform_(mod.weight, -0.5, 0.5)
        return model, (torch.randn(1, 7, 64),)

    monkeypatch.setattr(models, "build", build)
    got = {v: (m, a) for v, m, a in models.variants("gemma", None, only=("bf16", "int8", "int8_nonorm"))}
    assert list(got) == ["bf16", "int8", "int8_nonorm"]
    folded = got["int8"][0].layers[0]
    assert isinstance(folded.input_layernorm, FoldedNorm) and isinstance(folded.pre_feedforward_layernorm, FoldedNorm)
    assert folded.input_layernorm.offset == 1.0
    assert isinstance(folded.post_attention_layernorm, blocks.RMSNorm)  # acts on an output: stays
    assert folded.mlp.down_proj.input_act == "gated_gelu_tanh"
    with torch.no_grad():
        base, want, out = (got[v][0](*got[v][1]) for v in ("bf16", "int8_nonorm", "int8"))
    # on the CPU the folded norm is the same torch arithmetic, bit for bit; both are int8 (not the bf16 model)
    assert torch.equal(out, want) and float((want - base).norm() / base.norm()) > 1e-3
