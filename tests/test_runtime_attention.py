"""``runtime.attention``: which SDPA calls the int8 attention scope routes (the kernel itself is checked under
the interpreter, ``triton_interp_attention``, and on the GPU, ``check_paths_gpu.check_attention``), and that
everything else passes through to SDPA unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention, eligible


class _Meta:
    """Shape / dtype / device stand-in: ``eligible`` reads only these (a CUDA tensor is not available here)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, cuda: bool = True) -> None:
        self.shape, self.dtype, self.is_cuda = torch.Size(shape), dtype, cuda

    def dim(self) -> int:
        return len(self.shape)


POL = AttentionPolicy(min_tokens=1000)
Q, KV = _Meta((1, 40, 2000, 128)), _Meta((1, 40, 2000, 128))


@pytest.mark.parametrize(("q", "k", "kwargs", "want"), [
    (Q, KV, {}, True),
    (Q, KV, {"scale": 0.1}, True),
    (Q, _Meta((1, 40, 999, 128)), {}, False),  # shorter than min_tokens: cuDNN is faster there
    (Q, KV, {"attn_mask": object()}, False),
    (Q, KV, {"is_causal": True}, False),
    (Q, KV, {"dropout_p": 0.1}, False),
    (Q, KV, {"enable_gqa": True}, False),
    (_Meta((1, 40, 2000, 96)), _Meta((1, 40, 2000, 96)), {}, False),  # head size not a power of two
    (_Meta((1, 40, 2000, 128), torch.float32), _Meta((1, 40, 2000, 128), torch.float32), {}, False),
    (_Meta((1, 40, 2000, 128), cuda=False), _Meta((1, 40, 2000, 128), cuda=False), {}, False),
    (_Meta((1, 8, 2000, 128)), KV, {}, False),  # heads differ (GQA layouts)
    (_Meta((40, 2000, 128)), _Meta((40, 2000, 128)), {}, False),
])
def test_eligible(q: _Meta, k: _Meta, kwargs: dict, want: bool) -> None:
    with torch.no_grad():
        assert eligible(q, k, k, POL, kwargs) is want  # type: ignore[arg-type]


def test_grad_mode_is_never_routed() -> None:
    with torch.enable_grad():
        assert not eligible(Q, KV, KV, POL, {})  # type: ignore[arg-type]


def test_scope_passes_other_calls_through_bit_identical() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad(), QuantizedAttention(AttentionPolicy(min_tokens=1)) as mode:
        got = F.scaled_dot_product_attention(q, k, v)  # CPU: not eligible, SDPA itself
        mm = q @ k.transpose(-1, -2)  # any other op untouched
    assert torch.equal(got, want) and torch.equal(mm, q @ k.transpose(-1, -2)) and mode.routed == 0


def test_emulated_scope_runs_the_schemes_reference_on_the_cpu() -> None:
    """``emulate``: CPU calls run ``reference.int8_attention_ref`` (the kernel's scheme, its default blocks): close
    to exact attention, not equal to it (quantization happened), and the routed count says so."""
    from comfyquant.runtime.kernels.reference import int8_attention_ref

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 150, 32, generator=g) for _ in range(3))
    k = k + 2 * torch.randn(32, generator=g)  # a per-channel offset the scheme removes before quantizing
    exact = F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad(), QuantizedAttention(AttentionPolicy(min_tokens=100, emulate=True)) as mode:
        got = F.scaled_dot_product_attention(q, k, v)
        short = F.scaled_dot_product_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50])  # below min_tokens
    assert mode.routed == 1 and torch.equal(got, int8_attention_ref(q, k, v, 128, 64).float())
    err = float((got - exact).norm() / exact.norm())
    assert 1e-4 < err < 2e-2, err
    assert torch.equal(short, F.scaled_dot_product_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50]))


def test_quantize_off_routes_nothing_and_cudnn_order_is_for_cuda_calls_only() -> None:
    """``quantize=False``: even an emulated scope runs SDPA itself; ``cudnn_first`` changes SDPA's backend order
    for CUDA calls only (checked on the GPU by ``check_paths_gpu.check_attention_cudnn``), so CPU calls come
    out bit-identical and uncounted."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    policy = AttentionPolicy(min_tokens=1, emulate=True, quantize=False, cudnn_first=True)
    with torch.no_grad(), QuantizedAttention(policy) as mode:
        got = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got, want) and mode.routed == 0 and mode.cudnn == 0
