"""LoRA merge correctness against ComfyUI 0.30's own loader: for every LoRA format, generated with that format's
real key names, the weights comfyquant merges equal what ComfyUI's ``load_lora`` + ``calculate_weight`` make of
the same files on the same base weights (float32), and the converted int8 file, loaded by ComfyUI's ops, computes
the float-merged layer within the W8A8 bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import (
    LoraBuilder,
    assert_close_weights,
    base_weights,
    comfy_clip_keymap,
    comfy_flux_like_keymap,
    comfy_merged,
    comfy_standin_keymap,
)
from safetensors.torch import load_file, save_file

from comfyquant.io.reader import CheckpointReader
from comfyquant.lora.files import read_lora
from comfyquant.lora.keymap import build_keymap
from comfyquant.lora.merge import LoRAMerge, LoraSpec, MergeConfig, bind_loras

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui, pytest.mark.usefixtures("torch_single_thread")]
H = 256  # tiny Flux / SD3 / Wan / Qwen width


def ours(base: dict[str, torch.Tensor], loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """comfyquant's merged float32 weights for every base tensor the LoRAs change."""
    bound = bind_loras([read_lora(p) for p, _ in loras], [s for _, s in loras],
                       build_keymap({k: tuple(v.shape) for k, v in base.items()}), "base")
    return {n: bound(n, base[n].float().clone()) for n in bound.names}


def save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def flux(comfy: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = base_weights("flux")
    return sd, comfy_flux_like_keymap(comfy, sd)


def _flux_lora(style: str) -> dict[str, torch.Tensor]:
    b = LoraBuilder(seed=hash(style) % 1000)
    if style == "kohya":
        b.lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H)
        b.lora("lora_unet_single_blocks_1_linear1", 7 * H, H, rank=8, alpha=4.0)
        b.lora("lora_unet_double_blocks_1_txt_mod_lin", 6 * H, H, alpha=None)
    elif style in ("comfy", "aitoolkit"):  # ComfyUI-native / ai-toolkit & BFL style: diffusion_model.<BFL name>
        s = "kohya" if style == "comfy" else "peft"
        b.lora("diffusion_model.double_blocks.1.img_attn.proj", H, H, style=s)
        b.lora("diffusion_model.single_blocks.0.linear2", H, 5 * H, style=s, alpha=None)
        b.lora("diffusion_model.final_layer.linear", 64, H, style=s)
    else:  # diffusers names, split q/k/v and proj_mlp filling the fused BFL layers row by row
        alpha = None if style == "peft_noalpha" else 4.0
        s = {"peft": "peft", "peft_noalpha": "peft", "diffusers": "diffusers"}[style]
        for p in "qkv":
            b.lora(f"transformer.transformer_blocks.0.attn.to_{p}", H, H, style=s, alpha=alpha)
            b.lora(f"transformer.transformer_blocks.1.attn.add_{p}_proj", H, H, style=s, alpha=alpha)
            b.lora(f"transformer.single_transformer_blocks.1.attn.to_{p}", H, H, style=s, alpha=alpha)
        b.lora("transformer.single_transformer_blocks.1.proj_mlp", 4 * H, H, style=s, alpha=alpha)
        b.lora("transformer.single_transformer_blocks.0.proj_out", H, 5 * H, style=s, alpha=alpha)
        b.lora("transformer.transformer_blocks.1.ff.net.0.proj", 4 * H, H, style=s, alpha=alpha)
        b.lora("transformer.transformer_blocks.0.attn.to_add_out", H, H, style=s, alpha=alpha)
        b.lora("transformer.norm_out.linear", 2 * H, H, style=s, alpha=alpha)  # halves stored swapped
        b.lora("transformer.x_embedder", H, 64, style=s, alpha=alpha)
        b.lora("transformer.time_text_embed.timestep_embedder.linear_1", H, 256, style=s, alpha=alpha)
    return b.sd


@pytest.mark.parametrize("style", ["kohya", "comfy", "aitoolkit", "peft", "peft_noalpha", "diffusers"])
def test_flux_lora_formats_merge_like_comfyui(comfy: Any, flux: Any, tmp_path: Path, style: str) -> None:
    base, key_map = flux
    lora = _flux_lora(style)
    got = ours(base, [(save(tmp_path, style, lora), 0.8)])
    want = comfy_merged(comfy, lora, key_map, {f"diffusion_model.{k}": v for k, v in base.items()}, 0.8)
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


