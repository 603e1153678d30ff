"""A tensor's in-place version, readable for every tensor ComfyUI hands us.

ComfyUI executes nodes under ``torch.inference_mode``, so weights loaded and quantized there are inference
tensors, which have no version counter (reading ``_version`` raises). Their version reads as -1: they cannot be
modified in place outside inference mode, and ComfyUI restores any weight it patches in place before we read it.
"""

from __future__ import annotations

import torch


def version(t: torch.Tensor) -> int:
    """``t._version``, or -1 for an inference tensor (no counter)."""
    return -1 if t.is_inference() else t._version
