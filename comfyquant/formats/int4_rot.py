"""``int4-rot``: ComfyUI's ``convrot_w4a4``. Signed int4 packed two per byte (int8 ``[N, K/2]``, even element in
the low nibble), one fp32 ``weight_scale`` per output row (``[N]``), the weight rotated along K by the group-wise
regular Hadamard (``convrot_groupsize``, default 256) exactly as ``int8-rot``.

ComfyUI fixes ``quant_group_size`` = 64 (comfy-kitchen's int4 MMA needs K % 64 == 0) and reads ``linear_dtype``
(``int4`` default, or ``int8``). Scales: per-row MSE-optimal clipping (``quant.int4.mse_row_scales``, never worse
than comfy-kitchen's absmax / 7); ``scale_search=False`` gives comfy-kitchen's absmax scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.formats.base import AffineFormat, FormatShapeError, Params, TensorSlot, conf_value
from comfyquant.formats.grids import INT4, INT8
from comfyquant.formats.int8 import resolve_rot_group, rotate_hessian
from comfyquant.formats.scaling import Block
from comfyquant.quant import hadamard, int4

QUANT_GROUP = 64  # ComfyUI 0.30 passes quant_group_size=64 to comfy-kitchen for every convrot_w4a4 layer
LINEAR_DTYPES = ("int4", "int8")


class Int4RotFormat(AffineFormat):
    """W4A4 with a rotated weight: activations are rotated and quantized to int4 per row at run time."""

    name = "int4-rot"
    comfy_format = "convrot_w4a4"
    aliases = ("convrot_w4a4", "int4-convrot", "w4a4")
    kernel_kind = "int4_rot"
    storage_dtype = torch.int8
    element_grid = INT4
    # comfyquant's int4_rot kernel runs W4A8: rotated activations rounded per token to int8 (stock ComfyUI does
    # the same with linear_dtype "int8", which automatic precision writes; its default "int4" is W4A4)
    input_grid = INT8
    rotated = True
    bits = 4.0  # + 32 / K for the row scale
    options = ("convrot_groupsize", "linear_dtype", "scale_search")
    fallback = "int8-rot"  # K not a multiple of 64: same rotation, 8 bits
    description = ("INT4 W4A4 (ComfyUI convrot_w4a4): int4 packed two per byte, fp32 scale per output row, weight "
                   "rotated by a group-wise regular Hadamard along K")

    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> Block:
        return (1, None)

    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        opts = options or {}
        params = self._common(opts)
        if shape[1] % QUANT_GROUP:
            raise FormatShapeError(f"{self.name}: in_features {shape[1]} is not a multiple of {QUANT_GROUP} "
                                   "(comfy-kitchen's int4 kernels)")
        params["convrot_groupsize"] = resolve_rot_group(shape[1], opts.get("convrot_groupsize"), self.name)
        linear_dtype = opts.get("linear_dtype", "int4")
        if linear_dtype not in LINEAR_DTYPES:
            raise FormatShapeError(f"{self.name}: linear_dtype must be one of {', '.join(LINEAR_DTYPES)}, "
                                   f"got {linear_dtype!r}")
        if linear_dtype != "int4":
            params["linear_dtype"] = linear_dtype
        if not opts.get("scale_search", True):
            params["scale_search"] = False  # quantization-only: absmax scales (comfy-kitchen's); not in comfy_quant
        return params

    def comfy_quant(self, params: Mapping[str, Any]) -> dict[str, Any]:
        conf: dict[str, Any] = {"format": self.comfy_format, "convrot_groupsize": int(params["convrot_groupsize"])}
        if params.get("linear_dtype", "int4") != "int4":
            conf["linear_dtype"] = params["linear_dtype"]
        conf.update(super().comfy_quant(params))
        return conf

    def params_from_conf(self, conf: Mapping[str, Any]) -> Params:
        params = super().params_from_conf(conf)
        group = conf_value(conf, "convrot_groupsize", 256)
        if not isinstance(group, int) or isinstance(group, bool) or not hadamard.is_power_of_4(group) or group < 4:
            raise ValueError(f"convrot_groupsize {group!r} is not a power of 4")
        params["convrot_groupsize"] = group
        linear_dtype = conf_value(conf, "linear_dtype", "int4")
        if linear_dtype not in LINEAR_DTYPES:
            raise ValueError(f"convrot_w4a4 linear_dtype must be int4 or int8, got {linear_dtype!r}")
        if linear_dtype != "int4":
            params["linear_dtype"] = linear_dtype
        return params

    # ---- storage -------------------------------------------------------------------------------------------
    def storage_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        return (shape[0], shape[1] // 2)

    def logical_shape(self, stored: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, int] | None:
        return (stored[0], stored[1] * 2) if len(stored) == 2 else None

    def scale_slot_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        return (shape[0],)  # comfy-kitchen writes [N]; [N, 1] reads the same

    def shape_ok(self, slot: TensorSlot, got: tuple[int, ...]) -> bool:
        if slot.suffix == "weight_scale":
            return got in (slot.shape, (*slot.shape, 1))
        return got == slot.shape

    def describe_shape(self, slot: TensorSlot, params: Mapping[str, Any]) -> str:
        if slot.suffix == "weight_scale":
            return f"{list(slot.shape)} (one per output row)"
        return super().describe_shape(slot, params)

    def pack(self, codes: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return int4.pack_int4(codes)

    def unpack(self, stored: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return int4.unpack_int4(stored)

    # ---- math ----------------------------------------------------------------------------------------------
    def transform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return hadamard.rotate_weight(w, int(params["convrot_groupsize"]))

    def untransform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return hadamard.unrotate_weight(w, int(params["convrot_groupsize"]))

    def transform_hessian(self, h: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return rotate_hessian(h, int(params["convrot_groupsize"]))

    def choose_scales(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        search = bool(params.get("scale_search", True))
        s = int4.mse_row_scales(w_t, INT4.qmax) if search else int4.absmax_row_scales(w_t, INT4.qmax)
        return {"weight_scale": s.reshape(w_t.shape[0])}

    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        return (tensors.get("weight_scale"),), (int(params["convrot_groupsize"]),)


INT4_ROT = Int4RotFormat()