def test_diffusers_qkv_fill_their_own_row_slices(flux: Any, tmp_path: Path) -> None:
    """Only the rows of the projection a LoRA names change: a to_k LoRA leaves q and v rows of qkv intact."""
    base, _ = flux
    lora = LoraBuilder().lora("transformer.single_transformer_blocks.0.attn.to_k", H, H, style="peft").sd
    got = ours(base, [(save(tmp_path, "k", lora), 1.0)])
    w0, w1 = base["single_blocks.0.linear1.weight"], got["single_blocks.0.linear1.weight"]
    changed = (w1 != w0).any(dim=1).nonzero().flatten()
    assert changed.min() == H and changed.max() == 2 * H - 1 and len(changed) == H


def test_several_loras_with_dampening_match_chained_loaders(comfy: Any, flux: Any, tmp_path: Path) -> None:
    """Two LoRAs at --merge-lora-scale 0.5: the second dampened to 0.9x, as two chained LoraLoader nodes."""
    base, key_map = flux
    a, b = _flux_lora("kohya"), _flux_lora("peft")
    cfg = MergeConfig((LoraSpec(save(tmp_path, "a", a)), LoraSpec(save(tmp_path, "b", b), 2.0)), scale=0.5)
    assert cfg.strengths() == pytest.approx([0.5, 0.9]) and cfg.dampen
    bound = LoRAMerge(cfg).bind(CheckpointReader(save(tmp_path, "base", base)).infos)
    got = {n: bound(n, base[n].clone()) for n in bound.names}
    want = comfy_merged(comfy, a, key_map, {f"diffusion_model.{k}": v for k, v in base.items()}, 0.5,
                        more=[(b, 0.9)])
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


# -- LyCORIS adapters, DoRA and full diffs on SDXL (conv and linear layers) -------------------------------------
@pytest.fixture(scope="module")
def sdxl(comfy: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = base_weights("sdxl")
    conf = comfy.model_detection.detect_unet_config({f"model.diffusion_model.{k}": v for k, v in sd.items()},
                                                    "model.diffusion_model.")
    return sd, comfy_standin_keymap(comfy, "SDXL", sd, conf)


def _lycoris(kind: str) -> dict[str, torch.Tensor]:
    b = LoraBuilder(seed=7)
    attn = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 128 x 128 linear
    conv = "lora_unet_input_blocks_4_0_in_layers_2"  # conv 128 <- 64, 3x3
    if kind == "locon":
        b.lora(conv, 128, (64, 3, 3)).lora(attn, 128, 128, rank=8)
    elif kind == "locon_tucker":
        b.locon_tucker(conv, 128, 64)
    elif kind == "loha":
        b.loha(attn, 128, 128).loha("lora_unet_middle_block_1_proj_in", 256, 256)
    elif kind == "loha_cp":
        b.loha_cp(conv, 128, 64)
    elif kind == "lokr":
        b.lokr(attn, (8, 16), (8, 16)).lokr("lora_unet_output_blocks_2_1_proj_out", (16, 16), (8, 32),
                                            decompose_w1=True)
    elif kind == "dora":
        b.lora(attn, 128, 128, dora="in").lora("lora_unet_middle_block_1_proj_out", 256, 256, dora="out")
    elif kind == "diff":
        b.diff("lora_unet_input_blocks_4_1_proj_in", (128, 128), bias=128).diff("lora_unet_out_2", (4, 64, 3, 3))
    return b.sd


@pytest.mark.parametrize("kind", ["locon", "locon_tucker", "loha", "loha_cp", "lokr", "dora", "diff"])
def test_lycoris_dora_and_diff_adapters_merge_like_comfyui(comfy: Any, sdxl: Any, tmp_path: Path, kind: str) -> None:
    base, key_map = sdxl
    lora = _lycoris(kind)
    got = ours(base, [(save(tmp_path, kind, lora), 0.7)])
    want = comfy_merged(comfy, lora, key_map, {f"diffusion_model.{k}": v for k, v in base.items()}, 0.7)
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


@pytest.mark.parametrize("style", ["kohya_diffusers", "unet_processor", "unet_peft"])
def test_sdxl_diffusers_unet_names(comfy: Any, sdxl: Any, tmp_path: Path, style: str) -> None:
    """kohya SD-style names (diffusers blocks, underscores) and diffusers ``unet.`` names reach the ldm layers."""
    base, key_map = sdxl
    b = LoraBuilder(seed=3)
    if style == "kohya_diffusers":
        b.lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 128, 256)
        b.lora("lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_ff_net_0_proj", 2048, 256)
        b.lora("lora_unet_mid_block_resnets_1_time_emb_proj", 256, 256)
        b.lora("lora_unet_down_blocks_1_resnets_0_conv1", 128, (64, 3, 3))
    elif style == "unet_processor":
        b.lora("unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.processor.to_q", 256, 256,
               style="processor", alpha=None)
        b.lora("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out", 128, 128,
               style="processor", alpha=None)
    else:  # PEFT names (comfyquant maps them; ComfyUI 0.30 does not, so the reference is the processor form)
        b.lora("unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q", 256, 256, style="peft", alpha=None)
        b.lora("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", 128, 128, style="peft",
               alpha=None)
    got = ours(base, [(save(tmp_path, style, b.sd), 1.0)])
    ref_sd = b.sd
    if style == "unet_peft":
        ref_sd = {k.replace(".attn1.to_q.lora_B.weight", ".attn1.processor.to_q_lora.up.weight")
                  .replace(".attn1.to_q.lora_A.weight", ".attn1.processor.to_q_lora.down.weight")
                  .replace(".attn1.to_out.0.lora_B.weight", ".attn1.processor.to_out_lora.up.weight")
                  .replace(".attn1.to_out.0.lora_A.weight", ".attn1.processor.to_out_lora.down.weight"): v
                  for k, v in b.sd.items()}
    want = comfy_merged(comfy, ref_sd, key_map, {f"diffusion_model.{k}": v for k, v in base.items()})
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


