"""``cat((a, act(b)), -1)`` as one pass on CUDA (``kernels.triton_join``): a Flux single block's ``linear2`` input,
the attention output joined with the GELU of ``linear1``'s MLP half. Elsewhere the stock ops (``torch.cat`` of
``a`` and the activation in torch), so CPU results are the stock block's."""

from __future__ import annotations

import torch

from comfyquant.runtime.kernels.acts import INPUT_ACTS, apply_input_act
from comfyquant.runtime.kernels.backends import triton_available

JOIN_ACTS = ("gelu_tanh", "gelu", "silu")  # elementwise activations the kernel applies (act_kernels.input_act)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (``[B, L, K]``, unit last stride) as a ``[B L, K]`` view, or None where its rows do not flatten."""
    if t.dim() != 3 or t.stride(2) != 1 or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)):
        return None
    return t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), 1))


def join_act(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """``torch.cat((a, act(b)), -1)`` for ``[B, L, *]`` tensors of one dtype; ``act`` one of :data:`JOIN_ACTS`."""
    if act not in JOIN_ACTS:
        raise ValueError(f"join_act: activation {act!r} is not one of {', '.join(JOIN_ACTS)}")
    ra, rb = _rows(a), _rows(b)
    if (ra is None or rb is None or not a.is_cuda or not triton_available() or a.dtype != b.dtype
            or a.dtype not in (torch.float16, torch.bfloat16) or a.shape[:2] != b.shape[:2] or b.device != a.device
            or torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return torch.cat((a, apply_input_act(b, act)), -1)
    from comfyquant.runtime.kernels.triton_join import join_act_launch

    out = torch.empty((*a.shape[:2], a.shape[2] + b.shape[2]), dtype=a.dtype, device=a.device)
    join_act_launch(ra, rb, INPUT_ACTS[act], out.view(-1, out.shape[2]))
    return out
