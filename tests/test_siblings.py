"""One quantized GEMM for sibling projections (``runtime.siblings``): row concatenation of quantized weights, the
library API on plain modules, and the node pack's adapter on ComfyUI 0.30's own ``CrossAttention`` (SD1.x / SDXL)
under its ModelPatcher; every fused output is compared with the unfused one bit for bit on the CPU."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_fixtures import patched
from gemm_counter import count_gemms
from safetensors.torch import load_file, save_file
from torch import nn

from comfyquant.lora.sidepath import LoRASidePath, SideEntry
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.cache import QuantCache
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions
from comfyquant.runtime import QuantizeConfig, quantize_
from comfyquant.runtime.nn import QuantLinear, linear
from comfyquant.runtime.siblings import (
    _FUSED_ATTR,
    MAX_RESETS,
    ArmedForward,
    concat_rows,
    fuse_sibling_projections,
    fusion_blocker,
    row_view,
)
from comfyquant.runtime.tensor import QuantizedTensor

pytestmark = pytest.mark.cpu_int8

FORMATS = ("int8", "int8-tensor", "int8-rot", "fp8", "int4-rot")
SIZES = (256, 128, 128)  # q, k, v rows (grouped-query attention's k/v are narrower)


def _storage(qt: torch.Tensor) -> int:
    return qt.qdata.untyped_storage().data_ptr()  # type: ignore[attr-defined]


# ---- the weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_concatenated_rows_compute_each_members_output_bit_for_bit(fmt: str) -> None:
    torch.manual_seed(0)
    m = nn.ModuleDict({n: nn.Linear(256, s) for n, s in zip("qkv", SIZES, strict=True)})
    quantize_(m, QuantizeConfig(format=fmt, min_features=1, fold_activations=False))
    qts = [m[n].qweight for n in "qkv"]
    x = torch.randn(3, 5, 256)
    ref = [m[n](x) for n in "qkv"]
    fused = concat_rows(qts)
    assert tuple(fused.shape) == (sum(SIZES), 256) and _storage(fused) not in {_storage(q) for q in qts}
    got = linear(x, fused, torch.cat([m[n].bias for n in "qkv"])).split(SIZES, -1)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    start = 0
    for n, qt, want in zip("qkv", qts, ref, strict=True):
        view = row_view(fused, start, start + qt.shape[0], qt)
        assert _storage(view) == _storage(fused) and view.qdata.data_ptr() == fused.qdata[start].data_ptr()
        own, shared = qt.params.weight_scale, view.params.weight_scale
        assert shared.shape == own.shape and (shared is own) == (own.numel() == 1)  # per-row scales are views
        assert torch.equal(linear(x, view, m[n].bias), want)
        start += qt.shape[0]
    with pytest.raises(ValueError, match="rows 0:3"):
        row_view(fused, 0, 3, qts[0])


@pytest.mark.parametrize("fmt", ["int8-block", "nvfp4", "mxfp8"])
def test_block_scaled_formats_are_refused(fmt: str) -> None:
    qts = [QuantizedTensor.from_float(torch.randn(128, 256), fmt) for _ in range(2)]
    assert "block scales" in str(fusion_blocker(qts))
    with pytest.raises(ValueError, match="block scales"):
        concat_rows(qts)


def test_weights_that_do_not_share_one_quantization_are_refused() -> None:
    w = torch.randn(64, 256)
    a = QuantizedTensor.from_float(w, "int8")
    fp8 = [QuantizedTensor.from_float(w, "fp8", input_scale=s) for s in (0.5, 0.25)]
    cases = {
        "different formats": [a, QuantizedTensor.from_float(w, "int8-rot")],
        "pre_quant_scale": [a, a.with_parts(params=a.params.replace(pre_quant_scale=torch.ones(256)))],
        "input scales": fp8,
        "in_features": [a, QuantizedTensor.from_float(torch.randn(64, 128), "int8")],
        "dtypes": [a, QuantizedTensor.from_float(w.half(), "int8")],
        "backends": [a, a.with_parts(params=a.params.replace(backend="torch"))],
        "not all are quantized": [a, w],
        "fewer than two": [a],
    }
    for why, weights in cases.items():
        assert why in str(fusion_blocker(weights)), (why, fusion_blocker(weights))
    assert fusion_blocker([a, QuantizedTensor.from_float(torch.randn(32, 256), "int8"), a]) is None
    assert fusion_blocker([fp8[0], QuantizedTensor.from_float(torch.randn(8, 256), "fp8", input_scale=0.5)]) is None


# ---- the library API on plain modules ------------------------------------------------------------------------
class Attention(nn.Module):
    """q from x; k and v from ``context`` (default x) or v from ``value``; ``skip_v``: v is not called (its
    stashed view is left over)."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                skip_v: bool = False) -> torch.Tensor:
        c = x if context is None else context
        q, k = self.q(x), self.k(c)
        v = k if skip_v else self.v(c if value is None else value)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.o(out.transpose(1, 2).reshape(x.shape))


