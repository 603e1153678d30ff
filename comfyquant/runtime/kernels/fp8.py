"""FP8 linear on sm_89+: Triton per-row (or static-scale) fp8 activation quantization + ``torch._scaled_mm``.

Scales: activations rowwise ``[M,1]`` (or the static scalar ``input_scale``), weight per-tensor scalar or
per-row ``[N]``; when either side is rowwise both are passed in the rowwise form ``_scaled_mm`` expects.
Imported lazily (GPU backends only).
"""

from __future__ import annotations

import torch

from comfyquant.runtime.kernels import triton_quant
from comfyquant.runtime.kernels.acts import Norm


def fp8_linear_scaled_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                         input_scale: torch.Tensor | None, out_dtype: torch.dtype, act: int = 0,
                         norm: Norm | None = None) -> torch.Tensor:
    """``act(x) @ (w_q * w_scale)^T + bias`` through ``torch._scaled_mm`` (``act``: an ``acts.INPUT_ACTS``
    code applied in the quantization kernel; ``norm``: an RMSNorm folded into it, dynamic scales only); K and N
    must be multiples of 16."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w_q.shape[0]
    x2d = x.reshape(-1, k)
    q, s_x = triton_quant.quantize_rows_fp8(x2d, w_q.dtype, input_scale, act=act, norm=norm)
    mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    if input_scale is not None and w_scale.numel() == 1:
        sa, sb = input_scale.float().reshape(()), w_scale.float().reshape(())
    else:
        sa = s_x.contiguous()
        sb = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
        # rowwise scaling takes a bf16 output (and bias) only
        mm_dtype = torch.bfloat16
    mm_bias = None if bias is None else bias.to(mm_dtype)
    out = torch._scaled_mm(q, w_q.t(), scale_a=sa, scale_b=sb, bias=mm_bias, out_dtype=mm_dtype)
    return out.to(out_dtype).reshape(*lead, n)
