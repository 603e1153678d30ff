"""LoRAs on a live (quantized) model: ``apply(model, lora, strength, mode)`` and ``remove(model, handle)``.

* ``mode="bake"``: each targeted weight is dequantized to float32, changed exactly as a merge would change it
  (ComfyUI's adapter semantics, ``adapters.py``) and requantized into the same layout with fresh scales
  (round to nearest, or stochastic rounding with ``stochastic=True``); float layers are changed in float32 and
  cast back. Removing a bake restores the original tensors (kept by the handle), bit for bit.
* ``mode="dynamic"``: the quantized weights stay untouched; each targeted ``QuantLinear`` gets a low-rank side
  path (``sidepath.py``) that adds ``x -> A -> B`` to its output, every dynamic LoRA on the layer concatenated
  into one pair of matmuls. Plain ``nn.Linear`` layers get the same side path through a forward hook.

Layers are found by the model's own parameter names (``double_blocks.0.img_attn.qkv.weight``), with the key
mapping the converter uses, so the LoRA formats ``comfyquant convert --merge-lora`` accepts work here too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.errors import UserError
from comfyquant.lora.adapters import bias_delta, low_rank, patch_weight, swap_halves
from comfyquant.lora.files import LoRAFile, read_lora
from comfyquant.lora.keymap import build_keymap
from comfyquant.lora.merge import FileMatch, Patch, bind_loras
from comfyquant.lora.rounding import dequantize_f32, requantize
from comfyquant.lora.sidepath import LoRASidePath, SideEntry
from comfyquant.runtime.nn import QuantLinear
from comfyquant.runtime.tensor import QuantizedTensor

MODES = ("dynamic", "bake")
_IDS = itertools.count(1)


@dataclass
class LoRAHandle:
    """What one ``apply`` did: the layers it changed and how to undo it (pass to :func:`remove`)."""

    id: int
    lora: str
    strength: float
    mode: str
    match: FileMatch
    layers: list[str] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    removed: bool = False

    def __str__(self) -> str:
        return f"{self.mode} LoRA {self.lora} x{self.strength:g} on {len(self.layers)} layers ({self.match.line()})"


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in itertools.chain(model.named_parameters(), model.named_buffers())}


def _owner(model: nn.Module, tensor: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = tensor.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def apply(model: nn.Module, lora: str | Path | LoRAFile, strength: float = 1.0, mode: str = "dynamic", *,
          stochastic: bool = False, seed: int = 0) -> LoRAHandle:
    """Apply one LoRA file to ``model`` (see the module docstring); returns the handle that :func:`remove` takes.

    Raises ``UserError`` for a LoRA that matches no layer, a shape mismatch, or an adapter the mode cannot run
    (DoRA / ``set`` adapters and conv layers need ``mode="bake"``). Partial matches are reported in
    ``handle.match``.
    """
    if mode not in MODES:
        raise UserError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    lf = lora if isinstance(lora, LoRAFile) else read_lora(lora)
    km = build_keymap(_shapes(model))
    bound = bind_loras([lf], [strength], km, f"the {type(model).__name__} model")
    handle = LoRAHandle(next(_IDS), lf.name, strength, mode, bound.matches[0])
    if mode == "dynamic":
        _check_dynamic(model, bound.by_tensor)
    gen = torch.Generator().manual_seed(seed) if stochastic else None
    try:
        for tensor, patches in bound.by_tensor.items():
            if mode == "bake":
                _bake(model, tensor, bound, handle, stochastic, gen)
            elif not tensor.endswith(".bias") or tensor[: -len(".bias")] + ".weight" not in bound.by_tensor:
                _dynamic(model, tensor, patches, bound.by_tensor, handle)
    except BaseException:
        _undo(handle)
        raise
    return handle


def remove(model: nn.Module, handle: LoRAHandle) -> None:
    """Undo one :func:`apply` (baked LoRAs in reverse order of applying, dynamic ones in any order)."""
    if handle.removed:
        raise UserError(f"LoRA {handle.lora} was already removed")
    _undo(handle)
    handle.removed = True


def _undo(handle: LoRAHandle) -> None:
    while handle.undo:
        handle.undo[-1]()  # a step that refuses (bake removed out of order) stays, so a later remove can finish
        handle.undo.pop()


def _check_dynamic(model: nn.Module, by_tensor: dict[str, list[Patch]]) -> None:
    for tensor, patches in by_tensor.items():
        mod, attr = _owner(model, tensor)
        where = f"{patches[0].lora.path}: module '{patches[0].adapter.module}' ({tensor})"
        if not isinstance(mod, (QuantLinear, nn.Linear)) or attr not in ("weight", "bias"):
            raise UserError(f"{where}: dynamic LoRAs run on linear layers only ({type(mod).__name__}); "
                            "use mode='bake'")
        for p in patches:
            if p.adapter.dora_key is not None or p.adapter.kind == "set":
                raise UserError(f"{where}: {'DoRA' if p.adapter.dora_key else 'set_weight'} adapters rescale or "
                                "replace the weight, which a side path cannot do; use mode='bake'")


def _bake(model: nn.Module, tensor: str, bound: Any, handle: LoRAHandle, stochastic: bool,
          gen: torch.Generator | None) -> None:
    mod, attr = _owner(model, tensor)
    old = getattr(mod, attr)
    if isinstance(old, QuantizedTensor):
        w = bound(tensor, dequantize_f32(old))
        new: torch.Tensor = requantize(w, old, stochastic=stochastic, generator=gen)
    else:
        w = bound(tensor, old.detach().to(torch.float32, copy=True))
        new = w.to(old.dtype)
    param = nn.Parameter(new, requires_grad=False)
    setattr(mod, attr, param)

    def restore() -> None:
        if getattr(mod, attr) is not param:
            raise UserError(f"cannot remove baked LoRA {handle.lora}: {tensor} was changed after it (remove "
                            "baked LoRAs in reverse order of applying)")
        setattr(mod, attr, old)

    handle.undo.append(restore)
    handle.layers.append(tensor)


def _dynamic(model: nn.Module, tensor: str, patches: list[Patch], by_tensor: dict[str, list[Patch]],
             handle: LoRAHandle) -> None:
    mod, attr = _owner(model, tensor)
    weight = mod.weight
    device, dtype = weight.device, weight.dtype
    out_f, in_f = weight.shape
    entry = SideEntry()
    if attr == "weight":
        downs, ups, dense = [], [], None
        for p in patches:
            pair = low_rank(p.adapter, p.lora, device)
            if pair is None:  # LoHa, LoKr, Tucker, diff: its exact dense difference
                d = torch.zeros(p.target.target_shape, device=device)
                patch_weight(d, p.adapter, p.lora, p.strength, swap_halves if p.target.swap else None)
                full = torch.zeros(out_f, in_f, device=device)
                _rows(full, p)[...] = d.reshape(full[_slice(p)].shape)
                dense = full if dense is None else dense + full
                continue
            down, up = pair
            up = up * p.strength
            full_up = torch.zeros(out_f, up.shape[1], device=device)
            _rows(full_up, p)[...] = swap_halves(up) if p.target.swap else up
            downs.append(down)
            ups.append(full_up)
        if downs:
            entry.down, entry.up = torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)
        entry.dense = None if dense is None else dense.to(dtype)
    bias_name = tensor[: -len(".weight")] + ".bias" if attr == "weight" else tensor
    for p in by_tensor.get(bias_name, []):
        full_b = torch.zeros(out_f, device=device)
        db = p.strength * bias_delta(p.adapter, p.lora, device)  # type: ignore[operator]
        _rows(full_b, p)[...] = swap_halves(db) if p.target.swap else db
        entry.bias = (full_b if entry.bias is None else entry.bias + full_b).to(dtype)
    _attach(mod, entry, handle)
    handle.layers.append(tensor[: tensor.rfind(".")])


def _slice(p: Patch) -> slice:
    return slice(p.target.rows[0], p.target.rows[1]) if p.target.rows else slice(None)


def _rows(t: torch.Tensor, p: Patch) -> torch.Tensor:
    return t[_slice(p)]


def _attach(mod: nn.Module, entry: SideEntry, handle: LoRAHandle) -> None:
    """Add ``entry`` to the layer's side path (creating it, and for plain ``nn.Linear`` a forward hook)."""
    side = mod.adapter if isinstance(mod, QuantLinear) else getattr(mod, "_comfyquant_lora", None)
    hook = None
    if side is None:
        side = LoRASidePath()
        if isinstance(mod, QuantLinear):
            mod.adapter = side
        else:
            hook = mod.register_forward_hook(lambda m, args, out: side(args[0], out))
            mod._comfyquant_lora = side  # type: ignore[assignment]
            mod._comfyquant_lora_hook = hook  # type: ignore[assignment]
    side.add(handle.id, entry)

    def detach() -> None:
        side.discard(handle.id)
        if side.entries:
            return
        if isinstance(mod, QuantLinear):
            mod.adapter = None
        else:
            mod._comfyquant_lora_hook.remove()  # type: ignore[operator]
            del mod._comfyquant_lora, mod._comfyquant_lora_hook

    handle.undo.append(detach)
