"""LoRAs on a quantized ComfyUI MODEL (the engine behind "Load LoRA (quantized model)").

The node follows ComfyUI's patching model: it clones the MODEL and changes only the clone, so the input MODEL,
and every other branch of the workflow, keeps its weights; removing a LoRA means not using the node. Files are
read by ``comfyquant.lora`` (every format it reads) and mapped onto the live model's own layer names.

* A quantized layer (from "Enable INT8 on MODEL" or "Load Quantized Diffusion Model") gets a new layer as an
  object patch of the clone: in ``dynamic`` mode it shares the quantized weight and adds the LoRAs as a
  low-rank side path (``y + (x A^T) B^T``, every LoRA on the layer in one pair of matmuls); in ``bake`` mode it
  holds the weight dequantized, changed in float32 and requantized with fresh scales. DoRA and ``set_weight``
  adapters rescale or replace the weight, so their layers are baked in either mode.
* Every other tensor (float layers the preset kept, norms, biases of float layers) gets a ComfyUI weight patch
  that applies comfyquant's merge when ComfyUI loads the model, in every load mode, like a stock LoRA.

Nodes in a chain stack: each new layer starts from the previous one (its weight and a copy of its side path).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.errors import UserError
from comfyquant.lora.files import read_lora
from comfyquant.lora.keymap import build_keymap
from comfyquant.lora.live import baked_tensor, dynamic_blocker, new_side_key, side_entry
from comfyquant.lora.merge import BoundMerge, FileMatch, bind_loras
from comfyquant.lora.sidepath import LoRASidePath
from comfyquant.nodes.ops import ComfyQuantLinear
from comfyquant.nodes.patching import register_patch_callback
from comfyquant.runtime.nn import QuantLinear

logger = logging.getLogger("comfyquant.nodes")

PREFIX = "diffusion_model."
MODES = ("dynamic", "bake")
MSG_NO_DIFFUSION = "Load LoRA (quantized model): the MODEL has no diffusion_model; returning it unchanged."


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA file and the strength it is applied with."""

    path: str
    strength: float


@dataclass
class LoraReport:
    """What the node did: per-file match lines, layers by how they were changed, notes."""

    mode: str
    matches: list[FileMatch] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)  # quantized layers given a side path
    baked: list[str] = field(default_factory=list)  # quantized layers requantized
    float_patched: list[str] = field(default_factory=list)  # float tensors patched through ComfyUI
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The node's text output: one line per LoRA file, the summary, then the notes."""
        summary = (f"comfyquant LoRA ({self.mode}): {len(self.dynamic)} quantized layers with a side path, "
                   f"{len(self.baked)} requantized, {len(self.float_patched)} float tensors patched")
        return [m.line() for m in self.matches] + [summary] + self.notes


def _module(patcher: Any, path: str) -> Any:
    return patcher.get_model_object(path)


def live_shapes(patcher: Any, dm: nn.Module) -> dict[str, tuple[int, ...]]:
    """``diffusion_model.<name>`` -> shape of every parameter, object patches respected (quantized layers report
    their logical ``[out, in]``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, live in dm.named_modules():
        if not name or live._modules:
            continue
        mod = _module(patcher, PREFIX + name)
        for pname, p in mod.named_parameters(recurse=False):
            if p is not None:
                shapes[f"{PREFIX}{name}.{pname}"] = tuple(p.shape)
    return shapes


def _adapter_class() -> type:
    """A ComfyUI weight adapter running comfyquant's merge on one float tensor (made on first use, so this
    module imports without ComfyUI). ComfyUI's dynamic loader rebuilds adapters as ``cls(loaded_keys, weights)``
    when it prefetches them; the binding rides in ``loaded_keys`` and ``weights`` is empty (the LoRA tensors are
    read from the file when the patch is applied)."""
    global _ADAPTER
    if _ADAPTER is None:
        from comfy.weight_adapter.base import WeightAdapterBase

        class ComfyQuantLoRAPatch(WeightAdapterBase):
            name = "comfyquant_lora"

            def __init__(self, loaded_keys: Any, weights: Any = ()) -> None:
                self.loaded_keys = loaded_keys  # a _Binding
                self.weights = list(weights)

            def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                                 offset: Any, function: Any, intermediate_dtype: torch.dtype = torch.float32,
                                 original_weight: Any = None) -> torch.Tensor:
                binding: _Binding = self.loaded_keys
                w = binding.bound(binding.tensor, weight.to(torch.float32, copy=True))
                w = w if function is None else function(w)
                return w.to(weight.dtype)

        _ADAPTER = ComfyQuantLoRAPatch
    return _ADAPTER


_ADAPTER: type | None = None


@dataclass(frozen=True, eq=False)
class _Binding:
    """The merge of this node's LoRAs and the tensor one ComfyUI patch applies it to."""

    bound: BoundMerge
    tensor: str

    def __iter__(self) -> Any:  # ComfyUI treats loaded_keys as a set of LoRA keys
        return iter(())


