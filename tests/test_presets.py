"""Presets: decisions on real key names, auto-detection, prefixes, and the architecture specs vs ComfyUI's models."""

from __future__ import annotations

import math
import re

import pytest
import torch

from comfyquant.errors import UserError
from comfyquant.presets.base import Action
from comfyquant.presets.registry import (
    MODEL_CHOICES,
    PRESETS,
    decide_tensor,
    describe_presets,
    detect_preset,
    get_preset,
    strip_prefix,
)
from comfyquant.testing.architectures import ARCHS, arch_tensors

Q, K, D = Action.QUANTIZE, Action.KEEP, Action.DROP

# (arch, tensor name, expected action): real key names of each family (full-size shapes from the specs).
EXPECTED = [
    ("flux", "img_in.weight", K), ("flux", "txt_in.weight", K), ("flux", "time_in.in_layer.weight", K),
    ("flux", "time_in.out_layer.weight", K), ("flux", "vector_in.in_layer.weight", K),
    ("flux", "guidance_in.out_layer.weight", K), ("flux", "final_layer.linear.weight", K),
    ("flux", "final_layer.adaLN_modulation.1.weight", K), ("flux", "double_blocks.3.img_mod.lin.weight", K),
    ("flux", "double_blocks.3.txt_mod.lin.weight", K), ("flux", "single_blocks.7.modulation.lin.weight", K),
    ("flux", "double_blocks.3.img_attn.norm.query_norm.scale", K), ("flux", "double_blocks.3.img_attn.qkv.bias", K),
    ("flux", "double_blocks.3.img_attn.qkv.weight", Q), ("flux", "double_blocks.3.txt_attn.proj.weight", Q),
    ("flux", "double_blocks.3.img_mlp.0.weight", Q), ("flux", "double_blocks.18.txt_mlp.2.weight", Q),
    ("flux", "single_blocks.37.linear1.weight", Q), ("flux", "single_blocks.0.linear2.weight", Q),
    ("flux2", "double_stream_modulation_img.lin.weight", K), ("flux2", "single_stream_modulation.lin.weight", K),
    ("flux2", "guidance_in.in_layer.weight", K), ("flux2", "txt_in.weight", K), ("flux2", "img_in.weight", K),
    ("flux2", "final_layer.linear.weight", K), ("flux2", "double_blocks.0.img_mlp.0.weight", Q),
    ("flux2", "double_blocks.7.txt_attn.qkv.weight", Q), ("flux2", "single_blocks.47.linear1.weight", Q),
    ("chroma", "distilled_guidance_layer.in_proj.weight", K),
    ("chroma", "distilled_guidance_layer.layers.4.out_layer.weight", K),
    ("chroma", "distilled_guidance_layer.norms.0.scale", K), ("chroma", "img_in.weight", K),
    ("chroma", "txt_in.weight", K), ("chroma", "final_layer.linear.weight", K),
    ("chroma", "double_blocks.0.img_attn.qkv.weight", Q), ("chroma", "single_blocks.5.linear2.weight", Q),
    ("hunyuan", "img_in.proj.weight", K), ("hunyuan", "txt_in.input_embedder.weight", K),
    ("hunyuan", "txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight", K),
    ("hunyuan", "txt_in.c_embedder.in_layer.weight", K), ("hunyuan", "guidance_in.in_layer.weight", K),
    ("hunyuan", "double_blocks.4.img_mod.lin.weight", K), ("hunyuan", "final_layer.linear.weight", K),
    ("hunyuan", "double_blocks.4.img_attn.qkv.weight", Q), ("hunyuan", "single_blocks.39.linear1.weight", Q),
    ("wan", "patch_embedding.weight", K), ("wan", "text_embedding.0.weight", K), ("wan", "text_embedding.2.weight", K),
    ("wan", "time_embedding.0.weight", K), ("wan", "time_projection.1.weight", K), ("wan", "head.head.weight", K),
    ("wan", "head.modulation", K), ("wan", "blocks.9.modulation", K), ("wan", "blocks.9.self_attn.norm_q.weight", K),
    ("wan", "blocks.9.self_attn.q.weight", Q), ("wan", "blocks.9.cross_attn.o.weight", Q),
    ("wan", "blocks.39.ffn.0.weight", Q), ("wan", "blocks.39.ffn.2.weight", Q),
    ("ltxv", "patchify_proj.weight", K), ("ltxv", "adaln_single.linear.weight", K),
    ("ltxv", "adaln_single.emb.timestep_embedder.linear_2.weight", K),
    ("ltxv", "caption_projection.linear_1.weight", K), ("ltxv", "proj_out.weight", K),
    ("ltxv", "transformer_blocks.3.scale_shift_table", K), ("ltxv", "transformer_blocks.3.attn1.to_q.weight", Q),
    ("ltxv", "transformer_blocks.3.attn2.to_out.0.weight", Q), ("ltxv", "transformer_blocks.3.ff.net.0.proj.weight", Q),
    ("qwen-image", "img_in.weight", K), ("qwen-image", "txt_in.weight", K), ("qwen-image", "txt_norm.weight", K),
    ("qwen-image", "time_text_embed.timestep_embedder.linear_1.weight", K),
    ("qwen-image", "transformer_blocks.10.img_mod.1.weight", K), ("qwen-image", "norm_out.linear.weight", K),
    ("qwen-image", "proj_out.weight", K), ("qwen-image", "transformer_blocks.10.attn.norm_added_q.weight", K),
    ("qwen-image", "transformer_blocks.10.attn.add_k_proj.weight", Q),
    ("qwen-image", "transformer_blocks.10.attn.to_add_out.weight", Q),
    ("qwen-image", "transformer_blocks.59.txt_mlp.net.0.proj.weight", Q),
    ("zimage", "x_embedder.weight", K), ("zimage", "cap_embedder.1.weight", K), ("zimage", "t_embedder.mlp.0.weight", K),
    ("zimage", "layers.3.adaLN_modulation.0.weight", K), ("zimage", "final_layer.linear.weight", K),
    ("zimage", "final_layer.adaLN_modulation.1.weight", K), ("zimage", "x_pad_token", K),
    ("zimage", "layers.3.attention.qkv.weight", Q), ("zimage", "layers.29.feed_forward.w2.weight", Q),
    ("zimage", "noise_refiner.0.attention.qkv.weight", Q), ("zimage", "context_refiner.1.feed_forward.w1.weight", Q),
    ("sd3", "x_embedder.proj.weight", K), ("sd3", "context_embedder.weight", K), ("sd3", "t_embedder.mlp.0.weight", K),
    ("sd3", "y_embedder.mlp.2.weight", K), ("sd3", "pos_embed", K),
    ("sd3", "joint_blocks.5.x_block.adaLN_modulation.1.weight", K), ("sd3", "final_layer.linear.weight", K),
    ("sd3", "joint_blocks.5.x_block.attn.qkv.weight", Q), ("sd3", "joint_blocks.5.context_block.mlp.fc2.weight", Q),
    ("sdxl", "time_embed.0.weight", K), ("sdxl", "time_embed.2.weight", K), ("sdxl", "label_emb.0.0.weight", K),
    ("sdxl", "input_blocks.0.0.weight", K), ("sdxl", "input_blocks.4.0.in_layers.2.weight", K),
    ("sdxl", "input_blocks.4.0.emb_layers.1.weight", K), ("sdxl", "input_blocks.4.0.skip_connection.weight", K),
    ("sdxl", "input_blocks.3.0.op.weight", K), ("sdxl", "output_blocks.2.2.conv.weight", K), ("sdxl", "out.2.weight", K),
    ("sdxl", "middle_block.1.norm.weight", K), ("sdxl", "input_blocks.4.1.transformer_blocks.0.norm2.weight", K),
    ("sdxl", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", Q),
    ("sdxl", "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", Q),
    ("sdxl", "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight", Q),
    ("sdxl", "output_blocks.0.1.transformer_blocks.3.ff.net.0.proj.weight", Q),
    ("sdxl", "output_blocks.0.1.transformer_blocks.3.ff.net.2.weight", Q), ("sdxl", "input_blocks.4.1.proj_in.weight", Q),
    ("t5xxl", "shared.weight", K), ("t5xxl", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", K),
    ("t5xxl", "encoder.final_layer_norm.weight", K), ("t5xxl", "encoder.block.5.layer.1.layer_norm.weight", K),
    ("t5xxl", "encoder.block.5.layer.0.SelfAttention.q.weight", Q), ("t5xxl", "encoder.block.5.layer.0.SelfAttention.o.weight", Q),
    ("t5xxl", "encoder.block.23.layer.1.DenseReluDense.wi_0.weight", Q),
    ("t5xxl", "encoder.block.23.layer.1.DenseReluDense.wi_1.weight", Q),
    ("t5xxl", "encoder.block.23.layer.1.DenseReluDense.wo.weight", Q),
    ("t5xxl-with-decoder", "decoder.block.0.layer.1.EncDecAttention.q.weight", D),
    ("t5xxl-with-decoder", "decoder.block.1.layer.2.DenseReluDense.wo.weight", D),
    ("t5xxl-with-decoder", "decoder.final_layer_norm.weight", D), ("t5xxl-with-decoder", "lm_head.weight", D),
    ("t5xxl-with-decoder", "encoder.block.0.layer.0.SelfAttention.k.weight", Q),
    ("clip", "text_model.embeddings.token_embedding.weight", K),
    ("clip", "text_model.embeddings.position_embedding.weight", K), ("clip", "text_projection.weight", K),
    ("clip", "text_model.final_layer_norm.weight", K), ("clip", "text_model.encoder.layers.3.self_attn.k_proj.weight", Q),
    ("clip", "text_model.encoder.layers.11.mlp.fc1.weight", Q),
    ("llm-te", "model.embed_tokens.weight", K), ("llm-te", "model.norm.weight", K),
    ("llm-te", "model.layers.2.input_layernorm.weight", K), ("llm-te", "visual.blocks.3.mlp.gate_proj.weight", K),
    ("llm-te", "visual.merger.mlp.0.weight", K), ("llm-te", "model.layers.2.self_attn.k_proj.weight", Q),
    ("llm-te", "model.layers.27.mlp.down_proj.weight", Q),
    ("lora", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", Q),
    ("lora", "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", Q),
    ("lora", "lora_unet_double_blocks_0_img_attn_qkv.alpha", K),
    ("lora", "diffusion_model.single_blocks.3.linear1.lora_A.weight", Q),
    ("lora", "diffusion_model.single_blocks.3.linear1.lora_B.weight", Q),
    ("lora", "diffusion_model.single_blocks.3.linear1.dora_scale", K),
    ("lora", "lora_unet_final_layer_linear.lora_down.weight", K),  # rank 4: too narrow to quantize
]


@pytest.mark.parametrize(("arch", "name", "action"), EXPECTED, ids=[f"{a}:{n}" for a, n, _ in EXPECTED])
def test_preset_decisions_on_real_key_names(arch: str, name: str, action: Action) -> None:
    shapes = dict(arch_tensors(arch, "full"))
    assert name in shapes, f"{name} is not a key of the {arch} spec"
    decision = decide_tensor(get_preset(ARCHS[arch].preset), name, shapes[name])
    assert decision.action is action, f"{name}: {decision}"
    assert decision.reason


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_quantizes_the_bulk_and_keeps_its_sensitive_layers(arch: str) -> None:
    preset = get_preset(ARCHS[arch].preset)
    specs = arch_tensors(arch, "full")
    by_action: dict[Action, int] = dict.fromkeys(Action, 0)
    for name, shape in specs:
        by_action[decide_tensor(preset, name, shape).action] += math.prod(shape)
    total = sum(by_action.values())
    floor = 0.25 if arch.endswith("-checkpoint") else 0.5  # bundled checkpoints keep their VAE / text encoders
    assert by_action[Action.QUANTIZE] / total > floor, by_action
    assert by_action[Action.KEEP] > 0


def test_quantize_rules_never_touch_non_linear_tensors() -> None:
    for arch in ARCHS:
        preset = get_preset(ARCHS[arch].preset)
        for name, shape in arch_tensors(arch, "tiny"):
            if decide_tensor(preset, name, shape).action is Action.QUANTIZE:
                assert len(shape) == 2 and name.endswith(".weight") and min(shape) >= 16, (arch, name, shape)


PREFIXES = ["", "model.diffusion_model.", "diffusion_model.", "model."]
DIFFUSION_ARCHS = [a for a in ARCHS if ARCHS[a].preset not in {"t5xxl", "clip", "llm-te", "lora"}
                   and not a.endswith("-checkpoint")]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("arch", DIFFUSION_ARCHS)
def test_detection_of_diffusion_models(arch: str, size: str, prefix: str) -> None:
    shapes = {prefix + n: s for n, s in arch_tensors(arch, size)}
    assert detect_preset(shapes).name == ARCHS[arch].preset


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer.", "cond_stage_model.transformer."])
@pytest.mark.parametrize("arch", ["t5xxl", "t5xxl-with-decoder", "clip", "llm-te"])
def test_detection_of_text_encoders(arch: str, prefix: str) -> None:
    for size in ("tiny", "full"):
        shapes = {prefix + n: s for n, s in arch_tensors(arch, size)}
        assert detect_preset(shapes).name == ARCHS[arch].preset


@pytest.mark.parametrize("arch", ["lora", "sdxl-checkpoint", "flux-checkpoint"])
def test_detection_of_loras_and_bundled_checkpoints(arch: str) -> None:
    for size in ("tiny", "full"):
        assert detect_preset(dict(arch_tensors(arch, size))).name == ARCHS[arch].preset


def test_detection_separates_look_alike_families() -> None:
    flux = dict(arch_tensors("flux", "tiny"))
    chroma_like = {n: s for n, s in flux.items() if "_mod.lin" not in n and "modulation.lin" not in n}
    assert detect_preset(chroma_like).name == "generic"  # neither Flux (no *_mod.lin) nor Chroma (no approximator)
    chroma_like["distilled_guidance_layer.in_proj.weight"] = (512, 64)
    assert detect_preset(chroma_like).name == "chroma"
    wan = dict(arch_tensors("wan", "tiny"))
    wan["patch_embedding.weight"] = (256, 64)  # a 2-D patch embedder is not Wan's Conv3d
    assert detect_preset(wan).name == "generic"
    refiner_only = {n: s for n, s in arch_tensors("zimage", "tiny") if not n.startswith("layers.")}
    assert detect_preset(refiner_only).name == "zimage-refiner"


def test_detection_failure_falls_back_to_generic() -> None:
    preset = detect_preset({"encoder.weird.0.weight": (64, 64), "foo.bar": (3,)})
    assert preset.name == "generic" and "detection failed" in preset.description.lower()
    assert detect_preset({}).name == "generic"
    generic = PRESETS["generic"]
    for name in ("img_in.weight", "time_embedding.0.weight", "final_layer.linear.weight", "blocks.0.adaLN_modulation.1.weight",
                 "shared.weight", "head.head.weight", "label_emb.0.0.weight"):
        assert generic.decide(name, (256, 256)).action is Action.KEEP, name
    assert generic.decide("blocks.0.attn.qkv.weight", (768, 256)).action is Action.QUANTIZE


def test_full_checkpoints_keep_vae_and_bundled_text_encoders() -> None:
    for arch in ("sdxl-checkpoint", "flux-checkpoint"):
        specs = arch_tensors(arch, "full")
        preset = detect_preset(dict(specs))
        vae_2d = [(n, s) for n, s in specs if n.startswith(("first_stage_model.", "vae.")) and len(s) == 2]
        assert vae_2d, "the spec must hold 2-D VAE weights for this test to mean anything"
        for name, shape in specs:
            decision = decide_tensor(preset, name, shape)
            if name.startswith(("first_stage_model.", "vae.")):
                assert decision.action is Action.KEEP and "VAE" in decision.reason, name
            elif name.startswith(("conditioner.", "text_encoders.")):
                assert decision.action is Action.KEEP, name
        unet_attn = next(n for n, _ in specs if n.endswith("attn1.to_q.weight") or n.endswith("img_attn.qkv.weight"))
        assert decide_tensor(preset, unet_attn, dict(specs)[unet_attn]).action is Action.QUANTIZE


def test_text_presets_leave_diffusion_tensors_alone() -> None:
    specs = dict(arch_tensors("flux-checkpoint", "tiny"))
    t5 = get_preset("t5xxl")
    assert decide_tensor(t5, "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                         specs["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]).action is Action.KEEP
    name = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert decide_tensor(t5, name, specs[name]).action is Action.QUANTIZE


@pytest.mark.parametrize(("name", "expected"), [
    ("model.diffusion_model.img_in.weight", ("model.diffusion_model.", "img_in.weight")),
    ("diffusion_model.blocks.0.ffn.0.weight", ("diffusion_model.", "blocks.0.ffn.0.weight")),
    ("model.double_blocks.0.img_mod.lin.weight", ("model.", "double_blocks.0.img_mod.lin.weight")),
    ("model.layers.0.mlp.gate_proj.weight", ("", "model.layers.0.mlp.gate_proj.weight")),
    ("model.embed_tokens.weight", ("", "model.embed_tokens.weight")),
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
     ("text_encoders.t5xxl.transformer.", "encoder.block.0.layer.0.SelfAttention.q.weight")),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
     ("conditioner.embedders.0.transformer.", "text_model.final_layer_norm.weight")),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
     ("conditioner.embedders.1.model.", "transformer.resblocks.0.attn.in_proj_weight")),
    ("first_stage_model.decoder.conv_in.weight", ("first_stage_model.", "decoder.conv_in.weight")),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
     ("cond_stage_model.transformer.", "text_model.embeddings.token_embedding.weight")),
    ("transformer.double_blocks.0.img_attn.qkv.weight", ("transformer.", "double_blocks.0.img_attn.qkv.weight")),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", ("", "encoder.block.0.layer.0.SelfAttention.q.weight")),
    ("model.", ("", "model.")),
])
def test_strip_prefix(name: str, expected: tuple[str, str]) -> None:
    assert strip_prefix(name) == expected


