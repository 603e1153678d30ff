"""Key names and shapes of the SDXL UNet, the SD VAE, CLIP, OpenCLIP-G, T5, a Llama-style LLM encoder and a
Flux LoRA, as ComfyUI's model code names them (``openaimodel.py``, ``clip_model.py``, ``t5.py``, ``llama.py``)."""

from __future__ import annotations

from typing import Any

from comfyquant.testing.arch_dit import SpecList, TensorSpec


def _resblock(s: SpecList, p: str, cin: int, cout: int, emb: int) -> None:
    s.norm(f"{p}.in_layers.0", cin, bias=True)
    s.t(f"{p}.in_layers.2.weight", cout, cin, 3, 3)
    s.t(f"{p}.in_layers.2.bias", cout)
    s.linear(f"{p}.emb_layers.1", cout, emb)
    s.norm(f"{p}.out_layers.0", cout, bias=True)
    s.t(f"{p}.out_layers.3.weight", cout, cout, 3, 3)
    s.t(f"{p}.out_layers.3.bias", cout)
    if cin != cout:
        s.t(f"{p}.skip_connection.weight", cout, cin, 1, 1)
        s.t(f"{p}.skip_connection.bias", cout)


def _spatial_transformer(s: SpecList, p: str, ch: int, depth: int, ctx: int) -> None:
    s.norm(f"{p}.norm", ch, bias=True)
    s.linear(f"{p}.proj_in", ch, ch)
    for j in range(depth):
        q = f"{p}.transformer_blocks.{j}"
        for att, kv in (("attn1", ch), ("attn2", ctx)):
            s.linear(f"{q}.{att}.to_q", ch, ch, bias=False)
            s.linear(f"{q}.{att}.to_k", ch, kv, bias=False)
            s.linear(f"{q}.{att}.to_v", ch, kv, bias=False)
            s.linear(f"{q}.{att}.to_out.0", ch, ch)
        s.linear(f"{q}.ff.net.0.proj", 8 * ch, ch)
        s.linear(f"{q}.ff.net.2", ch, 4 * ch)
        for n in ("norm1", "norm2", "norm3"):
            s.norm(f"{q}.{n}", ch, bias=True)
    s.linear(f"{p}.proj_out", ch, ch)


def sdxl(c: dict[str, Any]) -> list[TensorSpec]:
    """SDXL UNet: 3 levels, 2 res blocks each, transformer depth per level, label_emb for size/pooled text."""
    s, mc, mult, depth, ctx = SpecList(), c["channels"], c["mult"], c["depth"], c["context"]
    emb = 4 * mc
    s.linear("time_embed.0", emb, mc)
    s.linear("time_embed.2", emb, emb)
    s.linear("label_emb.0.0", emb, c["adm"])
    s.linear("label_emb.0.2", emb, emb)
    s.t("input_blocks.0.0.weight", mc, 4, 3, 3)
    s.t("input_blocks.0.0.bias", mc)
    skips, ch, idx = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            _resblock(s, f"input_blocks.{idx}.0", ch, m * mc, emb)
            ch = m * mc
            if depth[level]:
                _spatial_transformer(s, f"input_blocks.{idx}.1", ch, depth[level], ctx)
            skips.append(ch)
            idx += 1
        if level != len(mult) - 1:
            s.t(f"input_blocks.{idx}.0.op.weight", ch, ch, 3, 3)
            s.t(f"input_blocks.{idx}.0.op.bias", ch)
            skips.append(ch)
            idx += 1
    _resblock(s, "middle_block.0", ch, ch, emb)
    _spatial_transformer(s, "middle_block.1", ch, c["middle_depth"], ctx)
    _resblock(s, "middle_block.2", ch, ch, emb)
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(3):
            out = mult[level] * mc
            _resblock(s, f"output_blocks.{idx}.0", ch + skips.pop(), out, emb)
            ch, sub = out, 1
            if depth[level]:
                _spatial_transformer(s, f"output_blocks.{idx}.1", ch, depth[level], ctx)
                sub = 2
            if level and i == 2:
                s.t(f"output_blocks.{idx}.{sub}.conv.weight", ch, ch, 3, 3)
                s.t(f"output_blocks.{idx}.{sub}.conv.bias", ch)
            idx += 1
    s.norm("out.0", ch, bias=True)
    s.t("out.2.weight", 4, ch, 3, 3)
    s.t("out.2.bias", 4)
    return s.items


