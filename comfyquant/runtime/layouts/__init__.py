"""Built-in layouts, one per on-disk format the converter writes (importing registers them)."""

from comfyquant.runtime.layouts.blockwise import Int8BlockLayout, Int8BlockParams
from comfyquant.runtime.layouts.fp8 import Fp8E5M2Layout, Fp8Layout, Fp8Params
from comfyquant.runtime.layouts.int8 import Int8Layout, Int8Params

__all__ = ["Fp8E5M2Layout", "Fp8Layout", "Fp8Params", "Int8BlockLayout", "Int8BlockParams", "Int8Layout",
           "Int8Params"]
