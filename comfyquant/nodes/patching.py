"""Weight patches (LoRA from stock nodes) on quantized layers, whichever way ComfyUI loaded the model.

ComfyUI patches a weight when it loads the module that holds it: for a fully loaded module it calls
``patch_weight_to_device``, which for our layers goes through ``ComfyQuantLinear.convert_weight`` /
``set_weight`` (dequantize, add the patch in float, requantize). Modules it leaves on the offload device
(lowvram) and every module under the dynamic-VRAM loader are not patched by ComfyUI unless they carry
ComfyUI's own cast machinery, which our layers do not. The ``ON_LOAD`` callback registered here patches
exactly those, so a LoRA reaches every quantized layer in every load mode, and resets our layers' weight
wrappers to the loading clone's (ComfyUI appends them per load without clearing on our layers). "Already
patched" is read from ComfyUI's own bookkeeping: the classic loader backs a weight up when it patches it and
drops the backup when it restores it; the dynamic loader restores every backup at the start of each load, so
there we always patch. Each load also drops what folded norms derived from their weights
(:func:`forget_derived`): under ``weight_inplace_update`` ComfyUI writes a patched weight, and its restore, into
the same inference tensor, which keeps no version counter to tell.
"""

from __future__ import annotations

from typing import Any

from comfyquant.nodes.ops import ComfyQuantLinear

CALLBACK_KEY = "comfyquant_quantized_patches"


def _module(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def reset_weight_functions(patcher: Any) -> None:
    """Give every quantized layer of ``patcher``'s model exactly ``patcher``'s weight wrappers. ComfyUI's classic
    loader appends a clone's wrappers to a module's ``weight_function`` / ``bias_function`` at each load and
    clears them only on modules with its cast machinery: on our layers (shared by every clone of an adapted
    model) a wrapper piled up once per load and ran in clones that never added it."""
    wrappers = patcher.weight_wrapper_patches
    for path, mod in patcher.model.named_modules():
        if isinstance(mod, ComfyQuantLinear):
            mod.weight_function = list(wrappers.get(f"{path}.weight", ()))
            mod.bias_function = list(wrappers.get(f"{path}.bias", ()))


def forget_derived(model: Any) -> int:
    """Call ``forget_derived()`` on every module of ``model`` that has one (``runtime.norms.FoldedNorm``) and on
    every module's instance ``forward`` that has one (a block forward holding modulation sites, set by an object
    patch or in place): the next call derives the norms' rows from the weights as loaded. Returns how many."""
    count = 0
    for mod in model.modules():
        for obj in (mod, mod.__dict__.get("forward")):
            forget = getattr(obj, "forget_derived", None)
            if forget is not None:
                forget()
                count += 1
    return count


def patch_quantized_layers(patcher: Any, *_args: Any, **_kwargs: Any) -> int:
    """Reset the quantized layers' weight wrappers to this load's (:func:`reset_weight_functions`), drop the
    folded norms' derived rows (:func:`forget_derived`), then apply pending patches of quantized layers that
    ComfyUI's load left unpatched; returns how many."""
    reset_weight_functions(patcher)
    forget_derived(patcher.model)
    count = 0
    for key in list(patcher.patches):
        path, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            continue
        mod = _module(patcher.model, path)
        if not isinstance(mod, ComfyQuantLinear) or getattr(mod, param, None) is None:
            continue
        if not patcher.is_dynamic() and key in patcher.backup:
            continue  # the classic loader (or an earlier call) patched it; unpatching clears the backup
        patcher.patch_weight_to_device(key, device_to=getattr(mod, param).device)
        count += 1
    return count


def register_patch_callback(patcher: Any) -> None:
    """Register :func:`patch_quantized_layers` on ``patcher`` (once; clones inherit it)."""
    from comfy.patcher_extension import CallbacksMP

    if not patcher.get_callbacks(CallbacksMP.ON_LOAD, CALLBACK_KEY):
        patcher.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, patch_quantized_layers)
