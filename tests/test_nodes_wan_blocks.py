"""Wan 2.x's and Qwen-Image's modulated LayerNorms handed to the quantized layers they feed (``nodes.wan_blocks``),
in ComfyUI 0.30's own ``WanModel`` and ``QwenImageTransformer2DModel`` on the CPU: the folded clone computes what
the clone without the fold computes, the norm reaches the fused q / k / v group and the MLPs' first linears (the
normed activation is never made), and calls the fold does not reproduce (per-frame modulation, reference images
at timestep zero) run the stock block."""

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
from comfyquant.nodes.wan_blocks import FoldedQwenBlock, FoldedWanBlock

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]


class _Holder(nn.Module):
    def __init__(self, dm: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = dm
        g = torch.Generator().manual_seed(7)
        for name, p in self.named_parameters():  # modulations are torch.empty in ComfyUI; norms away from 1 / 0
            if p.dim() >= 2:
                p.data = torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
            elif name.endswith("weight"):
                p.data = 1 + 0.3 * torch.randn(p.shape, generator=g)
            else:
                p.data = 0.2 * torch.randn(p.shape, generator=g)


def _wan() -> nn.Module:
    wan = importlib.import_module("comfy.ldm.wan.model")
    return _Holder(wan.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=64, ffn_dim=128,
                                freq_dim=32, text_dim=48, out_dim=4, num_heads=2, num_layers=2, operations=nn))


def _qwen() -> nn.Module:
    qwen = importlib.import_module("comfy.ldm.qwen_image.model")
    return _Holder(qwen.QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=2,
                                                    attention_head_dim=32, num_attention_heads=2,
                                                    joint_attention_dim=48, axes_dims_rope=(8, 12, 12),
                                                    operations=nn))


def _run(model: nn.Module, patcher: Any, **kw: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    dm = model.diffusion_model
    options = dict(patcher.model_options.get("transformer_options", {}))
    with patched(patcher), torch.inference_mode():
        if type(dm).__name__ == "WanModel":
            x, ctx = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 16, 48, generator=g)
            t = kw.pop("t", torch.tensor([300.0, 700.0]))
            return dm(x, t, ctx, transformer_options=options, **kw).clone()
        x, ctx = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 6, 48, generator=g)
        return dm(x, torch.tensor([0.3, 0.7]), ctx, transformer_options=options, **kw).clone()


def _adapted(model: nn.Module, fmt: str = "int8", fuse_rope: bool = True) -> tuple[Any, Any, Any, Any]:
    import comfy.model_patcher

    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, _ = adapt_model(base, AdapterSettings(format=fmt, runtime=RuntimeOptions(fold_norms=False)),
                           cache=QuantCache())
    folded, report = adapt_model(base, AdapterSettings(format=fmt, runtime=RuntimeOptions(fuse_rope=fuse_rope)),
                                 cache=QuantCache())
    return base, plain, folded, report


def _forwards(patcher: Any) -> dict[str, Any]:
    return {k: v for k, v in patcher.object_patches.items() if isinstance(v, FoldedWanBlock | FoldedQwenBlock)}


