"""Key names and shapes of real diffusion transformers (Flux family, HunyuanVideo, Wan, LTXV, Qwen-Image, Z-Image,
SD3), as ComfyUI's model code in ``comfy/ldm/`` names them. Each builder takes a config dict of widths/depths."""

from __future__ import annotations

from typing import Any

TensorSpec = tuple[str, tuple[int, ...]]


class SpecList:
    """Collects ``(name, shape)`` pairs with shorthands for the common module types."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.items: list[TensorSpec] = []

    def t(self, name: str, *shape: int) -> None:
        self.items.append((self.prefix + name, tuple(shape)))

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self.t(f"{name}.weight", out, inp)
        if bias:
            self.t(f"{name}.bias", out)

    def norm(self, name: str, dim: int, bias: bool = False, key: str = "weight") -> None:
        self.t(f"{name}.{key}", dim)
        if bias:
            self.t(f"{name}.bias", dim)

    def mlp_embedder(self, name: str, inp: int, hidden: int, bias: bool = True) -> None:
        self.linear(f"{name}.in_layer", hidden, inp, bias)
        self.linear(f"{name}.out_layer", hidden, hidden, bias)


def _double_block(s: SpecList, p: str, c: dict[str, Any], *, mod: bool, flux2: bool, norm_key: str) -> None:
    h, mlp, hd, b = c["hidden"], int(c["hidden"] * c["mlp_ratio"]), c["hidden"] // c["heads"], not flux2
    for st in ("img", "txt"):
        if mod:
            s.linear(f"{p}.{st}_mod.lin", 6 * h, h)
        s.linear(f"{p}.{st}_attn.qkv", 3 * h, h, bias=c.get("qkv_bias", True) and b)
        s.norm(f"{p}.{st}_attn.norm.query_norm", hd, key=norm_key)
        s.norm(f"{p}.{st}_attn.norm.key_norm", hd, key=norm_key)
        s.linear(f"{p}.{st}_attn.proj", h, h, bias=b)
        s.linear(f"{p}.{st}_mlp.0", 2 * mlp if flux2 else mlp, h, bias=b)
        s.linear(f"{p}.{st}_mlp.2", h, mlp, bias=b)


def _single_block(s: SpecList, p: str, c: dict[str, Any], *, mod: bool, flux2: bool, norm_key: str) -> None:
    h, mlp, hd, b = c["hidden"], int(c["hidden"] * c["mlp_ratio"]), c["hidden"] // c["heads"], not flux2
    s.linear(f"{p}.linear1", 3 * h + (2 * mlp if flux2 else mlp), h, bias=b)
    s.linear(f"{p}.linear2", h, h + mlp, bias=b)
    s.norm(f"{p}.norm.query_norm", hd, key=norm_key)
    s.norm(f"{p}.norm.key_norm", hd, key=norm_key)
    if mod:
        s.linear(f"{p}.modulation.lin", 3 * h, h)


def flux(c: dict[str, Any]) -> list[TensorSpec]:
    """Flux.1 (``comfy/ldm/flux/model.py``); BFL checkpoints name the QK-norm weights ``.scale``."""
    s, h = SpecList(), c["hidden"]
    s.linear("img_in", h, c["in_channels"])
    s.mlp_embedder("time_in", 256, h)
    s.mlp_embedder("vector_in", c["vec_in"], h)
    if c.get("guidance", True):
        s.mlp_embedder("guidance_in", 256, h)
    s.linear("txt_in", h, c["context"])
    for i in range(c["depth"]):
        _double_block(s, f"double_blocks.{i}", c, mod=True, flux2=False, norm_key="scale")
    for i in range(c["single"]):
        _single_block(s, f"single_blocks.{i}", c, mod=True, flux2=False, norm_key="scale")
    s.linear("final_layer.linear", c["in_channels"], h)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return s.items


def flux2(c: dict[str, Any]) -> list[TensorSpec]:
    """Flux.2 (global modulation, bias-free, SiLU-gated MLPs; ``model_detection.py`` flux2 branch)."""
    s, h = SpecList(), c["hidden"]
    s.linear("img_in", h, c["in_channels"], bias=False)
    s.mlp_embedder("time_in", 256, h, bias=False)
    s.mlp_embedder("guidance_in", 256, h, bias=False)
    s.linear("txt_in", h, c["context"], bias=False)
    s.linear("double_stream_modulation_img.lin", 6 * h, h, bias=False)
    s.linear("double_stream_modulation_txt.lin", 6 * h, h, bias=False)
    s.linear("single_stream_modulation.lin", 3 * h, h, bias=False)
    for i in range(c["depth"]):
        _double_block(s, f"double_blocks.{i}", c, mod=False, flux2=True, norm_key="scale")
    for i in range(c["single"]):
        _single_block(s, f"single_blocks.{i}", c, mod=False, flux2=True, norm_key="scale")
    s.linear("final_layer.linear", c["in_channels"], h, bias=False)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h, bias=False)
    return s.items


def chroma(c: dict[str, Any]) -> list[TensorSpec]:
    """Chroma (``comfy/ldm/chroma``): no per-block modulation, one distilled guidance approximator."""
    s, h, ah = SpecList(), c["hidden"], c["approx_hidden"]
    s.linear("img_in", h, c["in_channels"])
    s.linear("txt_in", h, c["context"])
    s.linear("distilled_guidance_layer.in_proj", ah, 64)
    for i in range(c["approx_layers"]):
        s.mlp_embedder(f"distilled_guidance_layer.layers.{i}", ah, ah)
        s.norm(f"distilled_guidance_layer.norms.{i}", ah, key="scale")
    s.linear("distilled_guidance_layer.out_proj", h, ah)
    for i in range(c["depth"]):
        _double_block(s, f"double_blocks.{i}", c, mod=False, flux2=False, norm_key="scale")
    for i in range(c["single"]):
        _single_block(s, f"single_blocks.{i}", c, mod=False, flux2=False, norm_key="scale")
    s.linear("final_layer.linear", c["in_channels"], h)
    return s.items


def hunyuan(c: dict[str, Any]) -> list[TensorSpec]:
    """HunyuanVideo (``comfy/ldm/hunyuan_video/model.py``): Conv3d patch embed, token-refiner text input."""
    s, h, ctx = SpecList(), c["hidden"], c["context"]
    s.t("img_in.proj.weight", h, c["in_channels"], 1, 2, 2)
    s.t("img_in.proj.bias", h)
    s.mlp_embedder("time_in", 256, h)
    s.mlp_embedder("vector_in", c["vec_in"], h)
    s.mlp_embedder("guidance_in", 256, h)
    s.linear("txt_in.input_embedder", h, ctx)
    s.mlp_embedder("txt_in.t_embedder", 256, h)
    s.mlp_embedder("txt_in.c_embedder", ctx, h)
    for i in range(2):
        p = f"txt_in.individual_token_refiner.blocks.{i}"
        s.norm(f"{p}.norm1", h, bias=True)
        s.linear(f"{p}.self_attn.qkv", 3 * h, h)
        s.linear(f"{p}.self_attn.proj", h, h)
        s.norm(f"{p}.norm2", h, bias=True)
        s.linear(f"{p}.mlp.0", 4 * h, h)
        s.linear(f"{p}.mlp.2", h, 4 * h)
        s.linear(f"{p}.adaLN_modulation.1", 2 * h, h)
    for i in range(c["depth"]):
        _double_block(s, f"double_blocks.{i}", c, mod=True, flux2=False, norm_key="weight")
    for i in range(c["single"]):
        _single_block(s, f"single_blocks.{i}", c, mod=True, flux2=False, norm_key="weight")
    s.linear("final_layer.linear", c["in_channels"] * 4, h)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return s.items


def wan(c: dict[str, Any]) -> list[TensorSpec]:
    """Wan 2.1 t2v (``comfy/ldm/wan/model.py``): Conv3d patch embedding, 6-way modulation tables, head."""
    s, d, f = SpecList(), c["dim"], c["ffn"]
    s.t("patch_embedding.weight", d, c["in_dim"], 1, 2, 2)
    s.t("patch_embedding.bias", d)
    s.linear("text_embedding.0", d, c["text_dim"])
    s.linear("text_embedding.2", d, d)
    s.linear("time_embedding.0", d, c["freq_dim"])
    s.linear("time_embedding.2", d, d)
    s.linear("time_projection.1", 6 * d, d)
    for i in range(c["layers"]):
        p = f"blocks.{i}"
        for att in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                s.linear(f"{p}.{att}.{proj}", d, d)
            s.norm(f"{p}.{att}.norm_q", d)
            s.norm(f"{p}.{att}.norm_k", d)
        s.norm(f"{p}.norm3", d, bias=True)
        s.linear(f"{p}.ffn.0", f, d)
        s.linear(f"{p}.ffn.2", d, f)
        s.t(f"{p}.modulation", 1, 6, d)
    s.linear("head.head", c["out_dim"] * 4, d)
    s.t("head.modulation", 1, 2, d)
    return s.items


def ltxv(c: dict[str, Any]) -> list[TensorSpec]:
    """LTX-Video (``comfy/ldm/lightricks/model.py``): AdaLayerNormSingle, scale-shift tables."""
    s, d, x = SpecList(), c["inner"], c["cross"]
    s.linear("patchify_proj", d, c["in_channels"])
    s.linear("adaln_single.emb.timestep_embedder.linear_1", d, 256)
    s.linear("adaln_single.emb.timestep_embedder.linear_2", d, d)
    s.linear("adaln_single.linear", 6 * d, d)
    s.linear("caption_projection.linear_1", d, c["caption"])
    s.linear("caption_projection.linear_2", d, d)
    for i in range(c["layers"]):
        p = f"transformer_blocks.{i}"
        for att, kv in (("attn1", d), ("attn2", x)):
            s.linear(f"{p}.{att}.to_q", d, d)
            s.linear(f"{p}.{att}.to_k", d, kv)
            s.linear(f"{p}.{att}.to_v", d, kv)
            s.norm(f"{p}.{att}.q_norm", d)
            s.norm(f"{p}.{att}.k_norm", d)
            s.linear(f"{p}.{att}.to_out.0", d, d)
        s.linear(f"{p}.ff.net.0.proj", 4 * d, d)
        s.linear(f"{p}.ff.net.2", d, 4 * d)
        s.t(f"{p}.scale_shift_table", 6, d)
    s.t("scale_shift_table", 2, d)
    s.linear("proj_out", c["in_channels"], d)
    return s.items


def qwen_image(c: dict[str, Any]) -> list[TensorSpec]:
    """Qwen-Image (``comfy/ldm/qwen_image/model.py``): dual-stream blocks with img_mod/txt_mod."""
    s, d, hd = SpecList(), c["inner"], 128
    s.linear("time_text_embed.timestep_embedder.linear_1", d, 256)
    s.linear("time_text_embed.timestep_embedder.linear_2", d, d)
    s.norm("txt_norm", c["joint"])
    s.linear("img_in", d, c["in_channels"])
    s.linear("txt_in", d, c["joint"])
    for i in range(c["layers"]):
        p = f"transformer_blocks.{i}"
        for st in ("img", "txt"):
            s.linear(f"{p}.{st}_mod.1", 6 * d, d)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            s.linear(f"{p}.attn.{proj}", d, d)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s.norm(f"{p}.attn.{n}", hd)
        for st in ("img", "txt"):
            s.linear(f"{p}.{st}_mlp.net.0.proj", 4 * d, d)
            s.linear(f"{p}.{st}_mlp.net.2", d, 4 * d)
    s.linear("norm_out.linear", 2 * d, d)
    s.linear("proj_out", c["in_channels"], d)
    return s.items


def _nextdit_block(s: SpecList, p: str, d: int, ffn: int, *, modulation: bool) -> None:
    s.linear(f"{p}.attention.qkv", 3 * d, d, bias=False)
    s.linear(f"{p}.attention.out", d, d, bias=False)
    s.norm(f"{p}.attention.q_norm", 128)
    s.norm(f"{p}.attention.k_norm", 128)
    s.linear(f"{p}.feed_forward.w1", ffn, d, bias=False)
    s.linear(f"{p}.feed_forward.w2", d, ffn, bias=False)
    s.linear(f"{p}.feed_forward.w3", ffn, d, bias=False)
    for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        s.norm(f"{p}.{n}", d)
    if modulation:
        s.linear(f"{p}.adaLN_modulation.0", 4 * d, 256)


def zimage(c: dict[str, Any]) -> list[TensorSpec]:
    """Z-Image (NextDiT in ``comfy/ldm/lumina/model.py`` with z_image_modulation)."""
    s, d, ffn = SpecList(), c["dim"], c["ffn"]
    s.linear("x_embedder", d, 64)
    for i in range(c["refiners"]):
        _nextdit_block(s, f"noise_refiner.{i}", d, ffn, modulation=True)
    for i in range(c["refiners"]):
        _nextdit_block(s, f"context_refiner.{i}", d, ffn, modulation=False)
    s.linear("t_embedder.mlp.0", 1024, 256)
    s.linear("t_embedder.mlp.2", 256, 1024)
    s.norm("cap_embedder.0", c["cap_feat"])
    s.linear("cap_embedder.1", d, c["cap_feat"])
    for i in range(c["layers"]):
        _nextdit_block(s, f"layers.{i}", d, ffn, modulation=True)
    s.linear("final_layer.linear", 64, d)
    s.linear("final_layer.adaLN_modulation.1", d, 256)
    s.t("x_pad_token", 1, d)
    s.t("cap_pad_token", 1, d)
    return s.items


def sd3(c: dict[str, Any]) -> list[TensorSpec]:
    """SD3 medium (``comfy/ldm/modules/diffusionmodules/mmdit.py``); the last context block is pre-only."""
    s, h, depth = SpecList(), c["hidden"], c["depth"]
    s.t("pos_embed", 1, c["pos"], h)
    s.t("x_embedder.proj.weight", h, 16, 2, 2)
    s.t("x_embedder.proj.bias", h)
    s.linear("t_embedder.mlp.0", h, 256)
    s.linear("t_embedder.mlp.2", h, h)
    s.linear("y_embedder.mlp.0", h, c["adm"])
    s.linear("y_embedder.mlp.2", h, h)
    s.linear("context_embedder", h, c["context"])
    for i in range(depth):
        for blk in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{blk}"
            pre_only = blk == "context_block" and i == depth - 1
            s.linear(f"{p}.attn.qkv", 3 * h, h)
            if not pre_only:
                s.linear(f"{p}.attn.proj", h, h)
                s.linear(f"{p}.mlp.fc1", 4 * h, h)
                s.linear(f"{p}.mlp.fc2", h, 4 * h)
            s.linear(f"{p}.adaLN_modulation.1", (2 if pre_only else 6) * h, h)
    s.linear("final_layer.linear", 64, h)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return s.items
