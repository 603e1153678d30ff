"""The ``attention`` option of Enable INT8 on MODEL / the loader node, in ComfyUI 0.30's own attention code:
the override sits on the clone only, ComfyUI's attention function calls it, it keeps an override installed
before it, and calls the kernel cannot take (the CPU here) come out bit-identical to ComfyUI's own. The default
(``sdpa``) computes ComfyUI's ``attention_pytorch`` calls without its backend-order scope where SDPA picks the
same kernel anyway: bit-identical outputs here, the declined calls run ComfyUI's function. The kernel itself:
``triton_interp_attention`` (interpreter) and ``check_paths_gpu.check_attention`` (H200); the lean path's CUDA
decision: ``check_lean_attention_gpu.py``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from comfyquant.errors import UserError
from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.attention import (
    OVERRIDE_KEY,
    QuantizedAttentionOverride,
    enable_quantized_attention,
    policy_for,
)
from comfyquant.nodes.lean_attention import ComfyAttention, LeanSdpa, same_kernel
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui]


def _patcher(comfy: Any) -> Any:
    return comfy.sd.load_diffusion_model_state_dict(load_file(str(DIT_FIXTURE)), model_options={})


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 64, 4 * 32, generator=g) for _ in range(3))  # [B, T, heads * head_dim]


def test_policies() -> None:
    assert policy_for("sdpa") is None and policy_for("comfyui") is None and policy_for("auto") is None
    p = policy_for("int8")
    assert p is not None and p.min_tokens == 16384 and p.head_dims == (128,) and not p.pv_fp8
    assert p.quantize and p.cudnn_first  # the calls the int8 kernel does not take: cuDNN first
    assert policy_for("int8-fp8").pv_fp8
    c = policy_for("cudnn")
    assert c is not None and c.cudnn_first and not c.quantize
    with pytest.raises(ValueError, match="not one of"):
        policy_for("sage")
    with pytest.raises(UserError, match="attention 'sage' is not one of auto, sdpa, comfyui, cudnn, int8, int8-fp8"):
        RuntimeOptions(attention="sage")


def test_override_on_the_clone_runs_inside_comfyuis_attention(comfy: Any) -> None:
    from comfy.ldm.modules.attention import optimized_attention

    base = _patcher(comfy)
    calls: list[str] = []

    def earlier(func: Any, *args: Any, **kwargs: Any) -> Any:  # another node's override, set before ours
        calls.append(func.__name__)
        return func(*args, **kwargs)

    base.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = earlier
    clone, report = adapt_model(base, AdapterSettings(runtime=RuntimeOptions(attention="int8")))
    assert report.converted
    override = clone.model_options["transformer_options"][OVERRIDE_KEY]
    assert isinstance(override, QuantizedAttentionOverride) and override.previous is earlier
    assert base.model_options["transformer_options"][OVERRIDE_KEY] is earlier  # the input MODEL is unchanged
    q, k, v = _qkv()
    want = optimized_attention(q, k, v, 4)
    got = optimized_attention(q, k, v, 4, transformer_options=clone.model_options["transformer_options"])
    assert torch.equal(got, want)  # CPU tensors: not routed, ComfyUI's own SDPA call
    assert override.calls == 1 and override.routed == 0 and calls == [optimized_attention.__wrapped__.__name__]
    # ComfyUI clones model options by deep copy: the copy is a working override with the same policy and chain
    again = clone.clone().model_options["transformer_options"][OVERRIDE_KEY]
    assert isinstance(again, QuantizedAttentionOverride) and again.policy == override.policy
    assert again.previous is earlier


def test_comfyui_mode_installs_nothing_and_sdpa_keeps_an_earlier_override_alone(comfy: Any) -> None:
    clone, _ = adapt_model(_patcher(comfy), AdapterSettings(runtime=RuntimeOptions(attention="comfyui")))
    assert OVERRIDE_KEY not in clone.model_options.get("transformer_options", {})
    base = _patcher(comfy)

    def earlier(func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    base.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = earlier
    assert enable_quantized_attention(base, "sdpa") is None  # another node's override must run: nothing to add
    assert base.model_options["transformer_options"][OVERRIDE_KEY] is earlier


def _flux_forward(patcher: Any) -> torch.Tensor:
    """One call of the Flux-layout fixture's diffusion model with the patcher's transformer options."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, dm.img_in.in_features // dm.patch_size ** 2, 8, 8, generator=g)
    ctx = torch.randn(2, 6, dm.txt_in.in_features, generator=g)
    kw: dict[str, Any] = {"transformer_options": dict(patcher.model_options.get("transformer_options", {}))}
    if getattr(dm, "vector_in", None) is not None:
        kw["y"] = torch.randn(2, dm.vector_in.in_layer.in_features, generator=g)
    if getattr(dm, "guidance_in", None) is not None:
        kw["guidance"] = torch.tensor([3.5, 2.0])
    with torch.no_grad():
        return dm(x, torch.tensor([0.3, 0.8]), ctx, **kw).clone()


