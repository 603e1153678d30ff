"""'Enable INT8 on CLIP' on a real ComfyUI CLIP object: ComfyUI 0.30's own ``comfy.sd.CLIP``, Flux's text-encoder
stack class (``FluxClipModel``: CLIP-L + T5), ComfyUI's tokenizers and encode path, at a small width."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from gemm_counter import count_gemms

from comfyquant.nodes.clip_adapter import adapt_clip, encoders
from comfyquant.nodes.definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, INT8ClipAdapter
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions
from comfyquant.runtime.gated import GatedForward
from comfyquant.runtime.norms import FoldedNorm
from comfyquant.runtime.siblings import ArmedForward

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]

# ComfyUI's config files at a small width (CLIP-L: 768 wide, 12 layers; T5-XXL: 4096 wide, 24 layers)
CLIP_L = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407, "hidden_act": "quick_gelu",
          "hidden_size": 128, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 512,
          "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
          "num_attention_heads": 4, "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": 128,
          "torch_dtype": "float32", "vocab_size": 49408}
T5 = {"d_ff": 512, "d_kv": 32, "d_model": 256, "decoder_start_token_id": 0, "dense_act_fn": "gelu_pytorch_tanh",
      "dropout_rate": 0.1, "eos_token_id": 1, "is_encoder_decoder": True, "is_gated_act": True,
      "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_decoder_layers": 2, "num_heads": 8, "num_layers": 2,
      "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
      "vocab_size": 32128}


def _tiny_flux_clip(comfy: Any) -> Any:
    """A ``comfy.sd.CLIP`` whose stack is ComfyUI's ``FluxClipModel`` with small CLIP-L and T5 encoders (random
    weights, fixed seed) and whose tokenizer is ComfyUI's ``FluxTokenizer``."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device: str = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            torch.nn.Module.__init__(self)
            opts = model_options or {}
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     textmodel_json_config=CLIP_L, model_options=opts)
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=T5,
                                                    special_tokens={"end": 1, "pad": 0},
                                                    model_class=comfy.text_encoders.t5.T5,
                                                    model_options={**opts, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    class Target:
        params: ClassVar[dict] = {}
        clip = TinyFluxClip
        tokenizer = comfy.text_encoders.flux.FluxTokenizer

    clip = comfy.sd.CLIP(target=Target, model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():  # ComfyUI's ops leave weights uninitialized
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return clip


def _encode(clip: Any) -> tuple[torch.Tensor, torch.Tensor]:
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat riding a bicycle"), return_pooled=True)
    return cond.float(), pooled.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_clip_node_quantizes_each_encoder_with_its_preset_on_a_clone(comfy: Any) -> None:
    clip = _tiny_flux_clip(comfy)
    assert encoders(clip.cond_stage_model) == ["clip_l", "t5xxl"]
    ref_cond, ref_pooled = _encode(clip)
    before = dict(clip.patcher.object_patches)  # ComfyUI's own (the compute dtype)
    out = INT8ClipAdapter().apply(clip, True, "int8", "none", True, "auto", True, False)
    new = out["result"][0]
    text = out["ui"]["text"]
    assert new is not clip and clip.patcher.object_patches == before  # the input CLIP keeps its float layers
    assert any(t.startswith("clip_l: ") and "preset clip: 18 layers converted" in t and "1 kept" in t for t in text)
    assert any(t.startswith("t5xxl: ") and "preset t5xxl: 14 layers converted" in t for t in text)
    patches = {k: v for k, v in new.patcher.object_patches.items() if k not in before}
    forwards = {k: v for k, v in patches.items() if k.endswith(".forward")}  # parents of fused projections
    # T5's gated feed-forwards: folded (wo applies gelu_tanh(wi_0) * wi_1; wi_0 / wi_1 one GEMM)
    gated = {k for k, f in forwards.items() if isinstance(f, GatedForward)}
    assert gated == {f"t5xxl.transformer.encoder.block.{i}.layer.1.DenseReluDense.forward" for i in range(2)}
    assert len(forwards) == 7 and all(isinstance(f, ArmedForward) for k, f in forwards.items() if k not in gated)
    # T5's RMSNorms before q,k,v and wi_0 / wi_1, CLIP-L's LayerNorms before q,k,v and fc1: folded into those
    # layers' quantizer (runtime.norms); CLIP's final norm feeds no linear and stays
    norms = {k for k, v in patches.items() if isinstance(v, FoldedNorm)}
    clip_norms = {f"clip_l.transformer.text_model.encoder.layers.{i}.layer_norm{j}" for i in range(3) for j in (1, 2)}
    assert norms == clip_norms | {f"t5xxl.transformer.encoder.block.{i}.layer.{j}.layer_norm" for i in range(2)
                                  for j in range(2)}
    assert all(patches[k].layer for k in clip_norms) and not any(patches[k].layer for k in norms - clip_norms)
    clip_q = patches["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"]
    assert clip_q.input_norm.holder is patches["clip_l.transformer.text_model.encoder.layers.0.layer_norm1"]
    layers = {k: v for k, v in patches.items() if k not in forwards and k not in norms}
    assert len(layers) == 32 and all(isinstance(m, ComfyQuantLinear) for m in layers.values())
    q = layers["t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"]
    assert q.input_norm.holder is patches["t5xxl.transformer.encoder.block.0.layer.0.layer_norm"]
    assert "clip_l.transformer.text_projection" not in patches  # CLIP's preset keeps the pooled projection
    cond, pooled = _encode(new)
    assert cond.shape == ref_cond.shape and pooled.shape == ref_pooled.shape
    e_cond, e_pooled = _rel(cond, ref_cond), _rel(pooled, ref_pooled)
    assert 0 < e_cond < 0.02 and 0 < e_pooled < 0.02, (e_cond, e_pooled)  # measured 0.004 / 0.003
    again = _encode(clip)  # the shared stack is float again after the clone is unloaded
    assert torch.equal(again[0], ref_cond) and torch.equal(again[1], ref_pooled)


def test_clip_layer_norms_stay_with_fold_layer_norms_off(comfy: Any) -> None:
    """``fold_layer_norms=False``: CLIP-L's LayerNorms run as ComfyUI's modules (T5's RMSNorms still fold)."""
    clip = _tiny_flux_clip(comfy)
    ref_cond, _ = _encode(clip)
    plain, _ = adapt_clip(clip, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_layer_norms=False)))
    patches = plain.patcher.object_patches
    norms = {k for k, v in patches.items() if isinstance(v, FoldedNorm)}
    assert norms and all(k.startswith("t5xxl.") for k in norms)
    assert patches["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"].input_norm is None
    assert 0 < _rel(_encode(plain)[0], ref_cond) < 0.02


