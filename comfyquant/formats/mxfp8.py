"""``mxfp8``: fp8-e4m3 ``[N, K]`` with one E8M0 (power-of-two) scale per 32 along K, stored swizzled as uint8.

Byte-identical to comfy-kitchen's ``quantize_mxfp8`` (``quant.mx``). Stock ComfyUI 0.30 loads it; it runs
natively (block-scaled ``_scaled_mm``) on SM >= 10 and is dequantized elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats.blockscaled import BlockScaledFormat
from comfyquant.formats.grids import FP8_E4M3
from comfyquant.quant import mx, swizzle


class Mxfp8Format(BlockScaledFormat):
    """OCP MX fp8: e4m3 elements, E8M0 block scales (block 32)."""

    name = "mxfp8"
    comfy_format = "mxfp8"
    aliases = ("mxfp8_e4m3", "mxfp8-e4m3")
    kernel_kind = "mxfp8"
    storage_dtype = torch.float8_e4m3fn
    element_grid = FP8_E4M3
    block_k = mx.BLOCK
    scale_dtype = torch.uint8
    bits = 8.0 + 8.0 / mx.BLOCK
    min_gpu = "blackwell"  # native kernels on SM >= 10 only; elsewhere dequantized (no speed gain)
    fallback = "fp8"  # K not a multiple of 32
    description = ("MXFP8: fp8 e4m3 with one power-of-two (E8M0) scale per 32 along K, swizzled; "
                   "native on SM >= 10, dequantized elsewhere")

    def choose_scales(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"weight_scale": swizzle.swizzle(mx.block_scales(w_t))}

    def quantize_input(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Activations as the native (Blackwell) kernel rounds them: mxfp8 blocks of 32."""
        q, s = mx.quantize(x.float())
        return mx.dequantize(q, s)

    def block_values(self, scales: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        return mx.e8m0_to_float(swizzle.unswizzle(scales["weight_scale"].view(torch.uint8), rows, cols))

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        return None  # the swizzled scale tensor is padded to 128-row tiles: quantized whole, not row by row


MXFP8 = Mxfp8Format()