def test_get_preset_names_aliases_and_errors() -> None:
    for name in PRESETS:
        assert get_preset(name).name == name
    assert get_preset("FLUX").name == "flux" and get_preset("z-image").name == "zimage"
    assert get_preset("umt5").name == "t5xxl" and get_preset("zimage_refiner").name == "zimage-refiner"
    with pytest.raises(UserError, match=r"unknown model preset 'sdxxl'.*flux.*llm-te"):
        get_preset("sdxxl")
    assert get_preset("auto", dict(arch_tensors("wan", "tiny"))).name == "wan"
    with pytest.raises(ValueError):
        get_preset("auto")


def test_required_presets_exist_and_document_themselves() -> None:
    required = {"auto", "flux", "flux2", "chroma", "sd3", "sdxl", "wan", "hunyuan", "qwen-image", "zimage",
                "zimage-refiner", "ltxv", "t5xxl", "clip", "llm-te", "lora", "none"}
    assert required <= set(MODEL_CHOICES)
    listing = describe_presets()
    for preset in PRESETS.values():
        assert preset.structure_source and preset.description
        assert re.search(rf"^{re.escape(preset.name)}\s", listing, re.M)
        assert all(rule.reason for rule in preset.rules)
        if preset.structure_source.startswith("ComfyUI"):
            assert "comfy/" in preset.structure_source


