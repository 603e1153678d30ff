"""FP8 formats (``float8_e4m3fn`` / ``float8_e5m2``): fp8 ``[N, K]``, one fp32 scale (scalar; ``[N, 1]`` from
other tools is read too), optional static fp32 ``input_scale`` for the activations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats.base import AffineFormat, Params, TensorSlot
from comfyquant.formats.grids import FP8_E4M3, FP8_E5M2, FloatGrid
from comfyquant.formats.scaling import Block


class Fp8Format(AffineFormat):
    """Scalar-scaled fp8; ``params["input_scale"]`` True adds a stored static activation scale."""

    kernel_kind = "fp8"
    bits = 8.0
    options = ("input_scale",)

    def __init__(self, name: str, grid: FloatGrid, comfy_format: str, description: str,
                 aliases: tuple[str, ...]) -> None:
        self.name, self.element_grid, self.comfy_format = name, grid, comfy_format
        self.input_grid = grid  # comfyquant's fp8 kernels: per-row dynamic fp8 activations (no input_scale)
        self.storage_dtype, self.description, self.aliases = grid.dtype, description, aliases

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        return (None, None)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        params = self._common(options)
        if (options or {}).get("input_scale"):
            params["input_scale"] = True
        return params

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        out = super().slots(shape, params)
        if params.get("input_scale"):
            out.append(TensorSlot("input_scale", torch.float32, ()))
        return out

    def shape_ok(self, slot: TensorSlot, got: tuple[int, ...]) -> bool:
        if slot.suffix == "weight_scale" and len(got) in (1, 2) and got[0] > 1:  # per-row scales of other tools
            return len(got) == 1 or got[1] == 1
        return super().shape_ok(slot, got)

    def describe_shape(self, slot: TensorSlot, params: Mapping[str, Any]) -> str:
        if slot.suffix in ("weight_scale", "input_scale"):
            return "a scalar"
        return super().describe_shape(slot, params)

    def choose_scales(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The absmax weight scale, plus a unit static activation scale when ``input_scale`` is asked for
        (ComfyUI then casts activations to fp8 unscaled, as it does with no ``input_scale`` at all)."""
        scales = super().choose_scales(w_t, params)
        if params.get("input_scale"):
            scales["input_scale"] = torch.ones((), dtype=torch.float32, device=w_t.device)
        return scales

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        return None

    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors.get("weight_scale"), tensors.get("input_scale")), ()


FP8 = Fp8Format("fp8", FP8_E4M3, "float8_e4m3fn", "FP8 e4m3fn with a scalar fp32 weight_scale",
                ("float8_e4m3fn", "fp8_e4m3fn", "fp8-e4m3"))
FP8_E5M2_FORMAT = Fp8Format("fp8-e5m2", FP8_E5M2, "float8_e5m2", "FP8 e5m2 with a scalar fp32 weight_scale",
                            ("float8_e5m2", "fp8_e5m2"))