def test_default_attention_is_comfyuis_own_without_its_scope(comfy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default override computes ComfyUI's attention_pytorch calls itself: every call form bit-identical to
    ComfyUI's function (masks too), the ones it cannot reproduce (another attention function, a batch past the split
    limit) passed to ComfyUI's function, and a whole model's output unchanged. (ComfyUI picks its PyTorch attention
    on a CUDA machine; on this CPU it picks sub-quadratic attention, so the test calls and patches in the former.)"""
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules.attention import attention_basic
    from comfy.ldm.modules.attention import attention_pytorch as optimized_attention

    assert optimized_attention.__wrapped__ is ComfyAttention.load().function
    clone, _ = adapt_model(_patcher(comfy), AdapterSettings())
    opts = clone.model_options["transformer_options"]
    override = opts[OVERRIDE_KEY]
    assert isinstance(override, QuantizedAttentionOverride) and override.policy is None
    assert override.lean is not None and override.previous is None
    # the default is auto: the chooser sits in the lean path, and on CPU tensors it never runs cuDNN (no choice)
    assert RuntimeOptions().attention == "auto" and override.lean.chooser is not None
    order = ComfyAttention.load().order  # the chooser times the stock kernel under ComfyUI's backend order
    assert override.lean.chooser.order == (None if order is None else tuple(order))
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(3)
    q4, k4, v4 = (torch.randn(2, 4, 64, 32, generator=g) for _ in range(3))  # [B, H, T, D]
    kv77 = tuple(torch.randn(2, 77, 4 * 32, generator=g) for _ in range(2))  # cross-attention: other keys
    mask = torch.zeros(64, 64)
    mask[:, 40:] = -torch.inf  # (ComfyUI adds the batch and heads dims a mask lacks)
    lean = [((q, k, v, 4), {}), ((q, k, v, 2), {}), ((q, *kv77, 4), {}), ((q, k, v, 4), {"scale": 0.3}),
            ((q4, k4, v4, 4), {"skip_reshape": True}),
            ((q4, k4, v4, 4), {"skip_reshape": True, "skip_output_reshape": True}),
            ((q, k, v), {"heads": 4, "attn_precision": torch.float32}),
            ((q, k, v, 4), {"mask": mask}), ((q, k, v, 4), {"mask": mask.expand(2, 64, 64)}),
            ((q4, k4, v4, 4), {"skip_reshape": True, "mask": mask > -1}),
            # Qwen-Image passes its (usually None) mask positionally: optimized_attention_masked(q, k, v, heads,
            # attn_mask, skip_reshape=True); run 105 found these calls declined, so auto never reached them
            ((q4, k4, v4, 4, None), {"skip_reshape": True}), ((q, k, v, 4, mask), {}),
            ((q, k, v, 4, None, torch.float32, False, False), {})]
    for args, kw in lean:
        want = optimized_attention(*args, **kw)
        before = override.lean.calls
        got = optimized_attention(*args, **kw, transformer_options=opts)
        assert torch.equal(got, want) and override.lean.calls == before + 1, (args[3:], kw)
    assert override.may_route(q4, k4, v4, 4, None, None, True) is False  # policy None: nothing routed
    before = override.lean.calls  # another attention function: ComfyUI's own runs
    assert torch.equal(attention_basic(q, k, v, 4, transformer_options=opts), attention_basic(q, k, v, 4))
    assert override.lean.calls == before
    small = LeanSdpa(ComfyAttention(optimized_attention.__wrapped__, 1, None))  # ComfyUI splits a batch of 2
    assert small(optimized_attention.__wrapped__, q, k, v, 4) is None and small.calls == 0
    # a whole model: the Flux-layout fixture, adapted with the default attention and with ComfyUI's own
    monkeypatch.setattr(flux_math, "optimized_attention", optimized_attention)
    plain, _ = adapt_model(_patcher(comfy), AdapterSettings(runtime=RuntimeOptions(attention="comfyui")))
    assert torch.equal(_flux_forward(clone), _flux_forward(plain))
    assert override.lean.calls >= len(lean) + 1
    assert override.lean.chooser.chosen == 0 and override.lean.chooser.measured == 0
    # the deep copy ComfyUI makes per sampling call keeps the mode
    assert clone.clone().model_options["transformer_options"][OVERRIDE_KEY].lean.chooser is not None
    sdpa = QuantizedAttentionOverride(None, None, ComfyAttention.load())  # mode sdpa: no chooser
    assert sdpa.lean is not None and sdpa.lean.chooser is None


def test_same_kernel_reads_sdpas_state() -> None:
    """Without ComfyUI's backend order any call is SDPA's plain one; on the CPU, SDPA's choice is the same as inside
    ComfyUI's scope while its flash and math backends are both enabled (the scope enables them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 8, 16)
    comfy_order = [int(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
    assert same_kernel(None, q, q, q) and same_kernel(comfy_order, q, q, q)
    with sdpa_kernel([SDPBackend.MATH]):  # another node turned flash off: ComfyUI's scope would turn it back on
        assert not same_kernel(comfy_order, q, q, q) and same_kernel(None, q, q, q)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert not same_kernel(comfy_order, q, q, q)
    assert same_kernel(comfy_order, q, q, q)


def test_sdxl_style_blocks_compute_the_same_with_the_default_attention(comfy: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SD1.x / SDXL ``BasicTransformerBlock``s (self-attention, cross-attention on 7 context tokens, its
    ``attn_precision`` keyword) in ComfyUI's classes, adapted to int8 with the default attention and with
    ComfyUI's own: the same output, every attention call taken by the lean path (ComfyUI's PyTorch attention
    patched in, as ComfyUI picks it on a CUDA machine)."""
    import comfy.model_patcher
    from comfy.ldm.modules import attention as comfy_attention
    from torch import nn

    monkeypatch.setattr(comfy_attention, "optimized_attention", comfy_attention.attention_pytorch)
    torch.manual_seed(3)
    blocks = nn.ModuleList(comfy_attention.BasicTransformerBlock(64, 4, 16, context_dim=96, gated_ff=True,
                                                                 operations=nn) for _ in range(2))
    model = nn.Module()
    model.diffusion_model = nn.ModuleDict({"blocks": blocks})
    base = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    x0, ctx = torch.randn(2, 9, 64, generator=g), torch.randn(2, 7, 96, generator=g)
    outs = {}
    for mode in ("sdpa", "comfyui"):
        clone, _ = adapt_model(base, AdapterSettings(runtime=RuntimeOptions(attention=mode)))
        opts = clone.model_options.get("transformer_options", {})
        clone.patch_model()
        try:
            with torch.inference_mode():
                x = x0
                for i, block in enumerate(model.diffusion_model["blocks"]):
                    x = block(x, context=ctx, transformer_options={**opts, "block_index": i})
        finally:
            clone.unpatch_model()
        outs[mode] = x
        if mode == "sdpa":
            assert opts[OVERRIDE_KEY].lean.calls == 2 * len(blocks)  # each block's self- and cross-attention
    assert torch.equal(outs["sdpa"], outs["comfyui"])


def test_a_comfyui_whose_attention_pytorch_changed_signature_gets_no_lean_path(
        comfy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean path reproduces ComfyUI 0.30's ``attention_pytorch``; a ComfyUI whose function takes other
    parameters keeps its own attention for every call."""
    import functools

    from comfy.ldm.modules import attention as comfy_attention

    assert ComfyAttention.load().function is comfy_attention.attention_pytorch.__wrapped__

    def changed(q: Any, k: Any, v: Any, heads: int, mask: Any = None, new_option: bool = False, **kwargs: Any) -> Any:
        return q

    monkeypatch.setattr(comfy_attention, "attention_pytorch", functools.wraps(changed)(lambda *a, **kw: changed(*a, **kw)))
    assert ComfyAttention.load().function is None


def test_each_mode_computes_its_lean_calls_with_its_kernel_choice(comfy: Any) -> None:
    """``auto`` and the int8 modes measure per call shape (the int8 kernel's calls aside), ``cudnn`` takes cuDNN's
    kernel through the direct op wherever it can run (no backend-order scope, no timing), ``sdpa`` ComfyUI's."""
    from comfyquant.runtime.sdpa_choice import CudnnFirst, SdpaChooser

    kinds = {"auto": SdpaChooser, "int8": SdpaChooser, "int8-fp8": SdpaChooser, "cudnn": CudnnFirst,
             "sdpa": type(None)}
    for mode, kind in kinds.items():
        override = enable_quantized_attention(_patcher(comfy), mode)
        assert override is not None and override.lean is not None, mode
        assert type(override.lean.chooser) is kind, mode
        copied = copy.deepcopy(override)  # ComfyUI deep-copies model options per sampling call
        assert type(copied.lean.chooser) is kind and copied.choose == override.choose
    q, k, v = (t.reshape(2, 64, 4, 32).transpose(1, 2) for t in _qkv())
    first = CudnnFirst()
    assert first(q, k, v) is None and first.chosen == 0  # CPU tensors: the stock kernel runs
    with pytest.raises(ValueError, match="not measured or cudnn"):
        QuantizedAttentionOverride(None, None, ComfyAttention.load(), choose="fastest")


def test_every_mode_has_the_log_line_it_is_described_by() -> None:
    """The node logs what its attention mode does; the int8 modes say the rest of their calls run as ``auto``."""
    from comfyquant.nodes.attention import DESCRIPTIONS, MODES

    assert set(DESCRIPTIONS) == set(MODES)
    assert DESCRIPTIONS["cudnn"] == "cuDNN's kernel on every call of 1024+ keys"
    assert DESCRIPTIONS["int8-fp8"].endswith("from 16384 keys, the rest as auto")