class GatedMLP(nn.Module):
    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(width, hidden, bias=False),
                                                         nn.Linear(width, hidden, bias=False),
                                                         nn.Linear(hidden, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _quantized(fmt: str = "int8") -> nn.ModuleDict:
    """Quantized without folds: the gated MLP stays a plain sibling pair (folded, ``runtime.gated`` claims it)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"self_attn": Attention(), "cross": Attention(), "mlp": GatedMLP(),
                           "plain": Attention()})
    quantize_(model, QuantizeConfig(format=fmt, min_features=1, exclude=r"^plain\.", fold_activations=False))
    return model


def test_library_fuses_quantized_siblings_and_learns_which_share_the_input(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    model = _quantized()
    ref = copy.deepcopy(model)
    assert fuse_sibling_projections(model) == ["self_attn: q,k,v", "cross: q,k,v", "mlp: gate_proj,up_proj"]
    assert fuse_sibling_projections(model) == []  # members already grouped
    assert isinstance(model["self_attn"].__dict__["forward"], ArmedForward)
    assert "forward" not in model["plain"].__dict__ and type(model["plain"].q) is nn.Linear  # kept in float: not grouped
    assert isinstance(model["mlp"].up_proj, QuantLinear) and model["mlp"].up_proj.sibling[1] == 1
    side = LoRASidePath()  # a dynamic LoRA on one member: applied on its slice of the fused output
    side.add(1, SideEntry(down=torch.randn(4, 64) * 0.3, up=torch.randn(64, 4) * 0.3))
    model["self_attn"].k.adapter, ref["self_attn"].k.adapter = side, side.copy()
    widths = count_gemms(monkeypatch)
    x, ctx = torch.randn(2, 7, 64), torch.randn(2, 5, 64)
    calls = (("self_attn", (x,)), ("cross", (x, ctx)), ("mlp", (x,)))
    with torch.inference_mode():
        for r in range(3):
            want = [ref[name](*args) for name, args in calls]
            widths.clear()
            assert all(torch.equal(model[name](*args), w) for (name, args), w in zip(calls, want, strict=True)), r
            # the first round observes; then self-attention's q,k,v and the MLP's gate/up run as one GEMM each,
            # cross-attention's k,v too (q reads x, not the context)
            assert widths == ([64] * 8 + [128] * 2 + [64] if r == 0 else [192, 64, 64, 128, 64, 256, 64]), widths
    groups = {name: model[name].q.sibling[0] if name != "mlp" else model[name].up_proj.sibling[0]
              for name in ("self_attn", "cross", "mlp")}
    assert groups["self_attn"].plan == (0, 1, 2) and groups["cross"].plan == (1, 2) and groups["mlp"].plan == (0, 1)
    attn = model["self_attn"]
    assert len({_storage(attn.q.qweight), _storage(attn.k.qweight), _storage(attn.v.qweight)}) == 1
    assert _storage(ref["self_attn"].q.qweight) != _storage(ref["self_attn"].k.qweight)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))  # row views of one storage: they do not overlap
    saved, want = load_file(str(tmp_path / "m.safetensors")), ref.state_dict()
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_members_loras_go_into_the_fused_gemm_as_one_low_rank_term(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic LoRAs on several members (q rank 4, v rank 20 plus a bias diff) become one term of the fused GEMM
    (downs stacked, ups block-diagonal; the kernels add it in their epilogue): no member's side path runs its own
    low-rank matmuls, the term is built once and reused while the operands stay, and every output matches the
    unfused model's (a float64 reference of the LoRA'd layers bounds both to the same error)."""
    model = _quantized()
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model)
    g = torch.Generator().manual_seed(5)
    sides = {"q": LoRASidePath(), "v": LoRASidePath()}
    sides["q"].add(1, SideEntry(down=torch.randn(4, 64, generator=g) * 0.3, up=torch.randn(64, 4, generator=g) * 0.3))
    sides["v"].add(1, SideEntry(down=torch.randn(20, 64, generator=g) * 0.2, up=torch.randn(64, 20, generator=g) * 0.2,
                                bias=torch.randn(64, generator=g)))
    for name, side in sides.items():
        model["self_attn"].get_submodule(name).adapter = side
        ref["self_attn"].get_submodule(name).adapter = side.copy()
    own_calls = []
    monkeypatch.setattr(LoRASidePath, "__call__", lambda self, x, y: own_calls.append(self) or y)
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        outs = [model["self_attn"](x) for _ in range(3)]  # observe, fuse (build the term), fuse (reuse it)
    monkeypatch.undo()
    group = model["self_attn"].q.sibling[0]
    assert group.fused_calls == 2 and own_calls == []  # (unfused, a member's own kernel takes its term too)
    term = group._term[3]
    down, up, r = term.operands
    assert r == 24 and tuple(down.shape) == (32, 64) and tuple(up.shape) == (32, 192)
    assert torch.count_nonzero(up[:4, 64:]) == 0 and torch.count_nonzero(up[4:24, :128]) == 0  # block-diagonal
    with torch.inference_mode():
        want = ref["self_attn"](x)
        got = model["self_attn"](x)
    assert group._term[3] is term
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and torch.allclose(outs[2], want, rtol=1e-5, atol=1e-5)
    # past MAX_STACKED_RANK (the Gluon epilogue's 64) the members compute alone, each term in its own kernel's
    # epilogue (adding them on the fused output's slices ran 10% slower than unfused: H200 run 40), and fuse again
    # once the ranks fit
    wide = LoRASidePath()
    wide.add(1, SideEntry(down=torch.randn(48, 64, generator=g) * 0.1, up=torch.randn(64, 48, generator=g) * 0.1))
    model["self_attn"].k.adapter, ref["self_attn"].k.adapter = wide, wide.copy()
    with torch.inference_mode():
        got, want = model["self_attn"](x), ref["self_attn"](x)
    assert group.fused_calls == 3 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    model["self_attn"].k.adapter = ref["self_attn"].k.adapter = None
    with torch.inference_mode():
        got, want = model["self_attn"](x), ref["self_attn"](x)
    assert group.fused_calls == 4 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_in_place_weight_updates_after_consolidation_are_seen() -> None:
    """int8-tensor's per-tensor scales are expanded into the fused weight: an in-place requantization of one
    member (load_state_dict of a float weight) must rebuild it (outside inference mode, versions tell)."""
    model = _quantized("int8-tensor")
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        for _ in range(2):
            model["self_attn"](x)
        new = torch.randn(64, 64) * 3
        for m in (model, ref):
            m["self_attn"].v.load_state_dict({"weight": new, "bias": torch.zeros(64)})
        assert torch.equal(model["self_attn"](x), ref["self_attn"](x))
    assert model["self_attn"].q.sibling[0].fused_calls == 2