def _layer_of(tensor: str) -> tuple[str, str]:
    path, _, attr = tensor.rpartition(".")
    return path, attr


def apply_loras(patcher: Any, loras: Sequence[LoraRequest], mode: str = "dynamic") -> tuple[Any, LoraReport]:
    """The patched clone of ``patcher`` (or ``patcher`` itself when there is nothing to apply) and a report.

    UserError for an unknown mode, a LoRA that matches no layer or was made for another model (naming the file
    and its first key), and unreadable files."""
    import comfy.model_management

    if mode not in MODES:
        raise UserError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    report = LoraReport(mode)
    loras = [r for r in loras if r.strength != 0]
    dm = getattr(patcher.model, "diffusion_model", None)
    if not isinstance(dm, nn.Module):
        report.notes.append(MSG_NO_DIFFUSION)
        logger.warning(MSG_NO_DIFFUSION)
        return patcher, report
    if not loras:
        return patcher, report
    files = [read_lora(Path(r.path)) for r in loras]
    # the shared model back to its unpatched state: another clone's layers may be swapped in
    comfy.model_management.unload_model_and_clones(patcher)
    km = build_keymap(live_shapes(patcher, dm))
    bound = bind_loras(files, [r.strength for r in loras], km, "this MODEL's diffusion model")
    report.matches = bound.matches
    for m in bound.matches:
        if m.unmatched:
            logger.warning("comfyquant: %s", m.line())
    quant: dict[str, list[str]] = {}  # quantized layer path -> its patched tensors
    floats: list[str] = []
    for tensor in bound.by_tensor:
        path, attr = _layer_of(tensor)
        mod = _module(patcher, path)
        if isinstance(mod, QuantLinear) and attr in ("weight", "bias"):
            quant.setdefault(path, []).append(tensor)
        else:
            floats.append(tensor)
    clone = patcher.clone()
    device = torch.device(patcher.load_device)
    device = device if device.type == "cuda" else torch.device("cpu")
    key = new_side_key()
    for path, tensors in quant.items():
        clone.add_object_patch(path, _patched_layer(_module(patcher, path), path, tensors, bound, mode, key,
                                                    device, report))
    if floats:
        cls = _adapter_class()
        clone.add_patches({t: cls(_Binding(bound, t)) for t in floats}, 1.0)
        report.float_patched = floats
    clone.patches_uuid = uuid.uuid4()  # the clone's weights differ from its parent's
    register_patch_callback(clone)
    for line in report.lines()[len(report.matches):]:
        logger.info(line)
    return clone, report


def _patched_layer(old: QuantLinear, path: str, tensors: list[str], bound: BoundMerge, mode: str, key: int,
                   device: torch.device, report: LoraReport) -> ComfyQuantLinear:
    """The new layer for ``path``: ``old`` with this node's patches, as a side path or baked."""
    weight_t, bias_t = f"{path}.weight", f"{path}.bias"
    patches = bound.by_tensor.get(weight_t, [])
    why = dynamic_blocker(patches)
    name = path[len(PREFIX):]
    if mode == "dynamic" and why is None:
        new = ComfyQuantLinear.derive(old)
        anchor = weight_t if weight_t in bound.by_tensor else bias_t
        entry = side_entry(old.qweight, anchor, bound.by_tensor.get(anchor, []), bound.by_tensor)
        if new.adapter is None:
            new.adapter = LoRASidePath()
        new.adapter.add(key, entry)
        report.dynamic.append(name)
        return new
    if mode == "dynamic":
        report.notes.append(f"{name}: baked ({why})")
    store = old.qweight.device
    weight = None
    if weight_t in tensors:
        weight = baked_tensor(old.qweight, weight_t, bound, device=device).to(store)
    bias = None
    if bias_t in tensors:
        old_bias = old._parameters["bias"]
        bias = baked_tensor(old_bias.detach(), bias_t, bound, device=device).to(old_bias.device)
    report.baked.append(name)
    return ComfyQuantLinear.derive(old, weight=weight, bias=bias)