def test_none_preset_quantizes_every_linear_weight() -> None:
    none = get_preset("none")
    for name, shape in arch_tensors("t5xxl", "tiny"):
        table = name.endswith(("shared.weight", "relative_attention_bias.weight"))  # nn.Embedding lookups
        expected = Action.QUANTIZE if len(shape) == 2 and min(shape) >= 16 and not table else Action.KEEP
        assert none.decide(name, shape).action is expected, name


# --- the specs against ComfyUI's own model classes (built on the meta device: no memory) ---

COMFY_DIFFUSION = ["flux", "flux2", "chroma", "hunyuan", "wan", "ltxv", "qwen-image", "zimage", "sd3", "sdxl"]
COMFY_TINY_LOADABLE = ["flux", "flux2", "hunyuan", "wan", "ltxv", "sd3"]


def _comfy_model_keys(comfy, specs: list[tuple[str, tuple[int, ...]]]) -> tuple[dict, dict]:
    sd = {n: torch.empty(s, device="meta") for n, s in specs}
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert config is not None, "ComfyUI did not recognize the architecture"
    sd = config.process_unet_state_dict(sd)  # e.g. Flux's *_norm.scale -> *_norm.weight, as ComfyUI loads it
    model = config.get_model(sd, "", device="meta")
    ours = {k: tuple(v.shape) for k, v in sd.items()}
    theirs = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    return ours, theirs


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", COMFY_DIFFUSION)
def test_full_specs_match_comfyui_models_exactly(comfy, arch: str) -> None:
    ours, theirs = _comfy_model_keys(comfy, arch_tensors(arch, "full"))
    assert ours == theirs


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", COMFY_TINY_LOADABLE)
def test_tiny_specs_build_comfyui_models(comfy, arch: str) -> None:
    ours, theirs = _comfy_model_keys(comfy, arch_tensors(arch, "tiny"))
    assert ours == theirs


