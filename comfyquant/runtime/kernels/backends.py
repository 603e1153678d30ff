"""Hardware facts the backend choice reads (cached, read-only) and the ``BackendChoice`` record.

Nothing here is a setting: the per-kind backend tables live in ``registry`` (``register_kernel_kind``), the
automatic choice in each kind's ``choose`` (``builtin``), and callers override per call or per module.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"  # placeholder a traced call passes to the op; resolved inside the op at run time
# Compute capability from which GPUs have fp8 matrix units and Triton (3.6) an fp8 e4m3 type (Ada, Hopper and
# later): before it fp8 weights dequantize in torch and the int8 attention keeps p v in 16 bits
FP8_CC = (8, 9)


@dataclass(frozen=True)
class BackendChoice:
    """Which implementation runs a quantized linear, and why (shown by ``QuantLinear.extra_repr`` / bench);
    ``us`` / ``bf16_us``: the cost model's time per call for the pick and for bf16 ``F.linear`` on the same
    call, where the cost model decided (None elsewhere); ``gpu_us`` / ``bf16_gpu_us``: their GPU time alone (a
    near-tie's tie-breaker). What ``dense_copy.wants_copy`` compares."""

    name: str
    reason: str
    us: float | None = None
    bf16_us: float | None = None
    gpu_us: float | None = None
    bf16_gpu_us: float | None = None


# assume_constant_result: torch.compile treats these hardware facts as constants instead of tracing into
# torch.cuda / importlib calls (which break the graph on CUDA devices).
@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once; never imported on the CPU path)."""
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``; None for non-CUDA devices."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def device_cache_file(stem: str, version: int, device: torch.device, root: Path | None = None) -> Path:
    """``<root or ~/.cache/comfyquant>/<stem>-v<version>-<device>-<torch>-<triton>.json``: one file of measured
    facts per device model and software versions (a new torch or triton re-measures)."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    name = re.sub(r"[^A-Za-z0-9]+", "_", raw).strip("_")
    torch_v = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    base = root if root is not None else Path.home() / ".cache" / "comfyquant"
    return base / f"{stem}-v{version}-{name}-{torch_v}-{tv}.json"