def vae(c: dict[str, Any]) -> list[TensorSpec]:
    """A slice of the SD/Flux VAE: convs plus the mid-block attention, whose q/k/v/proj_out are 2-D in
    checkpoints converted from diffusers (the case a converter could wrongly quantize)."""
    s, ch, z = SpecList(), c["channels"], c["latent"]
    for part, first, last in (("encoder", ("conv_in", ch, 3), ("conv_out", 2 * z, ch)),
                              ("decoder", ("conv_in", ch, z), ("conv_out", 3, ch))):
        s.t(f"{part}.{first[0]}.weight", first[1], first[2], 3, 3)
        s.t(f"{part}.{first[0]}.bias", first[1])
        s.norm(f"{part}.mid.attn_1.norm", ch, bias=True)
        for proj in ("q", "k", "v", "proj_out"):
            s.linear(f"{part}.mid.attn_1.{proj}", ch, ch)
        s.norm(f"{part}.norm_out", ch, bias=True)
        s.t(f"{part}.{last[0]}.weight", last[1], last[2], 3, 3)
        s.t(f"{part}.{last[0]}.bias", last[1])
    return s.items


def clip(c: dict[str, Any]) -> list[TensorSpec]:
    """CLIP text model in ComfyUI/HF layout (``comfy/clip_model.py``)."""
    s, w = SpecList(), c["width"]
    s.t("text_model.embeddings.token_embedding.weight", c["vocab"], w)
    s.t("text_model.embeddings.position_embedding.weight", 77, w)
    for i in range(c["layers"]):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.linear(f"{p}.self_attn.{proj}", w, w)
        s.norm(f"{p}.layer_norm1", w, bias=True)
        s.linear(f"{p}.mlp.fc1", 4 * w, w)
        s.linear(f"{p}.mlp.fc2", w, 4 * w)
        s.norm(f"{p}.layer_norm2", w, bias=True)
    s.norm("text_model.final_layer_norm", w, bias=True)
    s.linear("text_projection", w, w, bias=False)
    return s.items


def open_clip_g(c: dict[str, Any]) -> list[TensorSpec]:
    """OpenCLIP-G as the original SDXL checkpoint stores it (fused ``in_proj_weight``)."""
    s, w = SpecList(), c["width"]
    s.t("token_embedding.weight", c["vocab"], w)
    s.t("positional_embedding", 77, w)
    for i in range(c["layers"]):
        p = f"transformer.resblocks.{i}"
        s.t(f"{p}.attn.in_proj_weight", 3 * w, w)
        s.t(f"{p}.attn.in_proj_bias", 3 * w)
        s.linear(f"{p}.attn.out_proj", w, w)
        s.norm(f"{p}.ln_1", w, bias=True)
        s.linear(f"{p}.mlp.c_fc", 4 * w, w)
        s.linear(f"{p}.mlp.c_proj", w, 4 * w)
        s.norm(f"{p}.ln_2", w, bias=True)
    s.norm("ln_final", w, bias=True)
    s.t("text_projection", w, w)
    return s.items


def _t5_block(s: SpecList, p: str, c: dict[str, Any], *, first: bool, decoder: bool) -> None:
    d, ff = c["d_model"], c["d_ff"]
    for proj in ("q", "k", "v", "o"):
        s.linear(f"{p}.layer.0.SelfAttention.{proj}", d, d, bias=False)
    if first:
        s.t(f"{p}.layer.0.SelfAttention.relative_attention_bias.weight", 32, c["heads"])
    s.norm(f"{p}.layer.0.layer_norm", d)
    ffl = 1
    if decoder:
        for proj in ("q", "k", "v", "o"):
            s.linear(f"{p}.layer.1.EncDecAttention.{proj}", d, d, bias=False)
        s.norm(f"{p}.layer.1.layer_norm", d)
        ffl = 2
    s.linear(f"{p}.layer.{ffl}.DenseReluDense.wi_0", ff, d, bias=False)
    s.linear(f"{p}.layer.{ffl}.DenseReluDense.wi_1", ff, d, bias=False)
    s.linear(f"{p}.layer.{ffl}.DenseReluDense.wo", d, ff, bias=False)
    s.norm(f"{p}.layer.{ffl}.layer_norm", d)