# -- other families: SD3, Qwen-Image (diffusers names), Wan (ComfyUI names and diffusers names) ------------------
def test_sd3_diffusers_names_merge_like_comfyui(comfy: Any, tmp_path: Path) -> None:
    base = base_weights("sd3")
    key_map = comfy_flux_like_keymap(comfy, base)
    b = LoraBuilder(seed=11)
    for p in "qkv":
        b.lora(f"transformer.transformer_blocks.0.attn.to_{p}", H, H, style="peft")
        b.lora(f"transformer.transformer_blocks.2.attn.add_{p}_proj", H, H, style="peft")
    b.lora("transformer.transformer_blocks.1.ff_context.net.2", H, 4 * H, style="peft")
    b.lora("transformer.transformer_blocks.3.norm1_context.linear", 2 * H, H, style="peft")  # pre-only: swapped
    b.lora("transformer.transformer_blocks.3.norm1.linear", 6 * H, H, style="peft")
    b.lora("transformer.norm_out.linear", 2 * H, H, style="peft")
    got = ours(base, [(save(tmp_path, "sd3", b.sd), 0.9)])
    want = comfy_merged(comfy, b.sd, key_map, {f"diffusion_model.{k}": v for k, v in base.items()}, 0.9)
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


def test_qwen_image_transformer_names_merge_like_comfyui(comfy: Any, tmp_path: Path) -> None:
    base = base_weights("qwen-image")
    key_map = comfy_standin_keymap(comfy, "QwenImage", base)
    b = LoraBuilder(seed=12)
    b.lora("transformer.transformer_blocks.0.attn.to_q", H, H, style="peft")
    b.lora("transformer.transformer_blocks.1.attn.add_v_proj", H, H, style="peft", alpha=8.0)
    b.lora("transformer_blocks.1.img_mlp.net.0.proj", 4 * H, H, style="peft_default", alpha=None)
    b.lora("lycoris_transformer_blocks_0_txt_mod_1", 6 * H, H)
    got = ours(base, [(save(tmp_path, "qwen", b.sd), 1.0)])
    want = comfy_merged(comfy, b.sd, key_map, {f"diffusion_model.{k}": v for k, v in base.items()})
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


