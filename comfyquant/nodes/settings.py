"""The adapter's settings (frozen, owned by each patched model) and how they map onto the runtime.

Nothing here imports ComfyUI. The runtime options pass through to ``QuantizeConfig.backend`` and
``QuantLinear.set_backend``; the runtime chooses kernels, this module only translates the node's choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from comfyquant.errors import UserError
from comfyquant.formats.registry import GPU_GENERATIONS
from comfyquant.presets.registry import MODEL_CHOICES
from comfyquant.runtime.kernels.dense_copy import CopyBudget
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import backends_for, kinds
from comfyquant.runtime.siblings import DEFAULT_MAX_BYTES as DEFAULT_FUSE_MAX_BYTES

# The node's format choices (CLI format names the runtime quantizes to), in menu order; ``auto``: a format per
# layer, chosen for ``AdapterSettings.budget`` (docs/AUTO_PRECISION.md).
AUTO = "auto"
NODE_FORMATS = ("int8", "int8-rot", "fp8", "int4-rot", AUTO)
DEFAULT_BUDGET = "size=0.5"
OUTLIER_METHODS = ("none", "hadamard", "smoothquant")
SMOOTH_FORMATS = ("int8", "fp8")  # formats whose layers take SmoothQuant's per-input-channel pre_quant_scale
DEFAULT_ALPHA = 0.5
KITCHEN = "comfy-kitchen"
WEIGHT_ONLY = ("dequant", "triton_w8a16", "triton_w4a16")  # backends that run small batches without quantizing
# activations


def available_formats() -> tuple[str, ...]:
    """The node formats this runtime can quantize to (``int4-rot`` appears once the runtime registers it)."""
    from comfyquant.runtime.quantize import layout_for

    out = []
    for name in NODE_FORMATS:
        if name == AUTO:  # one layout per chosen layer format, not one to probe
            out.append(name)
            continue
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
    graph-captured models), ``prepack`` (reserved for prepacked weight layouts; recorded, no effect today) and
    ``fold_activations`` (a GELU/SiLU module right before a quantized layer is applied by that layer's kernel;
    with ``fold_norms`` too the norms ``runtime.norms`` knows: T5's and Llama-style text encoders' RMSNorms, DiT
    blocks' modulated LayerNorms / RMSNorms, and with ``fold_layer_norms`` CLIP's and SD1.x / SDXL transformer
    blocks' affine LayerNorms) and ``fuse_projections`` (sibling projections that read one input, attention q/k/v or a gated MLP's two
    halves, run as one GEMM per call whose fused output is at most ``fuse_max_bytes``; ``runtime.siblings``)
    and ``measure_backends`` (eager: time the candidate kernels once per layer shape and keep the fastest,
    cached per GPU, instead of the cost model's prediction) and ``attention`` (``auto``: the faster of ComfyUI's
    kernel and cuDNN's per call shape, measured; ``sdpa``: ComfyUI's; ``cudnn``: cuDNN's kernel on every long call;
    ``int8`` / ``int8-fp8``: long self-attention on the int8 kernel, the rest as ``auto``; ``nodes.attention``)
    and ``fuse_rope`` (the folded Flux-family and Qwen-Image blocks' q / k RMSNorms and RoPE in one kernel,
    ``nodes.flux_rope``, ``nodes.qwen_rope``) and ``dense_copy_mb`` (0: off; else up to that many MiB of 16-bit
    weight copies for the layers whose every quantized path the cost model puts over bf16: they run bf16's
    ``F.linear``, each at bf16's speed on its own, though SDXL's host-bound step ran slower with them: they save
    GPU time and cost host time, runs 119-122; ``runtime.kernels.dense_copy``). The budget is this object's own:
    each patched model gets one."""

    backend: str = "auto"
    small_batch_fallback: bool = True
    use_triton: bool | None = None
    prepack: bool = True
    cuda_graphs: bool = False
    fold_activations: bool = True
    fold_norms: bool = True
    # affine LayerNorms (CLIP's, SD1.x / SDXL transformer blocks') as one shared modulation row (with fold_norms). Run
    # 87's profile of SDXL's UNet in ComfyUI's class (H200): the same GPU time as unfolded, 15% less host time
    # (210 layer_norm launches a step gone); run 86's one noisy round had timed it 0.73x against 0.94x
    fold_layer_norms: bool = True
    measure_backends: bool = False
    attention: str = "auto"  # nodes.attention.MODES: the attention kernel per call (measured, cuDNN, int8)
    fuse_projections: bool = True
    fuse_max_bytes: int = DEFAULT_FUSE_MAX_BYTES  # larger calls are GPU-bound: each member computes alone
    # the folded Flux-family and Qwen-Image blocks' q / k norms, RoPE and stream join as one launch per stream
    # (nodes.flux_rope, nodes.qwen_rope; with fold_norms). ComfyUI's classes at 1024² on an H100: Flux 1.29x -> 1.41x
    # stock bf16 (runs 101-102), Qwen-Image 1.43x -> 1.62x (run 111, once the kernel took its bf16 rotations)
    fuse_rope: bool = True
    dense_copy_mb: int = 0
    _copies: CopyBudget | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        from comfyquant.nodes.attention import MODES

        if self.dense_copy_mb < 0:
            raise UserError(f"dense_copy_mb must be >= 0, got {self.dense_copy_mb}")
        object.__setattr__(self, "_copies", CopyBudget(self.dense_copy_mb << 20) if self.dense_copy_mb else None)

        if self.backend not in runtime_backends():
            raise UserError(f"runtime_backend {self.backend!r} is not one of {', '.join(runtime_backends())}")
        if self.attention not in MODES:
            raise UserError(f"attention {self.attention!r} is not one of {', '.join(MODES)}")
        if self.fuse_max_bytes < 0:
            raise UserError(f"fuse_max_bytes must be >= 0, got {self.fuse_max_bytes}")

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
        measure = self.measure_backends and mode == "eager"
        if len(allow) == len(names) and mode == "eager" and not measure and self._copies is None:
            return None
        return DispatchPolicy(mode=mode, allow=tuple(allow), measure=measure, copies=self._copies)

    @property
    def copy_budget(self) -> CopyBudget | None:
        """The dense copies' budget of the model these options run (None: copies off)."""
        return self._copies