def test_a_moved_member_weight_ends_the_consolidation() -> None:
    """``Module._apply`` (what ``.to(device)`` runs) swaps a quantized weight's contents, its consolidation tag
    included: the next fused call consolidates the members' new weights again (the group trusts a tagged weight's
    device and rows), and computes what the unfused model does with the same weights."""
    model = _quantized()
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model)
    x = torch.randn(2, 7, 64)
    attn = model["self_attn"]
    with torch.no_grad():
        for _ in range(2):
            attn(x)
        before = getattr(attn.q.weight, _FUSED_ATTR)
        for m in (model, ref):
            m._apply(lambda t: t * 2 if t.is_floating_point() and not isinstance(t, QuantizedTensor) else t.clone())
        assert getattr(attn.q.weight, _FUSED_ATTR, None) is None  # the contents were swapped, the tag with them
        assert torch.equal(attn(x), ref["self_attn"](x))
        after = getattr(attn.q.weight, _FUSED_ATTR)
    assert after is not before and attn.q.sibling[0].fused_calls == 2


def test_a_call_pattern_that_stops_matching_falls_back_and_finally_turns_the_group_off() -> None:
    model = _quantized()
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model)
    attn, group = model["self_attn"], model["self_attn"].q.sibling[0]
    x, other = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    calls = [{}, {}, {"value": other}, {}, {}, {"skip_v": True}, {}, {}, {"value": other}, {}, {}]
    fused = []
    with torch.inference_mode():
        for kw in calls:
            assert torch.equal(attn(x, **kw), ref["self_attn"](x, **kw)), kw
            fused.append(group.fused_calls)
    # observe, fuse, miss (v on another input), observe, fuse, miss (v's view left untaken), ... off for good
    assert fused == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 6] and group.resets == MAX_RESETS and group.plan == ()