def test_wan_lora_names(comfy: Any, tmp_path: Path) -> None:
    """musubi / diffusion-pipe names (ComfyUI's own map) and diffusers names (comfyquant's Wan table)."""
    base = base_weights("wan")
    key_map = comfy_flux_like_keymap(comfy, base)
    native = LoraBuilder(seed=13)
    native.lora("diffusion_model.blocks.0.self_attn.q", H, H, style="peft")
    native.lora("lora_unet_blocks_1_cross_attn_o", H, H)
    native.lora("lora_unet__blocks_1_ffn_0", 768, H)  # Wan-Fun's double underscore (ComfyUI detects the file
    native.lora("lora_unet__blocks_0_cross_attn_k", H, H)  # by this key)
    got = ours(base, [(save(tmp_path, "wan_native", native.sd), 1.0)])
    want = comfy_merged(comfy, native.sd, key_map, {f"diffusion_model.{k}": v for k, v in base.items()})
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})
    # diffusers names: ComfyUI 0.30 has no map for them; the same tensors under ComfyUI names are the reference
    renames = {"transformer.blocks.0.attn1.to_q": "diffusion_model.blocks.0.self_attn.q",
               "transformer.blocks.1.attn2.to_out.0": "diffusion_model.blocks.1.cross_attn.o",
               "transformer.blocks.1.ffn.net.0.proj": "diffusion_model.blocks.1.ffn.0",
               "transformer.condition_embedder.time_proj": "diffusion_model.time_projection.1",
               "transformer.proj_out": "diffusion_model.head.head"}
    d = LoraBuilder(seed=14)
    for name, shape in (("transformer.blocks.0.attn1.to_q", (H, H)), ("transformer.blocks.1.attn2.to_out.0", (H, H)),
                        ("transformer.blocks.1.ffn.net.0.proj", (768, H)),
                        ("transformer.condition_embedder.time_proj", (6 * H, H)), ("transformer.proj_out", (64, H))):
        d.lora(name, *shape, style="peft")
    got = ours(base, [(save(tmp_path, "wan_diffusers", d.sd), 1.0)])
    ref_sd = {}
    for k, v in d.sd.items():
        mod = next(m for m in renames if k.startswith(m + "."))
        ref_sd[renames[mod] + k[len(mod):]] = v
    want = comfy_merged(comfy, ref_sd, key_map, {f"diffusion_model.{k}": v for k, v in base.items()})
    assert_close_weights(got, want, {k: f"diffusion_model.{k}" for k in got})


# -- text encoders of a bundled SDXL checkpoint (kohya te1/te2, diffusers text_encoder / text_encoder_2) ---------
def test_sdxl_checkpoint_text_encoder_loras(comfy: Any, tmp_path: Path) -> None:
    base = base_weights("sdxl-checkpoint")
    l_pre, g_pre = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
    internal: dict[str, torch.Tensor] = {}  # what ComfyUI holds after loading: both CLIPs in HF layout
    for k, v in base.items():
        if k.startswith(l_pre):
            internal[f"clip_l.transformer.{k[len(l_pre):]}"] = v
    w = base[g_pre + "transformer.resblocks.0.attn.out_proj.weight"].shape[0]
    for i in range(2):
        src = f"{g_pre}transformer.resblocks.{i}."
        dst = f"clip_g.transformer.text_model.encoder.layers.{i}."
        for j, p in enumerate("qkv"):
            internal[f"{dst}self_attn.{p}_proj.weight"] = base[src + "attn.in_proj_weight"][j * w:(j + 1) * w]
        internal[f"{dst}self_attn.out_proj.weight"] = base[src + "attn.out_proj.weight"]
        internal[f"{dst}mlp.fc1.weight"] = base[src + "mlp.c_fc.weight"]
        internal[f"{dst}mlp.fc2.weight"] = base[src + "mlp.c_proj.weight"]
    key_map = comfy_clip_keymap(comfy, internal)
    b = LoraBuilder(seed=15)
    b.lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 256, 256)
    b.lora("lora_te1_text_model_encoder_layers_1_mlp_fc2", 256, 1024)
    b.lora("lora_te2_text_model_encoder_layers_1_self_attn_k_proj", w, w)
    b.lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", 4 * w, w)
    b.lora("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", w, w, style="diffusers", alpha=None)
    got = ours(base, [(save(tmp_path, "te", b.sd), 1.0)])
    want = comfy_merged(comfy, b.sd, key_map, internal)
    # our fused in_proj_weight holds ComfyUI's separately merged q/k/v as row thirds
    for i in range(2):
        src = f"{g_pre}transformer.resblocks.{i}.attn.in_proj_weight"
        if src in got:
            dst = f"clip_g.transformer.text_model.encoder.layers.{i}.self_attn."
            for j, p in enumerate("qkv"):
                got[f"{dst}{p}_proj.weight"] = got[src][j * w:(j + 1) * w]
                if f"{dst}{p}_proj.weight" not in want:
                    assert torch.equal(got[f"{dst}{p}_proj.weight"], internal[f"{dst}{p}_proj.weight"].float())
                    del got[f"{dst}{p}_proj.weight"]
            del got[src]
    rename = {k: "clip_l.transformer." + k[len(l_pre):] for k in got if k.startswith(l_pre)}
    rename.update({k: "clip_g.transformer.text_model.encoder.layers." + k.split("resblocks.")[1]
                   .replace("mlp.c_fc", "mlp.fc1") for k in got if k.startswith(g_pre)})
    assert_close_weights(got, want, rename)