def test_clip_node_off_passes_the_clip_through(comfy: Any) -> None:
    clip = _tiny_flux_clip(comfy)
    off = INT8ClipAdapter().apply(clip, False, "int8", "none", True, "auto", True, False)
    assert off["result"][0] is clip and off["ui"]["text"]


def test_a_second_clip_adapter_after_the_first_was_used_converts_every_encoder(comfy: Any) -> None:
    """Regression: with the first clone loaded, its converted layers sit in the shared stack; the second run took
    T5 (every linear converted) for no encoder and left it float (cond error exactly 0)."""
    clip = _tiny_flux_clip(comfy)
    ref_cond, ref_pooled = _encode(clip)
    plain, _ = adapt_clip(clip, AdapterSettings(format="int8"))
    e_plain = _rel(_encode(plain)[0], ref_cond)  # loads the first clone: its layers are in the stack now
    rot, reports = adapt_clip(clip, AdapterSettings(format="int8", outlier_method="hadamard"))
    assert [name for name, _ in reports] == ["clip_l", "t5xxl"] and all(r.format == "int8-rot" for _, r in reports)
    assert [len(r.converted) for _, r in reports] == [18, 14]
    cond, pooled = _encode(rot)
    e_rot = _rel(cond, ref_cond)
    assert 0 < e_rot < 0.02 and 0 < e_plain < 0.02 and 0 < _rel(pooled, ref_pooled) < 0.02, (e_rot, e_plain)


def test_clip_adapter_needs_auto_presets_and_registers_as_a_node() -> None:
    with pytest.raises(ValueError, match="model_type must be 'auto'"):
        adapt_clip(object(), AdapterSettings(format="int8", model_type="flux"))
    assert NODE_CLASS_MAPPINGS["INT8ClipAdapter"] is INT8ClipAdapter
    assert NODE_DISPLAY_NAME_MAPPINGS["INT8ClipAdapter"] == "Enable INT8 on CLIP"
    inputs = INT8ClipAdapter.INPUT_TYPES()
    assert inputs["required"]["clip"] == ("CLIP",) and INT8ClipAdapter.RETURN_TYPES == ("CLIP",)
    assert inputs["required"]["outlier_method"][0] == ["none", "hadamard"]
    assert inputs["required"]["format"][0] == ["int8", "int8-rot", "fp8", "int4-rot"]
    assert inputs["optional"]["fuse_projections"][1]["default"] is True