def test_calls_above_the_size_cap_compute_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized()
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model, max_bytes=10 * 192 * 4)  # a q,k,v output of 10 float32 tokens
    widths = count_gemms(monkeypatch)
    small, big = torch.randn(2, 5, 64), torch.randn(2, 6, 64)
    with torch.inference_mode():
        for x in (small, small, big, small):
            want = ref["self_attn"](x)
            widths.clear()
            assert torch.equal(model["self_attn"](x), want)
            fused_call = 192 in widths
            assert fused_call == (x is small and len(widths) < 4), widths
    assert model["self_attn"].q.sibling[0].resets == 0  # a big call is no miss


def test_traced_calls_compute_each_member_alone() -> None:
    """Under torch.compile the parent's forward does not arm its groups (members compute alone on their row
    views of the consolidated storage); eager calls after it fuse again."""
    model = _quantized()
    ref = copy.deepcopy(model)
    fuse_sibling_projections(model)
    attn, x = model["self_attn"], torch.randn(2, 7, 64)
    group = attn.q.sibling[0]
    with torch.no_grad():
        want = ref["self_attn"](x)
        for _ in range(2):
            assert torch.equal(attn(x), want)
        assert group.fused_calls == 1
        for backend in ("eager", "aot_eager"):
            assert torch.equal(torch.compile(attn, backend=backend, fullgraph=True)(x), want)
        assert group.fused_calls == 1 and group.armed == 0
        assert torch.equal(attn(x), want) and group.fused_calls == 2


# ---- the node pack on ComfyUI's own classes ------------------------------------------------------------------
def _sd_model(comfy: Any) -> nn.Module:
    """attn1: self-attention (q,k,v share x); attn2: cross-attention with a context as wide as x (grouped as
    q,k,v; only k,v share the context); xattn: a narrower context (k,v grouped by width)."""
    attention = importlib.import_module("comfy.ldm.modules.attention")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.diffusion_model = nn.ModuleDict({
                "attn1": attention.CrossAttention(64, heads=4, dim_head=16, operations=torch.nn),
                "attn2": attention.CrossAttention(64, context_dim=64, heads=4, dim_head=16, operations=torch.nn),
                "xattn": attention.CrossAttention(64, context_dim=32, heads=4, dim_head=16, operations=torch.nn)})

    return Model()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 9, 64, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 32, generator=g)


