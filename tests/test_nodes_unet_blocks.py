"""SD1.x / SDXL transformer blocks' LayerNorms folded into the quantized layers they feed (``nodes.unet_blocks``),
in ComfyUI 0.30's own ``BasicTransformerBlock`` on the CPU: the folded clone computes what the unfolded one does,
also for calls whose patches read the normed activation (the block unfolds for them) and for attention
replacement patches; blocks whose norms feed anything else are left alone, and the model itself stays stock."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from comfyui_fixtures import patched
from comfyui_server_fixtures import rel_err
from torch import nn

from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions
from comfyquant.nodes.unet_blocks import UnfoldingForward
from comfyquant.runtime.norms import FoldedNorm

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]

KEY = ("input", 4)
FOLD = RuntimeOptions(fold_layer_norms=True)  # (the affine LayerNorm fold is opt-in)  # the block key ComfyUI's UNet passes in transformer_options["block"]


def _model(context_dim: int | None = 96, **block: Any) -> nn.Module:
    attention = importlib.import_module("comfy.ldm.modules.attention")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            blocks = [attention.BasicTransformerBlock(64, 4, 16, context_dim=context_dim, gated_ff=True, operations=nn,
                                                      **block) for _ in range(2)]
            self.diffusion_model = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})
            g = torch.Generator().manual_seed(4)
            for m in self.modules():  # norms away from 1 / 0, so a fold that drops them is seen
                if isinstance(m, nn.LayerNorm):
                    m.weight.data = torch.rand(64, generator=g) * 1.5 + 0.25
                    m.bias.data = torch.randn(64, generator=g) * 0.2

    return Model()


def _run(model: nn.Module, patcher: Any, context: torch.Tensor | None, options: dict) -> torch.Tensor:
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    with patched(patcher), torch.inference_mode():
        for i, block in enumerate(model.diffusion_model["blocks"]):
            x = block(x, context=context, transformer_options={**options, "block_index": i})
    return x


def _adapted(model: nn.Module) -> tuple[Any, Any, Any]:
    import comfy.model_patcher

    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, _ = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fold_norms=False)),
                           cache=QuantCache())
    folded, report = adapt_model(base, AdapterSettings(format="int8", runtime=FOLD), cache=QuantCache())
    return plain, folded, report


def test_sdxl_blocks_fold_their_three_norms_and_compute_the_stock_blocks(comfy: Any) -> None:
    model = _model()
    ctx = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(6))
    import comfy.model_patcher

    float_out = _run(model, comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")),
                     ctx, {})
    plain, folded, report = _adapted(model)
    assert [f for f in report.folded if "->" in f] == [
        f"blocks.{i}.{n}" for i in range(2)
        for n in ("norm1 -> attn1.to_q,attn1.to_k,attn1.to_v", "norm2 -> attn2.to_q", "norm3 -> ff.net.0.proj")]
    patches = folded.object_patches
    holder = patches["diffusion_model.blocks.0.norm1"]
    assert isinstance(holder, FoldedNorm) and holder.layer
    assert isinstance(patches["diffusion_model.blocks.0.forward"], UnfoldingForward)
    q, k = patches["diffusion_model.blocks.0.attn1.to_q"], patches["diffusion_model.blocks.0.attn1.to_k"]
    assert q.input_norm is k.input_norm and q.input_norm.holder is holder
    assert patches["diffusion_model.blocks.0.attn2.to_k"].input_norm is None  # reads the text context
    want, got = _run(model, plain, ctx, {}), _run(model, folded, ctx, {})
    assert rel_err(got, want) < 1e-5 and 0 < rel_err(got, float_out) < 0.05
    block = model.diffusion_model["blocks"][0]  # unpatched: the model's own block again (ComfyUI restores the
    # forward it read, a bound method of the class's)
    assert type(block.norm1) is nn.LayerNorm and not isinstance(block.__dict__.get("forward"), UnfoldingForward)
    assert torch.equal(_run(model, comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")),
                            ctx, {}), float_out)


def test_calls_whose_patches_read_the_normed_activation_unfold(comfy: Any) -> None:
    """``attn1_patch`` / ``attn2_patch`` get the normed activation, and attn2 without a context reads it in
    to_k / to_v: the block computes its norms in torch for those calls (the layers apply none). An attention
    replacement gets q / k / v from the layers: the norms stay folded."""
    attention = importlib.import_module("comfy.ldm.modules.attention")
    model = _model()
    plain, folded, _ = _adapted(model)
    ctx = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(6))

    def attn1_patch(n: torch.Tensor, context: Any, value: Any, extra: dict) -> tuple:
        return n * 0.5 + n.mean(), context, value

    def attn2_patch(n: torch.Tensor, context: Any, value: Any, extra: dict) -> tuple:
        return n.flip(-1), context, value

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        return attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    cases = {"attn1_patch": (ctx, {"patches": {"attn1_patch": [attn1_patch]}}),
             "attn2_patch": (ctx, {"patches": {"attn2_patch": [attn2_patch]}}),
             "attn2 replace": (ctx, {"block": KEY, "patches_replace": {"attn2": {(*KEY, 0): replace,
                                                                                  (*KEY, 1): replace}}})}
    stock = _run(model, plain, ctx, {})
    for name, (context, options) in cases.items():
        want, got = _run(model, plain, context, options), _run(model, folded, context, options)
        assert rel_err(got, want) < 1e-5 and rel_err(want, stock) > 1e-3, name
    holders = [v for v in folded.object_patches.values() if isinstance(v, FoldedNorm)]
    assert holders and all(h.unfolded == 0 for h in holders)  # restored after each call
    # a block whose cross-attention reads x itself when it gets no context (its context width is x's)
    own = _model(context_dim=None)
    plain, folded, _ = _adapted(own)
    x_ctx = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    for context in (None, x_ctx):
        assert rel_err(_run(own, folded, context, {}), _run(own, plain, context, {})) < 1e-5


@pytest.mark.parametrize("block", [{"disable_self_attn": True}, {"inner_dim": 64, "ff_in": True}])
def test_blocks_whose_norms_feed_other_inputs_are_not_folded(comfy: Any, block: dict) -> None:
    """With ``disable_self_attn`` attn1's k / v read the context; with an input feed-forward the block has a
    fourth norm and another residual: such blocks keep their norms, and compute what they did."""
    model = _model(**block)
    plain, folded, report = _adapted(model)
    assert not [f for f in report.folded if "->" in f]
    assert not any(isinstance(v, FoldedNorm | UnfoldingForward) for v in folded.object_patches.values())
    ctx = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(6))
    assert rel_err(_run(model, folded, ctx, {}), _run(model, plain, ctx, {})) < 1e-6


def test_sdxl_unet_folds_on_the_adapters_clone_and_in_the_loaders_model(comfy: Any, tmp_path: Any) -> None:
    """ComfyUI's own SDXL ``UNetModel`` (a tiny synthetic UNet; ComfyUI's detection matches only SDXL's real
    sizes, so the model is built from its detected config): the adapter folds every transformer block's three
    norms on its clone with the unfolded clone's output; the loader's in-place fold (its own model, as "Load
    Quantized Diffusion Model" quantized it) computes what its model did before."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    from comfyquant.nodes.loader import _fold_unet_in_place
    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.testing.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", "tiny", seed=2)
    sd = load_file(str(tmp_path / "sdxl.safetensors"))

    def build() -> Any:
        built = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(sd, "")).get_model(sd)
        built.diffusion_model.load_state_dict(sd, strict=True)
        return built

    model = build()
    dm = model.diffusion_model
    blocks = [m for m in dm.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert type(dm).__name__ == "UNetModel" and len(blocks) >= 3
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 256, generator=g))
    y = torch.randn(1, dm.label_emb[0][0].in_features, generator=g)

    def forward(patcher: Any) -> torch.Tensor:
        comfy.model_management.load_models_gpu([patcher])
        with torch.inference_mode():
            return patcher.model.diffusion_model(*inputs, y=y)

    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    float_out = forward(base)
    plain, _ = adapt_model(base, AdapterSettings(format="int8", model_type="sdxl",
                                                 runtime=RuntimeOptions(fold_norms=False)), cache=QuantCache())
    folded, report = adapt_model(base, AdapterSettings(format="int8", model_type="sdxl", runtime=FOLD),
                                 cache=QuantCache())
    norms = [f for f in report.folded if "->" in f]
    assert len(norms) == 3 * len(blocks), norms
    want = forward(plain)
    assert rel_err(forward(folded), want) < 1e-5 and 0 < rel_err(want, float_out) < 0.05
    # the loader's path: its model's layers quantized in place, then the norms folded in place
    own = build()
    summary = quantize_(own.diffusion_model, QuantizeConfig(format="int8", min_features=1, fold_norms=False))
    mine = comfy.model_patcher.ModelPatcher(own, torch.device("cpu"), torch.device("cpu"))
    before = forward(mine)
    lines = _fold_unet_in_place(own.diffusion_model, {d.name: "int8" for d in summary.quantized})
    assert len(lines) == 3 * len(blocks), lines
    assert sum(isinstance(m, FoldedNorm) for m in own.modules()) == len(lines)
    assert rel_err(forward(mine), before) < 1e-5


