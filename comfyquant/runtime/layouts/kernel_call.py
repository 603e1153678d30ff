"""The call from a layout's linear into the kernels of its format's kernel kind.

Until the kernel table lands (one generic op per kind), this routes the three existing kinds to
``kernels.dispatch``; any other kind runs the weight-only reference (dequantize + ``F.linear``).
"""

from __future__ import annotations

import torch

from comfyquant.runtime.kernels import dispatch


def run_kernel(kind: str | None, x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
               bias: torch.Tensor | None, opts: tuple[int, ...], *, out_dtype: torch.dtype,
               backend: str | None) -> torch.Tensor:
    """``x @ dequant(w)^T + bias`` through the kernels of ``kind``."""
    if kind == "int8":
        return dispatch.int8_linear(x, w, scales[0], bias, convrot_group=opts[0] or None, out_dtype=out_dtype,
                                    backend=backend)
    if kind == "int8_block":
        return dispatch.int8_block_linear(x, w, scales[0], bias, block=opts[0], out_dtype=out_dtype,
                                          backend=backend)
    if kind == "fp8":
        return dispatch.fp8_linear(x, w, scales[0], bias, input_scale=scales[1], out_dtype=out_dtype,
                                   backend=backend)
    raise NotImplementedError(f"no kernels for kind {kind!r}")
