"""The registry of output formats: CLI name -> on-disk ComfyUI format string, storage dtype, loadability.

One table shared by the converter, ``inspect``, the runtime loader and the docs, so a format is
described in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfyquant.errors import UserError


@dataclass(frozen=True)
class FormatSpec:
    """One output format.

    ``comfy_format`` is the ``format`` string written into ``L.comfy_quant`` (None for plain casts such as
    fp16, which need no metadata). ``stock_comfy`` says whether stock ComfyUI 0.30.0 loads it.
    """

    name: str
    comfy_format: str | None
    storage_dtype: torch.dtype
    scaling: str  # "tensor" | "row" | "block" | "none"
    stock_comfy: bool
    rotated: bool
    description: str

    @property
    def is_quantized(self) -> bool:
        return self.comfy_format is not None


FORMATS: dict[str, FormatSpec] = {
    f.name: f
    for f in (
        FormatSpec("int8", "int8_tensorwise", torch.int8, "row", True, False,
                   "INT8 W8A8, one fp32 scale per output row ([N,1]); activations quantized per token"),
        FormatSpec("int8-tensor", "int8_tensorwise", torch.int8, "tensor", True, False,
                   "INT8 W8A8, one scalar fp32 scale for the whole weight"),
        FormatSpec("int8-rot", "int8_tensorwise", torch.int8, "row", True, True,
                   "INT8 W8A8 per-row, weight rotated by a group-wise regular Hadamard along K (convrot)"),
        FormatSpec("int8-block", "int8_blockwise", torch.int8, "block", False, False,
                   "INT8 with one fp32 scale per (block x block) tile; not loadable by stock ComfyUI 0.30"),
        FormatSpec("fp8", "float8_e4m3fn", torch.float8_e4m3fn, "tensor", True, False,
                   "FP8 e4m3fn with a scalar fp32 weight_scale"),
        FormatSpec("fp8-e5m2", "float8_e5m2", torch.float8_e5m2, "tensor", True, False,
                   "FP8 e5m2 with a scalar fp32 weight_scale"),
        FormatSpec("fp16", None, torch.float16, "none", True, False, "plain float16 cast"),
        FormatSpec("bf16", None, torch.bfloat16, "none", True, False, "plain bfloat16 cast"),
    )
}

# ComfyUI format strings -> the formats stock ComfyUI 0.30.0 accepts (QUANT_ALGOS of comfy/quant_ops.py).
STOCK_COMFY_FORMATS = frozenset(
    {"int8_tensorwise", "float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "convrot_w4a4"}
)
# Every ComfyUI format string this project can read (for inspect/edit/runtime).
KNOWN_COMFY_FORMATS = STOCK_COMFY_FORMATS | {"int8_blockwise"}


def get_format(name: str) -> FormatSpec:
    """Look a format up by CLI name; unknown names are a user error listing the choices."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown format '{name}'; choose one of: {', '.join(FORMATS)}") from None