def _spied(model: nn.Module, patcher: Any, paths: list[str], run: Any) -> tuple[Any, dict[str, list]]:
    """``run()``'s result and each layer's ``call_norm`` at each of its calls (forward pre-hooks on the clone's
    layers, read while it is patched; removed afterwards)."""
    seen: dict[str, list] = {}

    def hook(path: str) -> Any:
        return lambda mod, args: seen.setdefault(path, []).append(mod.__dict__.get("call_norm"))

    with patched(patcher):
        dm = model.diffusion_model
        hooks = [dm.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    try:
        return run(), seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_wan_blocks_hand_both_norms_to_their_layers(comfy: Any, fmt: str) -> None:
    model = _wan()
    base, plain, folded, report = _adapted(model, fmt)
    assert report.modulated == ["blocks.0: norm1, norm2", "blocks.1: norm1, norm2"]
    assert sorted(_forwards(folded)) == ["diffusion_model.blocks.0.forward", "diffusion_model.blocks.1.forward"]
    assert not _forwards(plain)
    ref, want = _run(model, base), _run(model, plain)
    got, seen = _spied(model, folded, ["blocks.0.self_attn.q", "blocks.0.self_attn.v", "blocks.0.ffn.0",
                                       "blocks.0.cross_attn.q", "blocks.0.self_attn.o"], lambda: _run(model, folded))
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert rel_err(want, ref) < 0.05  # (the quantization's own error, against float)
    # the norm reached q / k / v (one shared ModulatedNorm per call, per item) and the MLP, and nothing else
    q, v, ffn = seen["blocks.0.self_attn.q"], seen["blocks.0.self_attn.v"], seen["blocks.0.ffn.0"]
    assert q and all(n is not None and n.rows == 32 for n in q + ffn) and [id(n) for n in v] == [id(n) for n in q]
    assert all(n is None for n in seen["blocks.0.cross_attn.q"] + seen["blocks.0.self_attn.o"])
    # q / k / v run as one GEMM with the norm in it once the group has learned its plan (the first call)
    with patched(folded):
        group = model.diffusion_model.blocks[0].self_attn.q.sibling[0]
    assert group.fused_calls == 0
    again = _run(model, folded)
    assert group.fused_calls == 1 and rel_err(again, want) < 1e-5, (group, rel_err(again, want))
    for f in _forwards(folded).values():
        assert all(s._buf is not None and tuple(s._buf.shape) == (2, 128) for s in f.sites)


def test_wan_per_frame_modulation_runs_the_stock_block(comfy: Any) -> None:
    """Timesteps per frame (Wan 2.2's TI2V) give a modulation per frame, repeated over its tokens: the folded
    forward hands the call to the block's own forward, bit for bit the unfolded clone's output."""
    model = _wan()
    _, plain, folded, _ = _adapted(model)
    t = torch.tensor([[300.0, 500.0], [700.0, 100.0]])
    assert torch.equal(_run(model, folded, t=t.clone()), _run(model, plain, t=t.clone()))
    assert all(s._buf is None for f in _forwards(folded).values() for s in f.sites)


def test_qwen_image_blocks_hand_four_norms_to_their_layers(comfy: Any) -> None:
    model = _qwen()
    base, plain, folded, report = _adapted(model)
    names = "img_norm1, img_norm2, txt_norm1, txt_norm2"
    assert report.modulated == [f"transformer_blocks.{i}: {names}" for i in range(2)]
    ref, want = _run(model, base), _run(model, plain)
    paths = ["transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
             "transformer_blocks.1.img_mlp.net.0.proj", "transformer_blocks.1.txt_mlp.net.0.proj",
             "transformer_blocks.1.attn.to_out.0"]
    got, seen = _spied(model, folded, paths, lambda: _run(model, folded))
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert rel_err(want, ref) < 0.05
    img_q, txt_v = seen[paths[0]], seen[paths[1]]
    assert img_q and txt_v and img_q[0] is not txt_v[0]  # each stream its own norm
    assert [n.rows for n in img_q + seen[paths[2]]] == [16, 16] and [n.rows for n in txt_v + seen[paths[3]]] == [6, 6]
    assert seen[paths[4]] == [None]
    for f in _forwards(folded).values():
        assert all(s._buf is not None for s in f.sites.values())


def test_qwen_image_reference_at_timestep_zero_runs_the_stock_block(comfy: Any) -> None:
    """``index_timestep_zero`` reference images give the reference tokens their own modulation: the stock
    block computes that call."""
    model = _qwen()
    _, plain, folded, _ = _adapted(model)
    ref = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    kw = {"ref_latents": [ref], "ref_latents_method": "index_timestep_zero"}
    assert torch.equal(_run(model, folded, **kw), _run(model, plain, **kw))
    assert all(s._buf is None for f in _forwards(folded).values() for s in f.sites.values())


def test_the_loader_folds_a_wan_file_it_loads(comfy: Any, tmp_path: Any) -> None:
    """"Load Quantized Diffusion Model" on a converted Wan file (a tiny WanModel at Wan's head size, which
    ComfyUI's detection needs): its own model's blocks get the folded forward in place, which computes what the
    same file loaded without the fold computes."""
    import comfy.model_management
    from safetensors.torch import save_file

    from comfyquant.convert.api import convert
    from comfyquant.nodes.loader import load_quantized_model

    wan = importlib.import_module("comfy.ldm.wan.model")
    holder = _Holder(wan.WanModel(model_type="t2v", in_dim=16, dim=256, ffn_dim=512, freq_dim=256, out_dim=16,
                                  num_heads=2, num_layers=2, operations=nn))
    src, dst = tmp_path / "wan.safetensors", tmp_path / "wan_int8.safetensors"
    save_file({k: v.contiguous() for k, v in holder.diffusion_model.state_dict().items()}, str(src))
    convert(src, dst, format="int8", model="wan", device="cpu", force=True, progress=False)
    outs = []
    for fold in (True, False):
        patcher, summary = load_quantized_model(dst, RuntimeOptions(fold_norms=fold))
        dm = patcher.model.diffusion_model
        assert type(dm).__name__ == "WanModel" and summary.modulated == (2 if fold else 0)
        assert [isinstance(b.__dict__.get("forward"), FoldedWanBlock) for b in dm.blocks] == [fold, fold]
        comfy.model_management.load_models_gpu([patcher])
        g = torch.Generator().manual_seed(3)
        x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 12, 4096, generator=g)
        with torch.inference_mode():
            outs.append(dm(x.to(dm.dtype), torch.tensor([400.0]), ctx.to(dm.dtype)).float())
    assert rel_err(outs[0], outs[1]) < 1e-6, rel_err(outs[0], outs[1])  # (on the CPU: the same torch ops)


