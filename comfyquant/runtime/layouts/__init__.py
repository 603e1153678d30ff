"""Runtime layouts, one per ComfyUI ``format`` string, all built from the format registry (importing this
module creates the layouts of the formats registered so far; ``layout_class`` makes later ones on demand)."""

from comfyquant.runtime.layouts.generic import (
           FormatLayout,
           FormatParams,
           layout_class,
           layout_for_format,
           register_all,
)

register_all()

Int8Layout = layout_class("int8_tensorwise")
Int8BlockLayout = layout_class("int8_blockwise")
Fp8Layout = layout_class("float8_e4m3fn")
Fp8E5M2Layout = layout_class("float8_e5m2")

__all__ = [
           "FormatLayout",
           "FormatParams",
           "Fp8E5M2Layout",
           "Fp8Layout",
           "Int8BlockLayout",
           "Int8Layout",
           "layout_class",
           "layout_for_format",
           "register_all",
]
