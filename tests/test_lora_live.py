"""LoRAs on a live quantized model (the digits DiT, Flux layout): ``comfyquant.lora.apply`` / ``remove`` in
dynamic mode (side path) and bake mode (dequantize, add, requantize; stochastic rounding), against float64
references of the same LoRA merged into the float weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lora_fixtures import LoraBuilder
from safetensors.torch import save_file
from torch import nn

import comfyquant.lora as cql
from comfyquant.errors import UserError
from comfyquant.eval.workloads import DigitsWorkload
from comfyquant.formats import dequantize_weight, get_format, quantize_weight
from comfyquant.formats.grids import FP4_E2M1, FP8_E4M3
from comfyquant.lora.keymap import build_keymap
from comfyquant.lora.merge import bind_loras
from comfyquant.lora.rounding import grid_values, stochastic_grid, stochastic_on_table, stochastic_tensors
from comfyquant.runtime import QuantizedTensor, QuantLinear
from comfyquant.runtime.quantize import QuantizeConfig, quantize_

H = 128  # the digits DiT's width

pytestmark = [pytest.mark.cpu_int8, pytest.mark.usefixtures("torch_single_thread")]


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    """(float model, int8 model quantized with the flux preset: modulation layers stay float nn.Linear)."""
    torch.manual_seed(0)
    ref = DigitsWorkload().float_model()
    q = copy.deepcopy(ref)
    quantize_(q, QuantizeConfig(format="int8", model="flux"))
    return ref, q


def _save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def _delta(model: nn.Module, path: Path, strength: float, tensor: str) -> torch.Tensor:
    """The float change the LoRA makes to ``tensor`` of the model's float weights (the merge's own math)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    bound = bind_loras([cql.read_lora(path)], [strength], build_keymap(shapes), "model")
    w = dict(model.named_parameters())[tensor].detach().float()
    return bound(tensor, w.clone()) - w


def _x(n: int = 6, k: int = H, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, n, k, generator=torch.Generator().manual_seed(seed))