def _zimage() -> nn.Module:
    lumina = importlib.import_module("comfy.ldm.lumina.model")
    ops = importlib.import_module("comfy.ops").disable_weight_init  # (its blocks call ComfyUI's RMSNorm; _Holder inits)
    # (256 wide: Z-Image's timestep embedding is min(dim, 256) wide, its adaLN input 256 wide)
    return _Holder(lumina.NextDiT(patch_size=2, in_channels=4, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2,
                                  n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.0, qk_norm=True, cap_feat_dim=48,
                                  axes_dims=(32, 48, 48), axes_lens=(16, 64, 64), z_image_modulation=True,
                                  operations=ops))


def test_zimage_blocks_hand_their_modulated_rms_norms_to_their_layers(comfy: Any) -> None:
    """Z-Image's NextDiT (``z_image_modulation``): every modulated block (the noise refiner's and the main layers,
    which read the 6 text tokens and 16 image tokens joined;
    the context refiner has no modulation) gets the folded forward; ``qkv`` and ``w1`` / ``w3`` read one
    modulated RMSNorm per item, and the clone computes what the unfolded clone computes."""
    from comfyquant.nodes.lumina_blocks import FoldedLuminaBlock

    model = _zimage()
    base, plain, folded, report = _adapted(model)
    names = "attention_norm1, ffn_norm1"
    assert report.modulated == [f"noise_refiner.0: {names}", f"layers.0: {names}", f"layers.1: {names}"]
    assert sum(isinstance(v, FoldedLuminaBlock) for v in folded.object_patches.values()) == 3
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 48, generator=g)

    def run(patcher: Any) -> torch.Tensor:
        with patched(patcher), torch.inference_mode():
            return model.diffusion_model(x, torch.tensor([0.3, 0.7]), ctx, 6,
                                         transformer_options=dict(patcher.model_options.get("transformer_options",
                                                                                             {}))).clone()

    ref, want = run(base), run(plain)
    paths = ["layers.1.attention.qkv", "layers.1.feed_forward.w1", "layers.1.feed_forward.w3",
             "layers.1.feed_forward.w2", "layers.1.attention.out"]
    got, seen = _spied(model, folded, paths, lambda: run(folded))
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert 0 < rel_err(want, ref) < 0.05
    qkv, w1, w3 = (seen[p] for p in paths[:3])
    assert qkv[0].rms and qkv[0].rows == 6 + 16 and w1[0] is w3[0] and w1[0] is not qkv[0] and w1[0].rms
    assert seen[paths[3]] == [None] and seen[paths[4]] == [None]


