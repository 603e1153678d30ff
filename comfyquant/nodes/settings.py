"""The adapter's settings (frozen, owned by each patched model) and how they map onto the runtime.

Nothing here imports ComfyUI. The runtime options pass through to ``QuantizeConfig.backend`` and
``QuantLinear.set_backend``; the runtime chooses kernels, this module only translates the node's choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from comfyquant.errors import UserError
from comfyquant.presets.registry import MODEL_CHOICES
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import backends_for, kinds

# The node's format choices (CLI format names the runtime quantizes to), in menu order.
NODE_FORMATS = ("int8", "int8-rot", "fp8", "int4-rot")
OUTLIER_METHODS = ("none", "hadamard")
KITCHEN = "comfy-kitchen"
WEIGHT_ONLY = ("dequant", "triton_w8a16")  # backends that run small batches without quantizing activations


def available_formats() -> tuple[str, ...]:
    """The node formats this runtime can quantize to (``int4-rot`` appears once the runtime registers it)."""
    from comfyquant.runtime.quantize import layout_for

    out = []
    for name in NODE_FORMATS:
        try:
            layout_for(_probe_config(name))
        except (UserError, KeyError, ValueError):
            continue
        out.append(name)
    return tuple(out)


def _probe_config(fmt: str):
    from comfyquant.runtime.quantize import QuantizeConfig

    return QuantizeConfig(format=fmt)


def runtime_backends() -> tuple[str, ...]:
    """``auto`` plus the backend names the runtime offers (comfy-kitchen only where the runtime has it)."""
    names = {n for kind in kinds() for n in backends_for(kind)}
    out = ["auto", "triton", "torch"]
    if KITCHEN in names or KITCHEN.replace("-", "_") in names:
        out.append(KITCHEN)
    return tuple(out)


def model_types() -> tuple[str, ...]:
    """``auto`` and every diffusion-model preset (text-encoder and LoRA presets do not apply to a MODEL)."""
    from comfyquant.presets.registry import PRESETS

    return tuple(n for n in MODEL_CHOICES if n == "auto" or PRESETS[n].kind in ("diffusion", "any"))


@dataclass(frozen=True)
class RuntimeOptions:
    """How quantized layers run: ``backend`` (``auto`` or a backend name), whether small batches may take a
    weight-only kernel, ``use_triton`` (False: never Triton), ``cuda_graphs`` (the runtime's dispatch policy for
    graph-captured models) and ``prepack`` (reserved for prepacked weight layouts; recorded, no effect today)."""

    backend: str = "auto"
    small_batch_fallback: bool = True
    use_triton: bool | None = None
    prepack: bool = True
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.backend not in runtime_backends():
            raise UserError(f"runtime_backend {self.backend!r} is not one of {', '.join(runtime_backends())}")

    def backend_for(self, kind: str) -> str | DispatchPolicy | None:
        """What to pass as ``QuantizeConfig.backend`` / ``QuantLinear.set_backend`` for layers of kernel ``kind``:
        a backend name, a ``DispatchPolicy`` steering the runtime's automatic choice, or None (plain auto)."""
        names = backends_for(kind)
        if self.backend != "auto":
            name = self.backend
            if name == KITCHEN:
                name = next((n for n in names if n.replace("_", "-") == KITCHEN), KITCHEN)
            if name not in names:
                raise UserError(f"runtime_backend {self.backend!r} has no kernel for {kind} layers; this runtime "
                                f"offers {', '.join(names)} (or auto)")
            return name
        allow = [n for n in names if (self.small_batch_fallback or n not in WEIGHT_ONLY)
                 and (self.use_triton is not False or not n.startswith("triton"))]
        mode = "graph" if self.cuda_graphs else "eager"
        if len(allow) == len(names) and mode == "eager":
            return None
        return DispatchPolicy(mode=mode, allow=tuple(allow))


@dataclass(frozen=True)
class AdapterSettings:
    """Everything the Enable-INT8 node decides; a patched model keeps its own copy."""

    format: str = "int8"
    model_type: str = "auto"
    outlier_method: str = "none"
    bake_loaded_loras: bool = True
    log_progress: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def __post_init__(self) -> None:
        if self.format not in NODE_FORMATS:
            raise UserError(f"format {self.format!r} is not one of {', '.join(NODE_FORMATS)}")
        if self.outlier_method not in OUTLIER_METHODS:
            raise UserError(f"outlier_method {self.outlier_method!r} is not one of {', '.join(OUTLIER_METHODS)}")
        if self.model_type not in model_types():
            raise UserError(f"model_type {self.model_type!r} is not one of {', '.join(model_types())}")

    def quant_format(self) -> str:
        """The runtime format: ``hadamard`` turns ``int8`` into ``int8-rot`` (the rotated formats have it built in)."""
        if self.outlier_method == "hadamard":
            if self.format == "int8":
                return "int8-rot"
            if not self.format.endswith("-rot"):
                raise UserError(f"outlier_method 'hadamard' needs an int8 format; {self.format} has no rotated "
                                "variant (choose int8, int8-rot or int4-rot, or outlier_method none)")
        if self.format not in available_formats():
            raise UserError(f"format {self.format!r} is not available in this comfyquant runtime "
                            f"(available: {', '.join(available_formats())})")
        return self.format
