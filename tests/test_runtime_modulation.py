"""A DiT block's modulated LayerNorm handed to the quantized linear it feeds (``acts.ModulatedNorm``,
``runtime.modulation``), on the CPU: the torch path against float64, the per-site buffer, which backends fold it
(the kernels themselves: ``triton_interp_modulated`` under the interpreter, ``test_kernels_sm90`` compiled)."""

from __future__ import annotations

import pytest
import torch
from comfyui_server_fixtures import rel_err
from torch import nn

from comfyquant.runtime.kernels import builtin, dispatch
from comfyquant.runtime.kernels.acts import (
    MODULATED_MAX_K,
    ModulatedNorm,
    layer_mod,
    norm_fits,
    norm_key,
    rms_norm,
)
from comfyquant.runtime.modulation import ModulationSite, gated_add_, modulated_linear, per_item
from comfyquant.runtime.nn import QuantLinear

EPS = 1e-6


def _inputs(b: int, t: int, k: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, k, generator=g) * 3 + torch.randn(b, t, 1, generator=g)).to(dtype)
    mod = torch.randn(b, 1, 6 * k, generator=g).to(dtype)  # ComfyUI's Modulation output: chunks of one tensor
    shift, scale, gate = mod[..., :k], mod[..., k:2 * k], mod[..., 2 * k:3 * k]
    return x, shift, scale, gate