@pytest.mark.comfyui
def test_text_encoder_specs_match_comfyui_models_exactly(comfy) -> None:
    import json
    from pathlib import Path

    import comfy.clip_model as clip_model
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.t5 as t5

    ops = comfy.ops.manual_cast
    te_dir = Path(t5.__file__).parent
    models = {
        "t5xxl": t5.T5(json.loads((te_dir / "t5_config_xxl.json").read_text()), torch.bfloat16, "meta", ops),
        "clip": clip_model.CLIPTextModel(json.loads((te_dir.parent / "sd1_clip_config.json").read_text()),
                                         torch.bfloat16, "meta", ops),
        "llm-te": llama.Qwen25_7BVLI({}, torch.bfloat16, "meta", ops),
    }
    for arch, model in models.items():
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert dict(arch_tensors(arch, "full")) == theirs, arch


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_specs_use_the_real_key_names(arch: str) -> None:
    full = {n for n, _ in arch_tensors(arch, "full")}
    tiny = arch_tensors(arch, "tiny")
    assert {n for n, _ in tiny} <= full  # same names, fewer blocks
    assert len(tiny) < 700 and sum(math.prod(s) for _, s in tiny) < 40e6


@pytest.mark.parametrize("name", [
    "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "shared.weight",
    "text_model.embeddings.token_embedding.weight", "model.embed_tokens.weight", "transformer.wte.weight",
])
def test_embedding_tables_are_never_quantized_by_default(name):
    # nn.Embedding tables are 2-D '.weight' tensors but are indexed, not multiplied: even the exclusion-free
    # 'none' preset keeps them, while a same-shaped linear weight is quantized.
    d = get_preset("none").decide(name, (30522, 384))
    assert d.action is Action.KEEP and "embedding" in d.reason
    assert get_preset("none").decide("encoder.layer.0.attention.self.query.weight", (384, 384)).action is Action.QUANTIZE
    assert get_preset("wan").decide("text_embedding.0.weight", (5120, 4096)).action is not Action.DROP
