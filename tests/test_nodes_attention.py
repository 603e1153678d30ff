"""The ``attention`` option of Enable INT8 on MODEL / the loader node, in ComfyUI 0.30's own attention code:
the override sits on the clone only, ComfyUI's attention function calls it, it keeps an override installed
before it, and calls the kernel cannot take (the CPU here) come out bit-identical to ComfyUI's own. The kernel
itself: ``triton_interp_attention`` (interpreter) and ``check_paths_gpu.check_attention`` (H200)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from comfyquant.errors import UserError
from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.nodes.adapter import adapt_model
from comfyquant.nodes.attention import OVERRIDE_KEY, QuantizedAttentionOverride, policy_for
from comfyquant.nodes.settings import AdapterSettings, RuntimeOptions

pytestmark = pytest.mark.comfyui


def _patcher(comfy: Any) -> Any:
    return comfy.sd.load_diffusion_model_state_dict(load_file(str(DIT_FIXTURE)), model_options={})


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 64, 4 * 32, generator=g) for _ in range(3))  # [B, T, heads * head_dim]


def test_policies() -> None:
    assert policy_for("sdpa") is None
    p = policy_for("int8")
    assert p is not None and p.min_tokens == 16384 and p.head_dims == (128,) and not p.pv_fp8
    assert p.quantize and p.cudnn_first  # the calls the int8 kernel does not take: cuDNN first
    assert policy_for("int8-fp8").pv_fp8
    c = policy_for("cudnn")
    assert c is not None and c.cudnn_first and not c.quantize
    with pytest.raises(ValueError, match="not one of"):
        policy_for("sage")
    with pytest.raises(UserError, match="attention 'sage' is not one of sdpa, cudnn, int8, int8-fp8"):
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


def test_sdpa_mode_installs_nothing(comfy: Any) -> None:
    clone, _ = adapt_model(_patcher(comfy), AdapterSettings())
    assert OVERRIDE_KEY not in clone.model_options.get("transformer_options", {})
