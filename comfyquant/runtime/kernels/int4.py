"""``int4_rot`` (ComfyUI's ``convrot_w4a4``) kernel math in torch: nibble codec, W4A8 reference, weight-only path.

Storage (comfy-kitchen's row-major packing, FORMAT.md): ``w`` int8 ``[N, K/2]``; byte ``j`` of a row holds
column ``2j`` in its low nibble and column ``2j+1`` in its high nibble, both two's-complement int4; one fp32
scale per row; the weight is stored rotated (``W_g @ H`` per group of ``convrot_group`` columns).

W4A8 (what ComfyUI's ``linear_dtype="int8"`` path computes): rotate the activations group-wise, quantize them
per token to int8 (absmax / 127, round-half-even), int32-accumulate against the unpacked int4 weight, then
``acc * s_x * s_w + bias`` in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfyquant.quant.hadamard import fast_hadamard
from comfyquant.quant.int4 import pack_int4, unpack_int4
from comfyquant.quant.int8 import quantize_rowwise

__all__ = ["pack_int4", "unpack_int4", "w4_dequant_linear", "w4a8_linear_ref"]  # the codec lives in quant.int4


def _row_scale(w_scale: torch.Tensor) -> torch.Tensor:
    return w_scale.float().reshape(1, -1) if w_scale.numel() > 1 else w_scale.float().reshape(())


def w4a8_linear_ref(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference W4A8: rotate x (float32), per-token int8, int32 GEMM with the unpacked weight, fp32 epilogue."""
    from comfyquant.runtime.kernels.reference import int_mm

    lead, k = x.shape[:-1], x.shape[-1]
    x2d = fast_hadamard(x.reshape(-1, k).float(), group)
    q, s_x = quantize_rowwise(x2d)
    acc = int_mm(q, unpack_int4(w_packed).t())
    out = acc.float() * s_x * _row_scale(w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*lead, w_packed.shape[0])


def w4_dequant_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only: unpack and scale W in x's float dtype, rotate x, ``F.linear`` (activations unquantized)."""
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    w = unpack_int4(w_packed).to(dt)
    w = w * (w_scale.to(dt).reshape(-1, 1) if w_scale.numel() > 1 else w_scale.to(dt))
    xr = fast_hadamard(x.to(torch.float32), group).to(dt)
    return F.linear(xr, w, None if bias is None else bias.to(dt)).to(out_dtype)