def t5(c: dict[str, Any], with_decoder: bool = False) -> list[TensorSpec]:
    """T5 v1.1 encoder (``comfy/text_encoders/t5.py``) + shared embedding; optionally 2 decoder blocks + LM head."""
    s = SpecList()
    s.t("shared.weight", c["vocab"], c["d_model"])
    for i in range(c["layers"]):
        _t5_block(s, f"encoder.block.{i}", c, first=i == 0, decoder=False)
    s.norm("encoder.final_layer_norm", c["d_model"])
    if with_decoder:
        for i in range(2):
            _t5_block(s, f"decoder.block.{i}", c, first=i == 0, decoder=True)
        s.norm("decoder.final_layer_norm", c["d_model"])
        s.t("lm_head.weight", c["vocab"], c["d_model"])
    return s.items


def llm_te(c: dict[str, Any]) -> list[TensorSpec]:
    """Qwen2.5-VL text encoder (Qwen-Image's) in ComfyUI layout: ``model.layers.N`` + ``visual`` tower."""
    s, h, hd = SpecList(), c["hidden"], 128
    s.t("model.embed_tokens.weight", c["vocab"], h)
    kv = c["kv_heads"] * hd
    for i in range(c["layers"]):
        p = f"model.layers.{i}"
        s.linear(f"{p}.self_attn.q_proj", h, h)
        s.linear(f"{p}.self_attn.k_proj", kv, h)
        s.linear(f"{p}.self_attn.v_proj", kv, h)
        s.linear(f"{p}.self_attn.o_proj", h, h, bias=False)
        s.linear(f"{p}.mlp.gate_proj", c["inter"], h, bias=False)
        s.linear(f"{p}.mlp.up_proj", c["inter"], h, bias=False)
        s.linear(f"{p}.mlp.down_proj", h, c["inter"], bias=False)
        s.norm(f"{p}.input_layernorm", h)
        s.norm(f"{p}.post_attention_layernorm", h)
    s.norm("model.norm", h)
    vh, vi = c["vis_hidden"], c["vis_inter"]
    s.t("visual.patch_embed.proj.weight", vh, 3, 2, 14, 14)
    for i in range(c["vis_layers"]):
        p = f"visual.blocks.{i}"
        s.norm(f"{p}.norm1", vh)
        s.norm(f"{p}.norm2", vh)
        s.linear(f"{p}.attn.qkv", 3 * vh, vh)
        s.linear(f"{p}.attn.proj", vh, vh)
        s.linear(f"{p}.mlp.gate_proj", vi, vh)
        s.linear(f"{p}.mlp.up_proj", vi, vh)
        s.linear(f"{p}.mlp.down_proj", vh, vi)
    s.norm("visual.merger.ln_q", vh)
    s.linear("visual.merger.mlp.0", 4 * vh, 4 * vh)
    s.linear("visual.merger.mlp.2", h, 4 * vh)
    return s.items


def lora(c: dict[str, Any]) -> list[TensorSpec]:
    """A kohya-style Flux LoRA (``lora_down/lora_up/alpha``) with a PEFT-style part (``lora_A/lora_B``) and a
    rank-4 module that must stay unquantized."""
    s, h, r = SpecList(), c["hidden"], c["rank"]
    mlp = 4 * h
    for i in range(c["depth"]):
        for st in ("img", "txt"):
            for mod, out, inp in (("attn_qkv", 3 * h, h), ("attn_proj", h, h), ("mlp_0", mlp, h)):
                p = f"lora_unet_double_blocks_{i}_{st}_{mod}"
                s.t(f"{p}.lora_down.weight", r, inp)
                s.t(f"{p}.lora_up.weight", out, r)
                s.t(f"{p}.alpha")
    for i in range(c["single"]):
        for mod, out, inp in (("linear1", 3 * h + mlp, h), ("linear2", h, h + mlp)):
            p = f"diffusion_model.single_blocks.{i}.{mod}"
            s.t(f"{p}.lora_A.weight", r, inp)
            s.t(f"{p}.lora_B.weight", out, r)
            s.t(f"{p}.dora_scale", out, 1)
    s.t("lora_unet_final_layer_linear.lora_down.weight", 4, h)
    s.t("lora_unet_final_layer_linear.lora_up.weight", 64, 4)
    s.t("lora_unet_final_layer_linear.alpha")
    return s.items