def test_dynamic_side_path_adds_exactly_the_lora_product(models: tuple, tmp_path: Path) -> None:
    """Separate diffusers q/k/v LoRAs land in their row slices of the fused qkv, as x @ dW^T on top of W8A8."""
    ref, q = models
    b = LoraBuilder(seed=1)
    for p in "qkv":
        b.lora(f"transformer.transformer_blocks.0.attn.to_{p}", H, H, rank=4, style="peft")
    lora = _save(tmp_path, "qkv", b.sd)
    layer = q.double_blocks[0].img_attn.qkv
    x = _x()
    with torch.no_grad():
        y0 = layer(x)
        h = cql.apply(q, lora, 0.7, "dynamic")
        y1 = layer(x)
    assert h.layers == ["double_blocks.0.img_attn.qkv"] and layer.adapter.rank == 12
    d = _delta(ref, lora, 0.7, "double_blocks.0.img_attn.qkv.weight").double()
    want = x.double() @ d.T
    assert float((y1.double() - y0.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
    cql.remove(q, h)
    assert layer.adapter is None
    with torch.no_grad():
        assert torch.equal(layer(x), y0)


def test_three_dynamic_loras_share_one_pair_of_matmuls_and_remove_in_any_order(models: tuple, tmp_path: Path) -> None:
    ref, q = models
    layer, name = q.single_blocks[1].linear1, "single_blocks.1.linear1.weight"
    out_f = layer.out_features
    paths = [_save(tmp_path, f"l{i}", LoraBuilder(seed=10 + i).lora("lora_unet_single_blocks_1_linear1", out_f, H,
                                                                     rank=r).sd) for i, r in enumerate((4, 8, 16))]
    x = _x(seed=3)
    with torch.no_grad():
        y0 = layer(x)
        handles = [cql.apply(q, p, s, "dynamic") for p, s in zip(paths, (1.0, 0.5, -0.8), strict=True)]
        assert layer.adapter.rank == 28 and len(layer.adapter.entries) == 3
        y3 = layer(x)
        deltas = [_delta(ref, p, s, name).double() for p, s in zip(paths, (1.0, 0.5, -0.8), strict=True)]
        want = x.double() @ sum(deltas).T
        assert float((y3.double() - y0.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
        cql.remove(q, handles[1])
        want = x.double() @ (deltas[0] + deltas[2]).T
        assert layer.adapter.rank == 20
        assert float((layer(x).double() - y0.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
        cql.remove(q, handles[2])
        cql.remove(q, handles[0])
        assert layer.adapter is None and torch.equal(layer(x), y0)
    with pytest.raises(UserError, match="already removed"):
        cql.remove(q, handles[0])


def test_dynamic_on_float_layers_uses_a_hook_and_loha_runs_dense(models: tuple, tmp_path: Path) -> None:
    """The flux preset keeps modulation in float: a LoRA there runs through a forward hook; a LoHa (not
    low-rank) as a dense difference."""
    ref, q = models
    mod = q.double_blocks[1].img_mod.lin
    assert type(mod) is nn.Linear
    b = LoraBuilder(seed=4).loha("lora_unet_double_blocks_1_img_mod_lin", 6 * H, H)
    lora = _save(tmp_path, "loha", b.sd)
    x = _x(seed=5)
    with torch.no_grad():
        y0 = mod(x)
        h = cql.apply(q, lora, 1.0, "dynamic")
        d = _delta(ref, lora, 1.0, "double_blocks.1.img_mod.lin.weight").double()
        want = x.double() @ d.T
        assert float((mod(x).double() - y0.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
        cql.remove(q, h)
        assert torch.equal(mod(x), y0) and not mod._forward_hooks


def test_bake_requantizes_the_float_merge_and_removes_bit_exactly(models: tuple, tmp_path: Path) -> None:
    ref, q = models
    layer = q.double_blocks[0].txt_mlp[0]
    lora = _save(tmp_path, "mlp", LoraBuilder(seed=6).lora("diffusion_model.double_blocks.0.txt_mlp.0", 4 * H, H,
                                                            rank=8, style="peft").sd)
    before = layer.qweight
    x = _x(seed=7)
    with torch.no_grad():
        y0 = layer(x)
        h = cql.apply(q, lora, 0.9, "bake")
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    bound = bind_loras([cql.read_lora(lora)], [0.9], build_keymap(shapes), "model")
    merged = bound("double_blocks.0.txt_mlp.0.weight",
                   before.layout_cls.dequantize(before.qdata, before.params.replace(orig_dtype=torch.float32)))
    fresh = QuantizedTensor.from_float(merged, before.layout_cls, **before.layout_cls.requantize_kwargs(before.params))
    assert torch.equal(layer.qweight.qdata, fresh.qdata) and torch.equal(layer.qweight.params.scale, fresh.params.scale)
    assert layer.qweight.dtype == before.dtype and layer.adapter is None
    h2 = cql.apply(q, lora, 0.5, "bake")
    with pytest.raises(UserError, match="reverse order"):
        cql.remove(q, h)
    cql.remove(q, h2)
    cql.remove(q, h)
    assert layer.qweight is before
    with torch.no_grad():
        assert torch.equal(layer(x), y0)


def test_dora_needs_bake_and_bakes_like_the_merge(models: tuple, tmp_path: Path) -> None:
    ref, q = models
    lora = _save(tmp_path, "dora", LoraBuilder(seed=8).lora("lora_unet_double_blocks_1_img_attn_proj", H, H,
                                                            dora="in").sd)
    with pytest.raises(UserError, match=r"DoRA.*use mode='bake'"):
        cql.apply(q, lora, 1.0, "dynamic")
    assert q.double_blocks[1].img_attn.proj.adapter is None
    h = cql.apply(q, lora, 1.0, "bake")
    layer = q.double_blocks[1].img_attn.proj
    w = layer.qweight.layout_cls.dequantize(layer.qweight.qdata, layer.qweight.params.replace(orig_dtype=torch.float32))
    step = layer.qweight.params.scale  # per-row int8 step of the requantized weight: at most half a step off
    cql.remove(q, h)
    base = layer.qweight.layout_cls.dequantize(layer.qweight.qdata,
                                               layer.qweight.params.replace(orig_dtype=torch.float32))
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    bound = bind_loras([cql.read_lora(lora)], [1.0], build_keymap(shapes), "model")
    want = bound("double_blocks.1.img_attn.proj.weight", base.clone())
    assert float(((w - want).abs() / step).max()) <= 0.5 + 1e-3


def test_whole_model_dynamic_and_bake_track_the_float_merge(models: tuple, tmp_path: Path) -> None:
    """Velocity of the quantized model with the LoRA vs the float model with the LoRA merged: both modes stay at
    the int8 noise floor while the LoRA itself moves the output by far more."""
    ref, q = models
    b = LoraBuilder(seed=9, scale=0.2)
    for n, p in ref.named_parameters():
        if n.endswith(".weight") and p.dim() == 2 and "blocks" in n:
            b.lora("lora_unet_" + n[: -len(".weight")].replace(".", "_"), p.shape[0], p.shape[1], rank=8)
    lora = _save(tmp_path, "all", b.sd)
    merged = copy.deepcopy(ref)
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    bound = bind_loras([cql.read_lora(lora)], [0.8], build_keymap(shapes), "model")
    with torch.no_grad():
        for n, p in merged.named_parameters():
            if n in bound.names:
                p.copy_(bound(n, p.detach().float().clone()))
    g = torch.Generator().manual_seed(0)
    x, t, lab = torch.randn(4, 16, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.7, 0.9]), torch.tensor([1, 3, 5, 7])

    def rel(model: nn.Module) -> float:
        with torch.no_grad():
            a, want = model.velocity(x, t, lab), merged.velocity(x, t, lab)
        return float((a - want).norm() / want.norm())

    effect, floor = rel(ref), rel(q)
    assert effect > 0.05
    for mode, kw in (("dynamic", {}), ("bake", {"stochastic": True, "seed": 1})):
        h = cql.apply(q, lora, 0.8, mode, **kw)
        assert len(h.layers) == sum(1 for n in bound.names), h
        err = rel(q)
        cql.remove(q, h)
        assert err < 0.02 and err < effect / 5, (mode, err, effect, floor)


def test_stochastic_rounding_is_unbiased_and_on_grid() -> None:
    """In the format's quantization basis, the mean of many draws is the value itself (where the grid does not
    clip it), and a draw is stored exactly: its stored tensors dequantize to the drawn values."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * 0.02
    for name, opts in (("int8", {}), ("int8-rot", {}), ("int8-block", {"block_size": 16}), ("fp8", {}),
                       ("nvfp4", {}), ("int4-rot", {})):
        fmt = get_format(name)
        params = fmt.resolve((16, 64), opts)
        w_t = fmt.transform(w, params)
        scale = fmt.grid(w_t, params).scale_for()
        inside = (w_t / scale).abs() < fmt.element_grid.max  # scale-searching formats clip a few values
        draws = torch.stack([fmt.transform(stochastic_grid(w, fmt, params, g), params) for _ in range(400)])
        step = (fmt.transform(dequantize_weight(quantize_weight(w, name, **opts).tensors,
                                                fmt.comfy_quant(params)), params) - w_t).abs().max() * 2
        bias = (draws.mean(0) - w_t).abs()[inside]
        assert float(bias.max()) < 0.25 * float(step), name  # round-to-nearest's bias would be ~step/2
        v = stochastic_grid(w, fmt, params, torch.Generator().manual_seed(5))
        stored = stochastic_tensors(w, fmt, params, torch.Generator().manual_seed(5))
        back = dequantize_weight(stored, fmt.comfy_quant(params))
        assert float((back - v).abs().max()) < 1e-5 * float(w.abs().max()), name
    x = torch.tensor([0.3, -1.1, 3.3, 447.0, 0.0, 1e-4, -200.5])
    table = grid_values(FP8_E4M3)
    assert len(table) == 253 and float(table[-1]) == 448.0  # 126 magnitudes each sign, one zero
    s = torch.stack([stochastic_on_table(x, table, g) for _ in range(4000)])
    assert torch.equal(s.to(torch.float8_e4m3fn).float(), s)  # every draw is an fp8 value
    assert float(((s.mean(0) - x).abs() / x.abs().clamp(min=1e-3)).max()) < 0.01
    assert grid_values(FP4_E2M1).tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_bad_modes_and_mismatches(models: tuple, tmp_path: Path) -> None:
    _, q = models
    lora = _save(tmp_path, "ok", LoraBuilder().lora("lora_unet_final_layer_linear", 64, H).sd)
    with pytest.raises(UserError, match="mode must be one of dynamic, bake"):
        cql.apply(q, lora, 1.0, "merge")
    other = _save(tmp_path, "other", LoraBuilder().lora("lora_unet_blocks_0_self_attn_q", 5120, 5120, rank=1).sd)
    with pytest.raises(UserError, match="none of its 1 modules matches a layer of the DigitsDiT model"):
        cql.apply(q, other)
    assert all(m.adapter is None for m in q.modules() if isinstance(m, QuantLinear))