def _ref64(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    y = (x64 - mean) / torch.sqrt((x64 - mean).pow(2).mean(-1, keepdim=True) + EPS)
    return y * (1 + scale.double()) + shift.double()


def test_modulated_norm_in_torch_is_the_blocks_arithmetic_and_float64_within_rounding() -> None:
    x, shift, scale, _ = _inputs(3, 7, 64, seed=0)
    site = ModulationSite(EPS)
    norm = site.norm(shift, scale, 7)
    assert norm.mod.shape == (3, 128) and norm.mod.is_contiguous()
    assert torch.equal(norm.mod[:, :64], shift[:, 0]) and torch.equal(norm.mod[:, 64:], scale[:, 0])
    y = rms_norm(x, norm)
    assert torch.equal(y, layer_mod(x, shift, scale, EPS))  # what ComfyUI's apply_mod(norm(x), 1 + scale, shift) is
    assert torch.equal(y, torch.addcmul(shift, nn.functional.layer_norm(x, (64,), eps=EPS), 1 + scale))
    err = (y.double() - _ref64(x, shift, scale)).abs().max().item()
    assert err < 1e-5 * _ref64(x, shift, scale).abs().max().item()
    # a [B*T, K] view of x reads the same rows per group
    assert torch.equal(rms_norm(x.reshape(21, 64), norm), y.reshape(21, 64))


def test_a_site_keeps_one_buffer_per_shape_so_kernel_plans_stay_valid() -> None:
    _, shift, scale, _ = _inputs(2, 5, 32, seed=1)
    site = ModulationSite(EPS)
    a = site.norm(shift, scale, 5)
    ptr = a.mod.data_ptr()
    _, shift2, scale2, _ = _inputs(2, 5, 32, seed=2)
    b = site.norm(shift2, scale2, 5)
    assert b.mod.data_ptr() == ptr and torch.equal(b.mod[:, 32:], scale2[:, 0])  # refilled in place
    assert norm_key(a) == norm_key(b)  # one memo entry (and plan) for every step
    d = site.norm(shift[:, 0], scale, 5)  # [G, K] and [G, 1, K] (per_item takes either): the same buffer
    assert d.mod.data_ptr() == ptr and norm_key(d) == norm_key(a)
    assert torch.equal(d.mod, torch.cat((shift[:, 0], scale[:, 0]), -1))
    c = site.norm(shift2[:1], scale2[:1], 5)  # another batch size: another buffer
    assert c.mod.shape == (1, 64) and c.mod.data_ptr() != ptr
    assert norm_key(c) != norm_key(b)


def test_a_site_made_under_inference_mode_serves_calls_outside_it() -> None:
    """ComfyUI samples under ``torch.inference_mode``: a buffer made there is an inference tensor, which torch
    will not write in place outside it (a model then run under ``no_grad`` only); the site makes a new one."""
    _, shift, scale, _ = _inputs(2, 3, 16, seed=11)
    site = ModulationSite(EPS)
    with torch.inference_mode():
        inside = site.norm(shift, scale, 3).mod
    assert inside.is_inference()
    with torch.no_grad():
        outside = site.norm(shift, scale, 3).mod
    assert not outside.is_inference() and torch.equal(outside, inside)
    with torch.inference_mode():  # a normal tensor is written in place inside it: kept
        assert site.norm(shift, scale, 3).mod.data_ptr() == outside.data_ptr()


def test_norm_fits_checks_the_buffer_against_the_rows() -> None:
    x, shift, scale, _ = _inputs(2, 4, 16, seed=3)
    norm = ModulationSite(EPS).norm(shift, scale, 4)
    assert norm_fits(norm, x) and norm_fits(norm, x.reshape(8, 16))
    assert not norm_fits(ModulatedNorm(norm.mod, EPS, 3), x)  # 8 rows are not groups of 3
    assert not norm_fits(ModulatedNorm(norm.mod, EPS, 2), x)  # 4 groups of 2, the buffer holds 2
    assert not norm_fits(ModulatedNorm(norm.mod[:, ::2], EPS, 4), x)  # not contiguous
    assert per_item(shift, x) and per_item(shift[:, 0], x)
    assert not per_item(shift[:1], x) and not per_item(torch.zeros(2, 4, 16), x)  # per token: not folded


def test_which_backends_fold_it() -> None:
    """The quantizers that hold whole rows (up to 8,192 wide): int8's two-launch path (the block kernel, or before
    its rotation the row kernel), its one-launch path where the row-block kernel runs (64 rows up, unrotated),
    its weight-only path's rotation pass (rotated weights), int4_rot's three paths, fp8 with dynamic scales."""
    int8, fp8, int4 = builtin.INT8.backends, builtin.FP8.backends, builtin.INT4_ROT.backends
    assert int8["triton"].fuses_mod((None,), (0,), 16, 3072, 3072)
    assert int8["triton"].fuses_mod((None,), (256,), 4096, 3072, 3072)  # convrot: the row kernel
    assert not int8["triton"].fuses_mod((None,), (0,), 4096, 3072, MODULATED_MAX_K + 16)
    assert int8["triton_fused"].fuses_mod((None,), (0,), 1024, 3072, 3072)
    assert not int8["triton_fused"].fuses_mod((None,), (0,), 16, 3072, 3072)  # per-tile kernel
    assert not int8["triton_fused"].fuses_mod((None,), (256,), 1024, 3072, 3072)  # it takes no rotated weight
    assert int8["triton_w8a16"].fuses_mod((None,), (256,), 1, 3072, 3072)  # its rotation pass
    assert not int8["triton_w8a16"].fuses_mod((None,), (0,), 1, 3072, 3072)  # no pass to fold it into
    assert all(int4[b].fuses_mod((None,), (256,), 16, 3072, 3072) for b in ("triton", "triton_unpacked",
                                                                            "triton_w4a16"))
    assert fp8["triton"].fuses_mod((None,), (), 4096, 3072, 3072)
    assert fp8["scaled_mm"].fuses_mod((None, None), (), 4096, 3072, 3072)
    assert not fp8["triton"].fuses_mod((None, torch.ones(())), (), 4096, 3072, 3072)  # static input scale
    for kind in (builtin.INT8, builtin.FP8, builtin.INT4_ROT):
        for name, b in kind.backends.items():
            if name in ("torch", "dequant", "triton_fused_kblock") or (kind is builtin.FP8 and name == "triton_w8a16"):
                assert b.fuses_mod is None, (kind.name, name)


@pytest.mark.parametrize("fmt", ["int8", "int8-rot", "fp8"])
@pytest.mark.cpu_int8
def test_modulated_linear_on_a_quantized_layer_computes_the_unfolded_block(fmt: str) -> None:
    """The CPU path (torch backend: the norm in torch, from the site's buffer): bit for bit what the layer gives
    fed ``layer_mod`` of x, for a plain ``nn.Linear`` too; the dispatcher memoizes one entry for every step."""
    from comfyquant.runtime.quantize import QuantizeConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 96))
    plain = nn.Linear(64, 96)
    plain.load_state_dict(model[0].state_dict())
    quantize_(model, QuantizeConfig(format=fmt, min_features=1))
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.takes_norm()
    site = ModulationSite(EPS)
    for step in range(3):
        x, shift, scale, _ = _inputs(2, 6, 64, seed=10 + step)
        got = modulated_linear(layer, x, shift, scale, EPS, site)
        assert torch.equal(got, layer(layer_mod(x, shift, scale, EPS)))
        assert torch.equal(modulated_linear(plain, x, shift, scale, EPS, site),
                           plain(layer_mod(x, shift, scale, EPS)))
    memo = layer.qweight.__dict__.get("_comfyquant_bound")
    # one entry for the three steps' normed calls (one buffer), one for the comparison's plain calls
    assert memo is not None and sorted(sig[5] is None for sig in memo[1].memo) == [False, True]
    base = torch.randn(got.shape, generator=torch.Generator().manual_seed(9))
    gate = torch.randn(2, 1, 96, generator=torch.Generator().manual_seed(8))
    res = base.clone()
    out = gated_add_(res, got, gate)
    assert out is res and torch.allclose(res, base + got * gate, rtol=1e-6, atol=1e-6)  # in place