# -- the converted file, loaded by ComfyUI's own ops --------------------------------------------------------
@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.parametrize("fmt", ["int8", "int8-rot"])
def test_merged_then_quantized_layers_in_comfyui_match_float_merge(comfy: Any, flux: Any, tmp_path: Path,
                                                                   fmt: str) -> None:
    from comfyui_reference import int8_original_expectation, layer_tensors, run_layer

    from comfyquant.convert.api import convert

    base, key_map = flux
    src = save(tmp_path, "base", {k: v.to(torch.bfloat16) for k, v in base.items()})
    lora = _flux_lora("peft")
    out = tmp_path / f"merged-{fmt}.safetensors"
    report = convert(src, out, format=fmt, merge_loras=[f"{save(tmp_path, 'peft', lora)}:0.8"], progress=False)
    assert any("16 of 16 modules matched, 9 base tensors changed" in n for n in report.notes), report.notes
    bf16 = {f"diffusion_model.{k}": v.to(torch.bfloat16) for k, v in base.items()}
    want = comfy_merged(comfy, lora, key_map, bf16, 0.8)
    sd = load_file(str(out))
    quantized = kept = 0
    for key, w in want.items():
        name = key[len("diffusion_model."):]
        layer = name[: -len(".weight")]
        tensors = layer_tensors(sd, layer)
        if "comfy_quant" not in tensors:  # kept in bf16 by the flux preset: the merged weight, cast once
            assert torch.equal(sd[name], w.to(torch.bfloat16)), name
            kept += 1
            continue
        _, x, y = run_layer(comfy, tensors, torch.float32)
        int8_original_expectation(tensors, x, w, torch.float32).check(y, f"{fmt} {layer}")
        quantized += 1
    assert (quantized, kept) == (6, 3)  # img_in, time_in, norm_out stay bf16 under the flux preset: merged too


def test_stock_loraloader_cannot_use_a_quantized_lora_and_inspect_says_so(comfy: Any, flux: Any,
                                                                          tmp_path: Path) -> None:
    """``--model lora`` output: ComfyUI's LoRA loader adds the raw int8 codes (ignoring weight_scale), while
    comfyquant dequantizes them; ``inspect`` reports the file as not usable by stock ComfyUI."""
    from comfyquant.convert.api import convert
    from comfyquant.convert.inspect import inspect_checkpoint

    base, key_map = flux
    sd = LoraBuilder(scale=0.05).lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, rank=16).sd
    src = save(tmp_path, "float", sd)
    q = tmp_path / "q.safetensors"
    convert(src, q, model="lora", progress=False)
    plan = inspect_checkpoint(src, model="lora")
    assert not plan.stock_comfy and any("NOT able to use it" in n for n in plan.notes)
    res = inspect_checkpoint(q)
    assert res.lora and not res.stock_comfy and "LoraLoader can use it: NO" in res.to_text()
    name = "double_blocks.0.img_attn.qkv.weight"
    weights = {f"diffusion_model.{name}": base[name]}
    want = comfy_merged(comfy, sd, key_map, weights)[f"diffusion_model.{name}"] - base[name]
    stock = comfy_merged(comfy, load_file(str(q)), key_map, weights)[f"diffusion_model.{name}"] - base[name]
    ours_q = ours({name: base[name]}, [(q, 1.0)])[name] - base[name]
    assert float((stock - want).norm() / want.norm()) > 100  # raw codes: off by 1 / (s_up * s_down)
    assert float((ours_q - want).norm() / want.norm()) < 0.02
