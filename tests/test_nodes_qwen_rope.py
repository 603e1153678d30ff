"""Qwen-Image's fused attention path (``nodes.qwen_rope``) in ComfyUI 0.30's own ``QwenImageTransformer2DModel`` on
the CPU, where ``runtime.rope.norm_rope_parts`` runs its torch fallback (the same ops as the stock forward; the
kernel is checked under the interpreter and on the GPU): each stream's rows of the joint q / k / v and the output
projections give the unfolded clone's output, the sibling q / k / v group still runs as one GEMM, and the path
declines for an ``attn1_patch`` or a norm patched per call."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from comfyui_fixtures import patched
from comfyui_server_fixtures import rel_err
from test_nodes_wan_blocks import _adapted, _forwards, _qwen, _run

import comfyquant.nodes.qwen_rope as qwen_rope
from comfyquant.nodes.wan_blocks import FoldedQwenBlock

pytestmark = pytest.mark.comfyui


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of the joint path (``norm_rope_parts``, one per stream)."""
    calls = {"parts": 0}
    parts = qwen_rope.norm_rope_parts

    def counted_parts(*a: Any, **k: Any) -> Any:
        calls["parts"] += 1
        return parts(*a, **k)

    monkeypatch.setattr(qwen_rope, "norm_rope_parts", counted_parts)
    return calls


@pytest.mark.cpu_int8
def test_the_joint_path_computes_the_stock_attention(comfy: Any, counted: dict[str, int]) -> None:
    model = _qwen()
    _, plain, folded, _ = _adapted(model)  # on by default
    want = _run(model, plain)
    got = _run(model, folded)
    assert counted == {"parts": 4}  # two blocks, two streams each
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    with patched(folded):
        group = model.diffusion_model.transformer_blocks[0].attn.to_q.sibling[0]
    fused = group.fused_calls
    again = _run(model, folded)  # the group learned its plan on the first call: now one GEMM per stream
    assert group.fused_calls > fused and rel_err(again, want) < 1e-5


@pytest.mark.cpu_int8
def test_the_path_declines_an_attention_patch_and_a_patched_norm(comfy: Any, counted: dict[str, int]) -> None:
    model = _qwen()
    _, plain, folded, _ = _adapted(model)  # on by default
    seen = []

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> dict:
        seen.append(q.shape)
        return {}

    for p in (plain, folded):
        p.set_model_attn1_patch(patch)
    got, want = _run(model, folded), _run(model, plain)
    assert counted == {"parts": 0} and len(seen) == 4 and rel_err(got, want) < 1e-5
    forward = next(f for f in _forwards(folded).values() if isinstance(f, FoldedQwenBlock))
    assert forward.fused.weights() is not None
    forward.block.attn.norm_added_k.weight_function = [lambda t: t]
    try:
        assert forward.fused.weights() is None
    finally:
        forward.block.attn.norm_added_k.weight_function = []


def test_the_kernel_reads_the_rotations_qwen_image_passes(comfy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen-Image's forward casts ``EmbedND``'s rotations to the model's dtype (bf16 in ComfyUI): the kernel must
    take them as they come, or the fused path silently runs its torch fallback on the GPU (run 110's profile: no
    kernel, 1.6 ms a step slower than the stock ops)."""
    from comfyquant.runtime.rope import rope_fits

    qwen = importlib.import_module("comfy.ldm.qwen_image.model")
    seen: list[torch.Tensor] = []
    stock = qwen.apply_rope1

    def spy(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        seen.append(pe)
        return stock(x, pe)

    monkeypatch.setattr(qwen, "apply_rope1", spy)
    model = _qwen()
    dm = model.diffusion_model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 6, 48, generator=g)
    with torch.inference_mode():
        dm(x.bfloat16(), torch.tensor([0.3, 0.7]), ctx.bfloat16(), transformer_options={})
    assert seen and seen[0].dtype == torch.bfloat16  # what ComfyUI 0.30 passes
    tokens, head_dim = 6 + 16, 32  # text + 4 x 4 image patches
    assert all(rope_fits(pe, 2, tokens, head_dim) for pe in seen), [(p.dtype, tuple(p.shape)) for p in seen]