@pytest.mark.cpu_int8
def test_a_layer_that_applies_something_else_first_gets_the_norm_in_torch() -> None:
    from comfyquant.runtime.quantize import QuantizeConfig, quantize_

    model = nn.Sequential(nn.Linear(32, 48))
    quantize_(model, QuantizeConfig(format="int8", min_features=1))
    layer = model[0]
    layer.input_act = "gelu_tanh"
    assert not layer.takes_norm()
    x, shift, scale, _ = _inputs(1, 4, 32, seed=5)
    got = modulated_linear(layer, x, shift, scale, EPS, ModulationSite(EPS))
    assert torch.equal(got, layer(layer_mod(x, shift, scale, EPS)))


@pytest.mark.cpu_int8
def test_the_dispatcher_folds_it_only_where_the_backend_says_so() -> None:
    """``bind_linear`` with a modulated norm on a backend that does not fold it (the CPU's torch reference) applies
    it in torch first; a buffer that does not fit x is refused by ``norm_fits`` and applied in torch too."""
    g = torch.Generator().manual_seed(6)
    w = torch.randint(-127, 128, (24, 32), dtype=torch.int8, generator=g)
    s = torch.rand(24, generator=g) * 0.01
    call = dispatch.bind_linear("int8", w, (s,), None, opts=(0,))
    x, shift, scale, _ = _inputs(2, 3, 32, seed=7)
    norm = ModulationSite(EPS).norm(shift, scale, 3)
    want = dispatch.quant_linear(layer_mod(x, shift, scale, EPS), "int8", w, (s,), None, opts=(0,))
    assert torch.equal(call(x, None, None, norm), want)
    with pytest.raises(ValueError, match="input activation"):
        call(x, None, "gelu_tanh", norm)