@dataclass(frozen=True)
class AdapterSettings:
    """Everything the Enable-INT8 node decides; a patched model keeps its own copy."""

    format: str = "int8"
    model_type: str = "auto"
    outlier_method: str = "none"
    bake_loaded_loras: bool = True
    log_progress: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    budget: str = DEFAULT_BUDGET  # format auto only: size / sqnr budget ("size=0.5", "sqnr=30", ...)
    calibration_file: str = ""  # smoothquant: a calibration file (Capture Calibration / comfyquant calibrate)
    alpha: float = DEFAULT_ALPHA  # smoothquant's migration strength: s = max|x|^alpha / max|W|^(1 - alpha)
    target_gpu: str = "auto"  # format auto: the GPU generation to plan for ("auto": the model's load device)

    def __post_init__(self) -> None:
        if self.format not in NODE_FORMATS:
            raise UserError(f"format {self.format!r} is not one of {', '.join(NODE_FORMATS)}")
        if self.outlier_method not in OUTLIER_METHODS:
            raise UserError(f"outlier_method {self.outlier_method!r} is not one of {', '.join(OUTLIER_METHODS)}")
        if self.model_type not in model_types():
            raise UserError(f"model_type {self.model_type!r} is not one of {', '.join(model_types())}")
        if self.format == AUTO:
            from comfyquant.autoprec.budget import parse_budget

            parse_budget(self.budget)
        if self.target_gpu != "auto" and self.target_gpu not in GPU_GENERATIONS:
            raise UserError(f"target_gpu {self.target_gpu!r} is not one of auto, {', '.join(GPU_GENERATIONS)}")
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"alpha {self.alpha} must be between 0 and 1 (SmoothQuant's migration strength)")
        if self.outlier_method == "smoothquant" and not self.calibration_file.strip():
            raise UserError("outlier_method 'smoothquant' needs calibration statistics: set calibration_file to a "
                            "file written by Capture Calibration or `comfyquant calibrate`")

    def quant_format(self) -> str:
        """The runtime format: ``hadamard`` turns ``int8`` into ``int8-rot`` (the rotated formats have it built in);
        ``auto`` stays ``auto`` (the plan chooses rotated formats where they pay)."""
        if self.format == AUTO:
            if self.outlier_method != "none":
                raise UserError(f"outlier_method {self.outlier_method!r} does not apply to format auto: the plan "
                                "chooses rotated formats (int8-rot, int4-rot) per layer itself; use none")
            return AUTO
        if self.outlier_method == "smoothquant" and self.format not in SMOOTH_FORMATS:
            raise UserError(f"outlier_method 'smoothquant' applies to formats {' and '.join(SMOOTH_FORMATS)}; "
                            f"{self.format} rotates outliers away itself (use outlier_method none)")
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