def test_dynamic_loras_on_folded_layers_read_the_normed_activation(comfy: Any) -> None:
    """A dynamic LoRA's side path on a member of the fused q / k / v group and on the feed-forward's projection
    reads the normed activation (the norm then runs in torch for that GEMM): the folded clone gives what the
    unfolded one gives with the same LoRAs, and the LoRAs change the output."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry

    model = _model()
    plain, folded, _ = _adapted(model)
    ctx = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(6))
    before = _run(model, plain, ctx, {})
    g = torch.Generator().manual_seed(9)
    loras = {}
    for name, (n, k) in {"attn1.to_k": (64, 64), "ff.net.0.proj": (512, 64)}.items():
        side = LoRASidePath()
        side.add(1, SideEntry(down=torch.randn(8, k, generator=g) * 0.3, up=torch.randn(n, 8, generator=g) * 0.3))
        loras[name] = side
    for patcher in (plain, folded):
        for i in range(2):
            for name, side in loras.items():
                patcher.object_patches[f"diffusion_model.blocks.{i}.{name}"].adapter = side
    want, got = _run(model, plain, ctx, {}), _run(model, folded, ctx, {})
    assert rel_err(got, want) < 1e-5 and rel_err(want, before) > 1e-2


def test_the_layer_norm_fold_can_be_turned_off(comfy: Any) -> None:
    """``RuntimeOptions(fold_layer_norms=False)`` leaves the blocks' LayerNorms and forwards stock (the RMSNorm and
    modulated folds stay with ``fold_norms``)."""
    import comfy.model_patcher

    model = _model()
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    settings = AdapterSettings(format="int8", runtime=RuntimeOptions(fold_layer_norms=False))
    patched, report = adapt_model(base, settings, cache=QuantCache())
    assert report.converted and not [f for f in report.folded if "->" in f]
    assert not any(isinstance(v, FoldedNorm | UnfoldingForward) for v in patched.object_patches.values())
    _, folded, _ = _adapted(model)  # the default folds them
    assert any(isinstance(v, FoldedNorm) for v in folded.object_patches.values())


def test_norm_weights_patched_in_place_reach_the_folded_layers(comfy: Any) -> None:
    """A weight patch on a folded LayerNorm's weight written in place (ModelPatcher ``weight_inplace_update``:
    ``copy_to_param`` on ComfyUI's inference-mode weights, which have no version counter) is what the folded
    layers apply, and the restore after it too: the folded clone computes what the unfolded one does with the
    same patch, before, during and after it."""
    with torch.inference_mode():  # ComfyUI builds and loads models inside a node's execution: inference tensors
        model = _model()
    assert model.diffusion_model["blocks"][0].norm1.weight.is_inference()
    plain, folded, _ = _adapted(model)
    ctx = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(6))
    before = _run(model, folded, ctx, {})  # derives the folded rows from the unpatched weights
    key = "diffusion_model.blocks.0.norm1.weight"
    delta = torch.linspace(-0.8, 0.8, 64)
    outs = []
    for patcher in (plain, folded):
        c = patcher.clone()
        c.weight_inplace_update = True
        assert c.add_patches({key: (delta,)}, 1.0) == [key]
        outs.append(_run(model, c, ctx, {}))
    assert rel_err(outs[1], outs[0]) < 1e-5 and rel_err(outs[1], before) > 1e-2
    assert torch.equal(_run(model, folded, ctx, {}), before)  # restored in place: the rows follow
