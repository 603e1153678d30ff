"""Load a quantized diffusion-model file into ComfyUI's own model class, its quantized layers run by comfyquant.

ComfyUI detects the architecture and builds the model with our op set (``nodes.ops.make_comfy_ops``): plain
layers load exactly as ComfyUI loads them, quantized layers (any format comfyquant's runtime reads, including
``int8_blockwise`` that stock ComfyUI 0.30 refuses) become :class:`ComfyQuantLinear` without ever holding a
float copy of their weight.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import QUANT_SUFFIX, decode_comfy_quant
from comfyquant.nodes.attention import enable_quantized_attention
from comfyquant.nodes.dit_blocks import fold_dit_blocks
from comfyquant.nodes.graphs import enable_cuda_graphs
from comfyquant.nodes.ops import ComfyQuantLinear, make_comfy_ops
from comfyquant.nodes.patching import register_patch_callback
from comfyquant.nodes.settings import RuntimeOptions
from comfyquant.nodes.unet_blocks import fold_unet_blocks
from comfyquant.runtime.fold import fold_input_activations
from comfyquant.runtime.norms import NormSpec, folds_into
from comfyquant.runtime.siblings import fuse_sibling_projections
from comfyquant.runtime.tensor import REGISTRY

logger = logging.getLogger("comfyquant.nodes")


@dataclass
class LoadSummary:
    """Formats of the quantized layers (format -> count) and how many layers stayed plain."""

    path: str
    formats: Counter = field(default_factory=Counter)
    plain_linears: int = 0
    folded: int = 0  # activation modules folded into the quantized layer they feed
    fused: int = 0  # sibling projection groups (q/k/v, gate/up) sharing one GEMM
    modulated: int = 0  # DiT blocks whose modulated norms their quantized layers apply (nodes.dit_blocks)

    def line(self) -> str:
        fmts = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) or "none"
        folded = f"; {self.folded} activations folded into their layer" if self.folded else ""
        fused = f"; {self.fused} projection groups fused into one GEMM each" if self.fused else ""
        if self.modulated:
            fused += f"; {self.modulated} blocks' modulated norms folded into their layers"
        return (f"comfyquant: loaded {Path(self.path).name}: quantized layers: {fmts}; "
                f"{self.plain_linears} plain linear layers{folded}{fused}")


def _quant_layers(sd: dict[str, torch.Tensor], prefix: str, path: str) -> dict[str, str]:
    """layer name (prefix stripped) -> format, refusing formats the runtime cannot read."""
    out: dict[str, str] = {}
    for key, t in sd.items():
        if not key.endswith(QUANT_SUFFIX):
            continue
        layer = key[: -len(QUANT_SUFFIX)]
        fmt = str(decode_comfy_quant(t).get("format"))
        if fmt not in REGISTRY.layouts:
            raise UserError(f"{Path(path).name}: layer {layer} uses quantization format {fmt!r}, which comfyquant's "
                            f"runtime does not read (it reads {', '.join(sorted(REGISTRY.layouts))})")
        out[layer[len(prefix):] if layer.startswith(prefix) else layer] = fmt
    return out


def swap_pending(dm: nn.Module, dtype: torch.dtype, runtime: RuntimeOptions) -> dict[str, str]:
    """Replace every op-set ``Linear`` holding deferred quantized tensors by a ComfyQuantLinear; name -> format."""
    done: dict[str, str] = {}
    for name, mod in list(dm.named_modules()):
        tensors = getattr(mod, "pending_quant", None)
        if not tensors:
            continue
        q = ComfyQuantLinear(mod.in_features, mod.out_features, "bias" in tensors, dtype=dtype)
        q.load_state_dict(tensors, strict=True)
        q.set_backend(runtime.backend_for(q.qweight.layout_cls.kernel_kind))
        parent, _, child = name.rpartition(".")
        setattr(dm.get_submodule(parent) if parent else dm, child, q)
        done[name] = q.qweight.layout_name
    return done


def load_quantized_model(path: str | Path, runtime: RuntimeOptions,
                         compute_dtype: torch.dtype | None = None) -> tuple[Any, LoadSummary]:
    """Build the ComfyUI ModelPatcher for a (quantized) diffusion-model file; UserError on bad files."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    path = str(path)
    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=metadata)  # legacy scaled-fp8 / header forms
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    if not any(k.startswith(prefix) for k in sd):
        prefix = ""
    wanted = _quant_layers(sd, prefix, path)
    options: dict[str, Any] = {"custom_operations": make_comfy_ops()}
    if compute_dtype is not None:
        options["dtype"] = compute_dtype
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata,
                                                       disable_dynamic=True)
    if patcher is None:
        raise UserError(f"{Path(path).name}: ComfyUI could not detect which diffusion model this file holds")
    model = patcher.model
    dm = model.diffusion_model
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if not dtype.is_floating_point:
        dtype = torch.bfloat16
    done = swap_pending(dm, dtype, runtime)
    missed = sorted(set(wanted) - set(done))
    if missed:
        layer = missed[0]
        try:
            kind = type(dm.get_submodule(layer)).__name__
        except AttributeError:
            kind = "nothing (no such module in this model)"
        raise UserError(f"{Path(path).name}: layer {layer} is stored as {wanted[layer]}, but the model has "
                        f"{kind} there; only linear layers can be quantized ({len(missed)} such layers)")
    summary = LoadSummary(path, Counter(done.values()))
    summary.plain_linears = sum(1 for m in dm.modules() if isinstance(m, nn.Linear))
    if runtime.fold_activations:  # gated MLPs too when fusion is on (their input projections run as one GEMM)
        summary.folded = len(fold_input_activations(dm, gated=runtime.fuse_projections, norms=runtime.fold_norms,
                                                    layer_norms=runtime.fold_layer_norms))
        if runtime.fold_norms and runtime.fold_layer_norms:  # SD1.x / SDXL blocks' LayerNorms, in place (the loader
            # owns the model)
            summary.folded += len(_fold_unet_in_place(dm, done))
    if runtime.fuse_projections:  # the loader owns this model: the parents' forwards are set on the instances
        summary.fused = len(fuse_sibling_projections(dm, runtime.fuse_max_bytes))
    if runtime.fold_activations and runtime.fold_norms:  # DiT blocks' modulated norms, as the adapter folds
        summary.modulated = len(fold_dit_blocks(patcher, dm, lambda name: name in done,
                                                functools.partial(_set_in_place, dm), lambda path: False,
                                                runtime.fuse_rope))
    register_patch_callback(patcher)
    if runtime.cuda_graphs:
        enable_cuda_graphs(patcher)
    enable_quantized_attention(patcher, runtime.attention)
    logger.info(summary.line())
    return patcher, summary


def _fold_unet_in_place(dm: nn.Module, done: dict[str, Any]) -> list[str]:
    """``nodes.unet_blocks``' fold on the loader's own model: norms and block forwards set in place, the
    consumer layers' ``input_norm`` with them (layers the file quantized, whose quantizer folds the norm)."""
    def fits(path: str, spec: NormSpec) -> bool:
        return path in done and folds_into(path, dm.get_submodule(path), spec)

    lines, sources = fold_unet_blocks(dm, fits, functools.partial(_set_in_place, dm), lambda path: False)
    for path, source in sources.items():
        dm.get_submodule(path).input_norm = source
    return lines


def _set_in_place(dm: nn.Module, path: str, obj: Any) -> None:
    """Set attribute ``path`` (dotted, below ``dm``) to ``obj``: a fold's module or ``forward`` on the loader's
    own model."""
    parent, _, name = path.rpartition(".")
    setattr(dm.get_submodule(parent) if parent else dm, name, obj)