def _run(patcher: Any, model: nn.Module, rounds: int = 3, load: dict | None = None,
         **attn1: Any) -> list[tuple[torch.Tensor, ...]]:
    """``rounds`` calls of each attention module with ``patcher`` patched in (``load``: ``patch_model``'s
    arguments, e.g. a lowvram budget) and unpatched after."""
    x, c64, c32 = _inputs()
    dm = model.diffusion_model
    with patched(patcher, **(load or {})), torch.inference_mode():  # as ComfyUI runs nodes
        return [(dm["attn1"](x, **attn1), dm["attn2"](x, context=c64), dm["xattn"](x, context=c32))
                for _ in range(rounds)]


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(torch.equal(u, v) for ra, rb in zip(a, b, strict=True) for u, v in zip(ra, rb, strict=True))


@pytest.fixture
def sd(comfy: Any) -> tuple[nn.Module, Any, Any, Any]:
    """(model, its ModelPatcher, the int8 clone without fusion, the int8 clone with it)."""
    import comfy.model_patcher

    model = _sd_model(comfy)
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    plain, r0 = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fuse_projections=False)),
                            cache=QuantCache())
    fused, r1 = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())
    assert r0.fused == [] and len(r1.converted) == 12
    assert r1.fused == ["attn1: to_q,to_k,to_v", "attn2: to_q,to_k,to_v", "xattn: to_k,to_v"]
    assert "3 projection groups fused" in r1.summary()
    return model, base, plain, fused