def test_zimage_norm_weights_patched_in_place_reach_the_folded_sites(comfy: Any) -> None:
    """A patch on a modulated RMSNorm's weight written in place (``weight_inplace_update`` on inference-mode
    weights, no version counter) and its restore reach the site's kept copy of the weight: the folded clone
    computes what the unfolded one does with the same patch, and after it what it did before."""
    with torch.inference_mode():
        model = _zimage()
    _, plain, folded, _ = _adapted(model)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 48, generator=g)

    def run(patcher: Any) -> torch.Tensor:
        with patched(patcher), torch.inference_mode():
            return model.diffusion_model(x, torch.tensor([0.3, 0.7]), ctx, 6, transformer_options={}).clone()

    before = run(folded)
    key = "diffusion_model.layers.1.ffn_norm1.weight"
    outs = []
    for patcher in (plain, folded):
        c = patcher.clone()
        c.weight_inplace_update = True
        assert c.add_patches({key: (torch.linspace(-0.6, 0.6, 256),)}, 1.0) == [key]
        outs.append(run(c))
    assert rel_err(outs[1], outs[0]) < 1e-5 and rel_err(outs[1], before) > 1e-3
    assert torch.equal(run(folded), before)


def _ltx() -> nn.Module:
    ltx = importlib.import_module("comfy.ldm.lightricks.model")
    ops = importlib.import_module("comfy.ops").disable_weight_init  # (its attention norms are ComfyUI's RMSNorm)
    return _Holder(ltx.LTXVModel(in_channels=8, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2,
                                 caption_channels=48, num_layers=2, operations=ops))


def _run_ltx(model: nn.Module, patcher: Any, t: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 8, 2, 4, 4, generator=g), torch.randn(2, 6, 48, generator=g)  # 32 tokens an item
    with patched(patcher), torch.inference_mode():
        return model.diffusion_model(x, torch.tensor([0.3, 0.7]) if t is None else t, ctx, None,
                                     transformer_options={}).clone()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ltx_blocks_hand_both_modulated_rms_norms_to_their_layers(comfy: Any, fmt: str) -> None:
    """LTX-Video's blocks (``comfy.ldm.lightricks``): ``rms_norm(x) * (1 + scale) + shift`` reaches attn1's fused
    q / k / v and the feed-forward's projection as one modulated RMSNorm per item (the normed activation is
    never made), and the clone computes what the unfolded clone computes."""
    from comfyquant.nodes.ltx_blocks import FoldedLtxBlock

    model = _ltx()
    base, plain, folded, report = _adapted(model, fmt)
    names = "attn1's norm, ff's norm"
    assert report.modulated == [f"transformer_blocks.{i}: {names}" for i in range(2)]
    assert sum(isinstance(v, FoldedLtxBlock) for v in folded.object_patches.values()) == 2
    assert not any(isinstance(v, FoldedLtxBlock) for v in plain.object_patches.values())
    ref, want = _run_ltx(model, base), _run_ltx(model, plain)
    paths = [f"transformer_blocks.0.{p}" for p in ("attn1.to_q", "attn1.to_v", "ff.net.0.proj", "attn2.to_q",
                                                   "attn1.to_out.0", "ff.net.2")]
    got, seen = _spied(model, folded, paths, lambda: _run_ltx(model, folded))
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert 0 < rel_err(want, ref) < 0.05
    q, v, proj = (seen[p] for p in paths[:3])
    assert q and all(n is not None and n.rms and n.rows == 32 for n in q + proj)
    assert [id(n) for n in v] == [id(n) for n in q] and proj[0] is not q[0]
    assert all(n is None for p in paths[3:] for n in seen[p])
    with patched(folded):
        group = model.diffusion_model.transformer_blocks[0].attn1.to_q.sibling[0]
    again = _run_ltx(model, folded)  # q / k / v as one GEMM with the norm in it, from the second call
    assert group.fused_calls == 1 and rel_err(again, want) < 1e-5


def test_ltx_timesteps_per_token_run_the_stock_block(comfy: Any) -> None:
    """A timestep per token (image-to-video conditioning) gives each token its own modulation: the folded forward
    hands the call to the block's own forward, bit for bit the unfolded clone's output, its sites unused."""
    from comfyquant.nodes.ltx_blocks import FoldedLtxBlock

    model = _ltx()
    _, plain, folded, _ = _adapted(model)
    t = torch.rand(2, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_run_ltx(model, folded, t), _run_ltx(model, plain, t))
    forwards = [v for v in folded.object_patches.values() if isinstance(v, FoldedLtxBlock)]
    assert forwards and all(s._buf is None for f in forwards for s in f.sites)