@pytest.mark.parametrize("arch", ["flux", "flux2"])
@pytest.mark.cpu_int8
def test_bench_flux_variants_time_the_fold_beside_the_torch_norms(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyquant bench``'s ``int8_modfold`` / ``fp8_modfold``: the bench model's Flux / Flux.2 blocks with their
    modulated norms handed to the quantized layers (every site used), the same model as ``int8`` / ``fp8`` up to
    the torch norm's roundings."""
    from functools import partial

    from comfyquant.bench import blocks, models

    def build(name: str) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        if arch == "flux":
            model = blocks.Flux(1, 1, (partial(blocks.FluxDouble, 64, 2), partial(blocks.FluxSingle, 64, 2)))
            args = (torch.randn(2, 12, 64), torch.randn(2, 5, 64), torch.randn(2, 64))
        else:  # Flux2 is Flux with these block classes
            model = blocks.Flux(1, 1, (partial(blocks.Flux2Double, 64, 2, 96), partial(blocks.Flux2Single, 64, 2, 96)))
            args = (torch.randn(2, 12, 64), torch.randn(2, 5, 64), torch.randn(2, 6 * 64) * 0.1)
        return model, args

    monkeypatch.setattr(models, "build", build)
    for fmt in ("int8", "fp8"):
        got = {v: (m, a) for v, m, a in models.variants(f"{arch}_small", None, only=("bf16", fmt, f"{fmt}_modfold"))}
        assert list(got) == ["bf16", fmt, f"{fmt}_modfold"]
        (ref, args), (plain, _), (folded, _) = got["bf16"], got[fmt], got[f"{fmt}_modfold"]
        with torch.no_grad():
            base, want, out = ref(*args), plain(*args), folded(*args)
        sites = [s for b in folded.modules() if isinstance(b, blocks.FLUX_BLOCKS) for s in b.sites]
        assert len(sites) == 5 and all(s._buf is not None for s in sites)
        # the torch norm's roundings (addcmul against (1 + scale) * ln + shift): measured <= 0.3% of the
        # quantization's own error
        assert rel_err(out, want) < 0.02 * rel_err(want, base), (rel_err(out, want), rel_err(want, base))
    assert [v for v, _, _ in models.variants("sdxl_small", None, only=("int8_modfold",))] == []


@pytest.mark.cpu_int8
def test_a_normed_call_goes_through_the_module_and_shows_in_describe_dispatch() -> None:
    """``QuantLinear.normed`` calls the module (its forward hooks run, seeing x before the norm, as on a layer with
    a folded norm), so ``describe_dispatch`` has a row for each modulated layer, naming the norm and where it is
    applied (on the CPU's torch reference: "torch first"); the norm is the call's only."""
    from functools import partial

    from comfyquant.bench import blocks
    from comfyquant.runtime import describe_dispatch, quantize_
    from comfyquant.runtime.quantize import QuantizeConfig

    torch.manual_seed(0)
    model = blocks.Flux(1, 1, (partial(blocks.FluxDouble, 64, 2), partial(blocks.FluxSingle, 64, 2)))
    quantize_(model, QuantizeConfig(format="int8", min_features=1))
    assert blocks.fold_modulation(model) == 2
    args = (torch.randn(2, 12, 64), torch.randn(2, 5, 64), torch.randn(2, 64))
    seen = []
    qkv = model.doubles[0].qkv[1]
    handle = qkv.register_forward_pre_hook(lambda mod, a: seen.append((a[0].shape, mod.call_norm is not None)))
    with torch.no_grad():
        model(*args)
    handle.remove()
    assert seen == [(torch.Size([2, 12, 64]), True)] and qkv.call_norm is None
    rows = {r.layer: r for r in describe_dispatch(model, *args)}
    for name in ("doubles.0.qkv.0", "doubles.0.qkv.1", "doubles.0.mlp.0.0", "singles.0.linear1"):
        assert rows[name].folded == "layer_mod: torch first", (name, rows[name])
    assert rows["doubles.0.proj.0"].folded == "" and rows["doubles.0.mlp.1.2"].folded == "gelu_tanh: torch first"


@pytest.mark.parametrize("broken", [False, True])
def test_a_folding_kernel_is_checked_against_the_norm_in_torch_at_its_first_call(
        broken: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A backend that says it folds the modulated norm is compared, at a layer's first call, with itself fed the
    norm in torch: one that agrees keeps the fold (its kernel sees the norm from then on); one that computes
    something else (here: ignores the norm) is not used for it, with one warning, and every call gives the torch
    norm's result. The decision is made once per input signature (later calls read it from the memo)."""
    from comfyquant.runtime.kernels.registry import (
        KernelBackend,
        KernelKind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    seen: list[bool] = []
    shapes: list[tuple] = []
    asked: list[int] = []

    def impl(x, w, scales, bias, opts, out_dtype, norm=None):
        seen.append(norm is not None)
        shapes.append(tuple(x.shape))
        if norm is not None and not broken:
            x = rms_norm(x, norm)
        return (x.double() @ w.t()).to(out_dtype)

    def choose(x, n, k, opts, policy):
        return dispatch.BackendChoice("folding", "test")

    register_kernel_kind(KernelKind("test_mod_check", {
        "reference": lambda x, w, scales, bias, opts, out_dtype: (x.double() @ w.t()).to(out_dtype),
        "folding": KernelBackend(impl, fuses_mod=lambda scales, opts, m, n, k: asked.append(m) or True)},
        choose=choose))
    try:
        g = torch.Generator().manual_seed(12)
        w = torch.randn(24, 32, generator=g, dtype=torch.float64)
        call = dispatch.bind_linear("test_mod_check", w, (None,))
        x, shift, scale, _ = _inputs(2, 3, 32, seed=13)
        norm = ModulationSite(EPS).norm(shift, scale, 3)
        want = (layer_mod(x, shift, scale, EPS).double() @ w.t()).float()
        with caplog.at_level("WARNING", logger="comfyquant.runtime"):
            for _ in range(3):
                torch.testing.assert_close(call(x, None, None, norm), want, rtol=1e-6, atol=1e-6)
        (entry,) = call.memo.values()
        assert entry[3] is not broken and asked == [6]  # decided at the first call, kept in the memo entry
        warned = [r for r in caplog.records if "folded modulated norm" in r.getMessage()]
        assert len(warned) == (1 if broken else 0)
        # the check's two calls (with the norm, then fed it): the first is the first call's output where it passes;
        # then the kernel with the norm, or without it
        assert seen == [True, False, True, True] if not broken else seen == [True, False, False, False, False]
        # the reference ran on the first modulation group's rows only (3 of 6): the check holds one whole output
        assert shapes[0] == (2, 3, 32) and shapes[1] == (3, 32)
    finally:
        unregister_kernel_kind("test_mod_check")


def test_rms_site_keeps_the_weight_while_it_stays_the_same_tensor() -> None:
    """``RmsModulationSite``: ``w * (1 + scale) - 1`` in fp32 per item, the weight's fp32 copy kept across calls
    and remade for a new weight object or an in-place write (a LoRA patch, a load)."""
    from comfyquant.runtime.modulation import RmsModulationSite

    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter((torch.rand(8, generator=g) + 0.5).bfloat16(), requires_grad=False)
    scale = torch.randn(2, 8, generator=g).bfloat16()
    site = RmsModulationSite(1e-6)
    norm = site.norm(w, scale, 5)
    want = w.double() * (1 + scale.double()) - 1
    assert norm.rms and norm.rows == 5 and norm.mod.dtype == torch.float32 and norm.mod.shape == (2, 16)
    assert torch.equal(norm.mod[:, :8], torch.zeros(2, 8)) and (norm.mod[:, 8:].double() - want).abs().max() < 1e-6
    kept = site._weight
    assert site.norm(w, scale, 5).mod.data_ptr() == norm.mod.data_ptr() and site._weight is kept
    with torch.no_grad():
        w.mul_(2)  # in place: its version moves
    again = site.norm(w, scale, 5)
    assert site._weight is not kept
    assert (again.mod[:, 8:].double() - (w.double() * (1 + scale.double()) - 1)).abs().max() < 1e-6
    other = torch.nn.Parameter(torch.ones(8).bfloat16(), requires_grad=False)  # a new object (ComfyUI's patches)
    assert torch.allclose(site.norm(other, scale, 5).mod[:, 8:], scale.float())


@pytest.mark.cpu_int8
def test_a_call_norm_on_some_members_of_a_fused_group_makes_them_compute_alone() -> None:
    """``with_call_norms``: the members of a fused q / k / v group that got the norm read the normed input and the
    one that did not reads x as given; a group whose members hold different call norms does not fuse (one GEMM
    applies one norm), and one whose members hold the same does, with the float64 result."""
    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.modulation import with_call_norms
    from comfyquant.runtime.siblings import fuse_sibling_projections

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.q(x), self.k(x), self.v(x)

    torch.manual_seed(0)
    attn = Attention()
    w64 = {n: (getattr(attn, n).weight.double(), getattr(attn, n).bias.double()) for n in "qkv"}
    quantize_(attn, QuantizeConfig(format="int8", min_features=1))
    assert fuse_sibling_projections(attn) == [": q,k,v"]
    group = attn.q.sibling[0]
    x, shift, scale, _ = _inputs(2, 5, 32, seed=1)
    site = ModulationSite(EPS)
    xn = _ref64(x, shift, scale)
    with torch.no_grad():
        attn(x)  # the group learns its plan
        attn(x)
        fused = group.fused_calls
        assert fused == 1
        outs = with_call_norms(attn, (([attn.q, attn.k], site.norm(shift, scale, 5)),), x)
        assert group.fused_calls == fused  # q / k hold the norm, v none: each computed alone
        for n, y, fed in zip("qkv", outs, (xn, xn, x.double()), strict=True):
            w, b = w64[n]
            assert rel_err(y, fed @ w.t() + b) < 0.02, n
        outs = with_call_norms(attn, (([attn.q, attn.k, attn.v], site.norm(shift, scale, 5)),), x)
        assert group.fused_calls == fused + 1
        for n, y in zip("qkv", outs, strict=True):
            w, b = w64[n]
            assert rel_err(y, xn @ w.t() + b) < 0.02, n
        assert all(m.__dict__.get("call_norm") is None for m in (attn.q, attn.k, attn.v))  # handed back