@pytest.mark.comfyui
def test_sd_cross_attention_runs_one_gemm_per_shared_input(sd: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """attn1's q,k,v and attn2's / xattn's k,v run as one GEMM each (after one observed round), with the same
    output as without fusion; the weights end up in one storage; unpatching restores the float model."""
    model, _, plain, fused = sd
    dm = model.diffusion_model
    x, c64, c32 = _inputs()
    with torch.no_grad():
        float_out = dm["attn1"](x)
    assert isinstance(fused.object_patches["diffusion_model.attn1.forward"], ArmedForward)
    layer = fused.object_patches["diffusion_model.attn1.to_k"]
    assert layer.sibling[1] == 1 and ComfyQuantLinear.derive(layer).sibling == layer.sibling
    widths = count_gemms(monkeypatch)
    ref = _run(plain, model)
    assert widths == [64] * 36
    widths.clear()
    with patched(fused), torch.inference_mode():
        got = []
        for r in range(3):
            got.append((dm["attn1"](x), dm["attn2"](x, context=c64), dm["xattn"](x, context=c32)))
            if r == 0:
                assert widths == [64] * 12  # the observed round computes every member alone
                widths.clear()
        assert widths == [192, 64, 64, 128, 64, 64, 128, 64] * 2
        members = [dm["attn1"].to_q, dm["attn1"].to_k, dm["attn1"].to_v]
        assert all(isinstance(m, ComfyQuantLinear) for m in members)
        assert len({_storage(m.qweight) for m in members}) == 1
        plans = [dm[n].to_k.sibling[0].plan for n in ("attn1", "attn2", "xattn")]
        assert plans == [(0, 1, 2), (1, 2), (0, 1)]
    assert _same(ref, got)
    assert type(dm["attn1"].to_q) is nn.Linear and not isinstance(dm["attn1"].forward, ArmedForward)
    with torch.no_grad():
        assert torch.equal(dm["attn1"](x), float_out)
    assert _same(_run(fused, model), ref)  # patched in again: the plans and the consolidated weights are kept


@pytest.mark.comfyui
def test_loras_and_weight_functions_on_one_member_give_the_unfused_output(sd: tuple, tmp_path: Path) -> None:
    """A comfyquant dynamic LoRA on attn1's q (a derived layer in the LoRA clone, its side path on its slice), a
    stock weight patch on xattn's k after the group was consolidated (``set_weight`` installs a new weight, in a
    full and in a lowvram load alike: the layers have no ``comfy_cast_weights``) and a ComfyUI weight wrapper on
    attn2's k (a ``weight_function``: that group computes alone): each gives the output it gives unfused."""
    from comfyquant.nodes.loras import LoraRequest, apply_loras

    model, _, plain, fused = sd
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "q.safetensors"
    save_file({"diffusion_model.attn1.to_q.lora_down.weight": torch.randn(4, 64, generator=g) * 0.3,
               "diffusion_model.attn1.to_q.lora_up.weight": torch.randn(64, 4, generator=g) * 0.3,
               "diffusion_model.attn1.to_q.alpha": torch.tensor(4.0)}, str(path))
    diff = torch.randn(64, 32, generator=g) * 0.1
    ref = _run(plain, model)
    assert _same(_run(fused, model), ref)  # consolidated
    lowvram = {"device_to": torch.device("cpu"), "lowvram_model_memory": 1}
    xattn = fused.object_patches["diffusion_model.xattn.to_k"].sibling[0]
    outs, counts = [], []
    for clone in (plain, fused):
        lora, report = apply_loras(clone, [LoraRequest(str(path), 1.0)], "dynamic")
        assert report.dynamic == ["attn1.to_q"]
        lora.add_patches({"diffusion_model.xattn.to_k.weight": (diff,)}, 1.0)
        before = xattn.fused_calls
        full = _run(lora, model)
        middle = xattn.fused_calls
        outs.append((full, _run(lora, model, load=lowvram)))
        counts.append((middle - before, xattn.fused_calls - middle))
    assert counts == [(0, 0), (3, 3)]  # xattn's k,v: fused again with the patched k
    assert _same(outs[0][0], outs[1][0]) and _same(outs[0][1], outs[1][1])
    for a, b in zip(outs[1][0], ref, strict=True):  # the LoRA and the patch matter; attn2 is untouched
        assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[2], b[2])
    assert _same(_run(fused, model), ref)  # the clone without them is back to its own weights
    # last (ComfyUI never removes a weight wrapper from a layer without comfy_cast_weights after a full load)
    attn2 = fused.object_patches["diffusion_model.attn2.to_k"].sibling[0]
    wrapped = []
    for clone in (plain, fused):
        w = clone.clone()
        w.add_weight_wrapper("diffusion_model.attn2.to_k.weight", lambda t: t * 0.5)
        before = attn2.fused_calls
        wrapped.append(_run(w, model))
    assert attn2.fused_calls == before and attn2.plan == (1, 2)  # alone, and no miss
    assert _same(wrapped[0], wrapped[1]) and not torch.equal(wrapped[1][0][1], ref[0][1])


