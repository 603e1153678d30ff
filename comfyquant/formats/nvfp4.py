"""``nvfp4``: E2M1 packed two per byte (uint8 ``[N, K/2]``, even element in the high nibble), one fp8-e4m3 scale
per 16 along K (swizzled ``weight_scale``) and an fp32 global ``weight_scale_2``.

With ``scale_search`` off the bytes equal comfy-kitchen's ``quantize_nvfp4``; on (the default) each block keeps the
neighbouring e4m3 scale with the lowest squared error (``quant.nvfp4``). The global scale couples all rows, so
the weight is quantized whole. Stock ComfyUI 0.30 loads it; native on SM >= 10, dequantized elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats.base import Params, TensorSlot
from comfyquant.formats.blockscaled import BlockScaledFormat
from comfyquant.formats.grids import FP4_E2M1
from comfyquant.quant import fp4, nvfp4, swizzle


class Nvfp4Format(BlockScaledFormat):
    """NVIDIA FP4: E2M1 elements, e4m3 block scales (block 16), fp32 global scale."""

    name = "nvfp4"
    comfy_format = "nvfp4"
    aliases = ("nvfp4_e2m1",)
    kernel_kind = "nvfp4"
    storage_dtype = torch.uint8
    element_grid = FP4_E2M1
    block_k = nvfp4.BLOCK
    scale_dtype = torch.float8_e4m3fn
    bits = 4.0 + 8.0 / nvfp4.BLOCK
    min_gpu = "blackwell"  # native kernels on SM >= 10 only; elsewhere dequantized (no speed gain)
    options = ("scale_search",)
    fallback = "fp8"  # K not a multiple of 16
    description = ("NVFP4: E2M1 packed two per byte, one fp8 e4m3 scale per 16 along K (swizzled) and an fp32 "
                   "global scale; native on SM >= 10, dequantized elsewhere")

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        params = super().resolve(shape, options)
        if not (options or {}).get("scale_search", True):
            params["scale_search"] = False  # quantization-only: comfy-kitchen's RTN scales; not in comfy_quant
        return params

    def storage_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        return (shape[0], shape[1] // 2)

    def logical_shape(self, stored: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, int] | None:
        return (stored[0], stored[1] * 2) if len(stored) == 2 else None

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        return [*super().slots(shape, params), TensorSlot("weight_scale_2", torch.float32, ())]

    def pack(self, codes: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return fp4.pack_fp4(codes)

    def unpack(self, stored: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return fp4.unpack_fp4(stored)

    def choose_scales(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        g = nvfp4.global_scale(w_t)
        bs = nvfp4.block_scales(w_t, g, search=bool(params.get("scale_search", True)))
        return {"weight_scale": swizzle.swizzle(bs), "weight_scale_2": g}

    def block_values(self, scales: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        g = scales.get("weight_scale_2")
        if g is None:
            raise ValueError("format nvfp4 needs a weight_scale_2 (global scale)")
        bs = swizzle.unswizzle(scales["weight_scale"].view(torch.float8_e4m3fn), rows, cols)
        return g.float().reshape(()) * bs.float()  # float32 product: comfy-kitchen's dequantization

    def quantize_input(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Activations as the native (Blackwell) kernel rounds them: nvfp4 with a dynamic global scale."""
        codes, bs, g = nvfp4.quantize(x.float())
        return nvfp4.dequantize(codes, bs, g)

    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors.get("weight_scale"), tensors.get("weight_scale_2")), ()

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        return None  # the global scale is the whole weight's absmax


NVFP4 = Nvfp4Format()