def test_t5_and_clip_projections_run_fused_with_the_same_numbers(comfy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the node and ComfyUI's encode path: T5Attention's q,k,v, T5DenseGatedActDense's wi_0/wi_1 and
    CLIPAttention's q_proj/k_proj/v_proj each run as one GEMM (after one observed encode; T5's gated feed-forward,
    folded into wo, from the first), and the conditioning is the one without fusion bit for bit."""
    clip = _tiny_flux_clip(comfy)
    float_ref = _encode(clip)
    node = INT8ClipAdapter()
    off = node.apply(clip, True, "int8", "none", True, "auto", True, False, fuse_projections=False)["result"][0]
    out = node.apply(clip, True, "int8", "none", True, "auto", True, False)
    on, text = out["result"][0], out["ui"]["text"]
    assert any(t.startswith("t5xxl: ") and "4 projection groups fused" in t for t in text), text
    assert any(t.startswith("clip_l: ") and "3 projection groups fused" in t for t in text), text
    assert not any(k.endswith(".forward") for k in off.patcher.object_patches)
    widths = count_gemms(monkeypatch)
    ref = [_encode(off) for _ in range(2)]
    assert len(widths) == 2 * 32
    widths.clear()
    got = []
    for i in range(2):
        got.append(_encode(on))
        if i == 0:
            assert len(widths) == 30 and widths[4:6] == [1024, 256]  # observed (the gated MLPs fused already)
            widths.clear()
    # per T5 block: q,k,v (3 x 256), o, wi_0/wi_1 (2 x 512), wo; per CLIP layer: q,k,v (3 x 128), out, fc1, fc2
    assert widths == [768, 256, 1024, 256] * 2 + [384, 128, 512, 128] * 3, widths
    assert all(torch.equal(a, b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    again = _encode(clip)  # the clone unloaded: the shared stack's forwards and layers are float again
    assert torch.equal(again[0], float_ref[0]) and torch.equal(again[1], float_ref[1])
    attn = clip.patcher.model.t5xxl.transformer.encoder.block[0].layer[0].SelfAttention
    assert type(attn.q).__name__ == "Linear" and not isinstance(attn.forward, ArmedForward)


def test_t5_gated_feed_forward_is_folded_into_wo(comfy: Any) -> None:
    """ComfyUI's own ``T5DenseGatedActDense`` (``wo(gelu_tanh(wi_0(x)) * wi_1(x))``): the node patches its forward
    on the clone so that ``wo`` applies ``gated_gelu_tanh`` to wi_0 / wi_1's one GEMM. The conditioning is the one
    with folds off (wi_0 / wi_1 then a plain sibling pair) bit for bit, and close to the float CLIP's."""
    clip = _tiny_flux_clip(comfy)
    float_cond, _ = _encode(clip)
    folded, reports = adapt_clip(clip, AdapterSettings(format="int8"))
    plain, plain_reports = adapt_clip(clip, AdapterSettings(format="int8",
                                                           runtime=RuntimeOptions(fold_activations=False)))
    ffs = [f"t5xxl.transformer.encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)]
    t5, t5_plain = dict(reports)["t5xxl"], dict(plain_reports)["t5xxl"]
    assert [f for f in t5.folded if "->" not in f] == [f"{p}.wo: gated_gelu_tanh" for p in ffs]
    assert [f for f in t5.folded if "->" in f] == [  # the RMSNorms before them too (runtime.norms)
        f"t5xxl.transformer.encoder.block.{i}.layer.{j}.layer_norm -> {c}" for i in range(2)
        for j, c in ((0, "SelfAttention.q,k,v"), (1, "DenseReluDense.wi_0,wi_1"))]
    assert t5_plain.folded == []
    for report in (t5, t5_plain):
        assert [f for f in report.fused if "DenseReluDense" in f] == [f"{p}: wi_0,wi_1" for p in ffs]
    patches = folded.patcher.object_patches
    assert all(isinstance(patches[f"{p}.forward"], GatedForward) for p in ffs)
    assert patches[f"{ffs[0]}.wo"].input_act == "gated_gelu_tanh" and patches[f"{ffs[0]}.wi_0"].input_act is None
    assert isinstance(plain.patcher.object_patches[f"{ffs[0]}.forward"], ArmedForward)
    cond, cond_plain = _encode(folded)[0], _encode(plain)[0]
    assert torch.equal(cond, cond_plain) and 0 < _rel(cond, float_cond) < 0.02
    assert patches[f"{ffs[0]}.forward"].group.fused_calls == 1