@pytest.mark.comfyui
def test_size_cap_and_a_value_on_another_input_compute_alone(comfy: Any, sd: tuple,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls above ``fuse_max_bytes`` compute alone. ``attn1(x, value=other)`` (what an attn1 patch may hand
    over) gives v another input: it computes alone, the group observes again and fuses q,k only; plain calls
    after that show the plan is too small: observed again, q,k,v. Every output is the unfused one."""
    model, base, plain, _ = sd
    capped, _ = adapt_model(base, AdapterSettings(format="int8", runtime=RuntimeOptions(fuse_max_bytes=10_000)),
                            cache=QuantCache())
    widths = count_gemms(monkeypatch)
    got = _run(capped, model)
    assert 192 not in widths and widths.count(128) == 4, widths  # attn1's 18 tokens x 192 x 4 bytes > 10,000
    assert _same(got, _run(plain, model))
    other = torch.randn(2, 9, 64)
    fused = adapt_model(base, AdapterSettings(format="int8"), cache=QuantCache())[0]
    group = fused.object_patches["diffusion_model.attn1.to_q"].sibling[0]
    state = []
    for kw in ({}, {"value": other}, {}):
        assert _same(_run(fused, model, rounds=4, **kw), _run(plain, model, rounds=4, **kw))
        state.append((group.plan, group.resets, group.fused_calls))
    # observe + 3 fused; a miss (the lead ran), observe q,k + 2 fused; a miss (the lead ran), observe + 2 fused
    assert state == [((0, 1, 2), 0, 3), ((0, 1), 1, 6), ((0, 1, 2), 2, 9)], state


@pytest.mark.comfyui
def test_wan_attention_fuses_and_a_saved_file_loads_fused(comfy: Any, tmp_path: Path) -> None:
    """ComfyUI's own ``WanModel`` (a tiny synthetic Wan 2.1 checkpoint): self-attention fuses q,k,v (``norm_q`` /
    ``norm_k`` and rope on the slices), cross-attention learns k,v; same output as without fusion. The MODEL
    saved after its groups consolidated (row views of one storage) loads with "Load Quantized Diffusion Model",
    which fuses the same groups through the library API, again with the unfused numbers."""
    import comfy.model_management
    import comfy.sd
    from safetensors.torch import load_file

    from comfyquant.nodes.loader import load_quantized_model
    from comfyquant.nodes.save import save_quantized_model
    from comfyquant.testing.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path / "wan.safetensors", "wan", "tiny", seed=1)
    base = comfy.sd.load_diffusion_model_state_dict(load_file(str(tmp_path / "wan.safetensors")),
                                                    model_options={"dtype": torch.float32})
    dm = base.model.diffusion_model
    assert type(dm).__name__ == "WanModel" and len(dm.blocks) == 2
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, dm.patch_embedding.weight.shape[1], 2, 8, 8, generator=g), torch.tensor([500.0]),
              torch.randn(1, 7, dm.text_embedding[0].weight.shape[1], generator=g))

    def forward(patcher: Any, rounds: int = 3) -> list[torch.Tensor]:
        comfy.model_management.load_models_gpu([patcher])
        with torch.inference_mode():
            return [patcher.model.diffusion_model(*inputs) for _ in range(rounds)]

    plain, _ = adapt_model(base, AdapterSettings(format="int8", model_type="wan",
                                                 runtime=RuntimeOptions(fuse_projections=False)), cache=QuantCache())
    fused, report = adapt_model(base, AdapterSettings(format="int8", model_type="wan"), cache=QuantCache())
    assert report.fused == [f"blocks.{i}.{a}: q,k,v" for i in range(2) for a in ("self_attn", "cross_attn")]
    ref = forward(plain)
    assert all(torch.equal(a, b) for a, b in zip(forward(fused), ref, strict=True))
    block = fused.model.diffusion_model.blocks[0]  # fused is the loaded clone
    assert block.self_attn.q.sibling[0].plan == (0, 1, 2) and block.cross_attn.q.sibling[0].plan == (1, 2)
    assert _storage(block.self_attn.q.qweight) == _storage(block.self_attn.v.qweight)
    path = tmp_path / "wan-int8.safetensors"
    save_quantized_model(fused, path)
    loaded = {}
    for on in (False, True):
        patcher, summary = load_quantized_model(path, RuntimeOptions(fuse_projections=on), torch.float32)
        assert summary.fused == (4 if on else 0) and ("4 projection groups fused" in summary.line()) == on
        loaded[on] = forward(patcher)
    assert all(torch.equal(a, b) for a, b in zip(loaded[True], loaded[False], strict=True))
    assert max(float((a - b).abs().max()) for a, b in zip(loaded[True], ref, strict=True)) < 1e-4
