"""The folded Flux blocks' fused q / k norm + RoPE path (``nodes.flux_rope``, ``runtime.rope``) in ComfyUI 0.30's
own Flux class on the CPU. The Triton kernel runs only on CUDA (checked under the interpreter by
``triton_interp_rope`` and on the GPU by ``check_paths_gpu``), so here the path is forced on with its torch
fallback: the streams' rows written into the joint q / k / v, ComfyUI's ``optimized_attention`` called on them,
give the stock blocks' output bit for bit. It steps aside for a replaced attention function or a patched norm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from comfyui_fixtures import model_patcher
from test_nodes_dit_blocks import _forward, _plain_and_folded

from comfyquant.nodes.dit_blocks import block_replacements
from comfyquant.nodes.flux_rope import FusedQKRope
from comfyquant.runtime.rope import norm_rope_heads, rope_reference

pytestmark = pytest.mark.comfyui


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The fused path taken wherever its weights are usable (the kernel's device test left out); counts its
    joint (double-block) and single-block calls."""
    calls = {"joint": 0, "single": 0}
    joint, single = FusedQKRope.joint, FusedQKRope.single

    def counted_joint(self: FusedQKRope, *a: Any) -> Any:
        calls["joint"] += 1
        return joint(self, *a)

    def counted_single(self: FusedQKRope, *a: Any) -> Any:
        calls["single"] += 1
        return single(self, *a)

    monkeypatch.setattr(FusedQKRope, "applies", lambda self, qkv, w, pe, tokens: w is not None)
    monkeypatch.setattr(FusedQKRope, "joint", counted_joint)
    monkeypatch.setattr(FusedQKRope, "single", counted_single)
    return calls


@pytest.mark.cpu_int8
def test_the_fused_path_computes_the_stock_blocks(comfy: Any, dit_sd: dict, forced: dict[str, int]) -> None:
    base = model_patcher(comfy, dit_sd)
    plain, folded, _ = _plain_and_folded(base)
    want = _forward(plain)
    assert forced == {"joint": 0, "single": 0}  # the unfolded clone has no replacements
    got = _forward(folded)
    assert forced == {"joint": 2, "single": 2}  # every block's attention took it
    assert torch.equal(got, want) or (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.cpu_int8
def test_a_replaced_attention_function_keeps_the_stock_path(comfy: Any, dit_sd: dict, forced: dict[str, int],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another node swapping ``flux.layers.attention`` (a SageAttention patch, say) after the fold: the blocks
    call its function, with the stock q / k norms, and never the fused path."""
    import comfy.ldm.flux.layers as layers

    base = model_patcher(comfy, dit_sd)
    plain, folded, _ = _plain_and_folded(base)
    want = _forward(plain)
    stock, seen = layers.attention, []

    def theirs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(q.shape)
        return stock(q, k, v, **kw)

    monkeypatch.setattr(layers, "attention", theirs)
    got = _forward(folded)
    assert forced == {"joint": 0, "single": 0} and len(seen) == 4
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_a_norm_patched_per_call_keeps_the_stock_norm(comfy: Any, dit_sd: dict) -> None:
    """A q / k norm with a per-call weight function (ComfyUI's lowvram LoRA patches) or cast per call is not
    read by the kernel; a plain one is, with its eps."""
    base = model_patcher(comfy, dit_sd)
    _, folded, _ = _plain_and_folded(base)
    rep = block_replacements(folded)[("double_block", 0)]
    norm = rep.block.img_attn.norm
    w = rep.rope.weights(norm)
    assert w is not None and w[0] is norm.query_norm.weight and w[2] == norm.query_norm.eps
    norm.key_norm.weight_function = [lambda t: t * 2]
    try:
        assert rep.rope.weights(norm) is None
    finally:
        norm.key_norm.weight_function = []
    norm.query_norm.comfy_cast_weights = True
    try:
        assert rep.rope.weights(norm) is None
    finally:
        norm.query_norm.comfy_cast_weights = False


def test_norm_rope_heads_writes_each_streams_rows() -> None:
    """Two streams into joint buffers at their offsets: the stock ops (per-head RMSNorm, the join, RoPE over the
    joint sequence) on each; v joined as is; a single block's strided projection leaves v as its view."""
    g = torch.Generator().manual_seed(0)
    heads, d, lt, li = 2, 8, 3, 5
    pe = torch.randn(1, 1, lt + li, d // 2, 2, 2, generator=g)
    txt, img = torch.randn(2, lt, 3 * heads * d, generator=g), torch.randn(2, li, 3 * heads * d, generator=g)
    qw, kw = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    out = tuple(torch.full((2, heads, lt + li, d), float("nan")) for _ in range(3))
    norm_rope_heads(txt, heads, d, qw, kw, 1e-6, pe, out, 0)
    norm_rope_heads(img, heads, d, qw, kw, 1e-6, pe, out, lt)
    parts = [t.view(2, t.shape[1], 3, heads, d).permute(2, 0, 3, 1, 4) for t in (txt, img)]
    joined = [torch.cat((parts[0][i], parts[1][i]), dim=2) for i in range(3)]
    q = rope_reference(torch.nn.functional.rms_norm(joined[0], (d,), qw, 1e-6), pe)
    k = rope_reference(torch.nn.functional.rms_norm(joined[1], (d,), kw, 1e-6), pe)
    assert torch.equal(out[0], q) and torch.equal(out[1], k) and torch.equal(out[2], joined[2])
    wide = torch.randn(1, li, 3 * heads * d + 7, generator=g)
    sq, sk, sv = norm_rope_heads(wide, heads, d, None, None, None, None, write_v=False)
    view = wide[..., :3 * heads * d].view(1, li, 3, heads, d).permute(2, 0, 3, 1, 4)
    assert torch.equal(sq, view[0]) and torch.equal(sk, view[1]) and sv.data_ptr() == view[2].data_ptr()
    with pytest.raises(ValueError, match="write_v"):
        norm_rope_heads(txt, heads, d, qw, kw, 1e-6, pe, out, 0, write_v=False)
