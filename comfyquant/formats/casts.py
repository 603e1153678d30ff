"""Plain casts: ``fp16`` and ``bf16`` weights, no ``comfy_quant``."""

from __future__ import annotations

import torch

from comfyquant.formats.base import CastFormat

FP16 = CastFormat("fp16", torch.float16, "plain float16 cast", ("float16", "half"))
BF16 = CastFormat("bf16", torch.bfloat16, "plain bfloat16 cast", ("bfloat16",))
