"""The linear layer the node pack puts into ComfyUI models, and the ComfyUI op set its loader builds models with.

``ComfyQuantLinear`` is a :class:`~comfyquant.runtime.nn.QuantLinear` that also speaks the ModelPatcher's
protocol: ``weight_function`` / ``bias_function`` lists (lowvram LoRA patches, weight wrappers), ``convert_weight``
/ ``set_weight`` (ComfyUI bakes a LoRA patch by dequantizing, patching in float and requantizing), and a weight
that may stay on the offload device (it is then moved per call). It has no ``comfy_cast_weights`` attribute on
purpose: ComfyUI then treats it as a plain module and moves its (small) quantized weights whole, in the classic
and the dynamic-VRAM loader alike, instead of staging them through buffers sized for ComfyUI's own tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comfyquant.lora.sidepath import LoRASidePath
from comfyquant.runtime.kernels.acts import Norm, apply_input_act, rms_norm
from comfyquant.runtime.nn import BOUND_ATTR, QuantLinear, bound_linear, run_linear
from comfyquant.runtime.tensor import QuantizedTensor
from comfyquant.runtime.versions import version


class ComfyQuantLinear(QuantLinear):
    """A quantized linear layer inside a ComfyUI model (object-patched in by the adapter or built by the loader)."""

    bias_in_input_dtype = True  # forward casts the bias (``_bias_as``); a fused sibling group does the same

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_function: list[Any] = []
        self.bias_function: list[Any] = []
        self._bias_cast: tuple[torch.Tensor, int, torch.Tensor] | None = None

    @classmethod
    def wrap(cls, weight: QuantizedTensor, bias: torch.Tensor | None) -> ComfyQuantLinear:
        """A layer around an already quantized weight (shared, not copied) and a float bias."""
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bias is not None, weight=weight, device=weight.device, dtype=weight.dtype)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return mod

    @classmethod
    def derive(cls, layer: QuantLinear, weight: QuantizedTensor | None = None,
               bias: torch.Tensor | None = None) -> ComfyQuantLinear:
        """A new layer for a patched MODEL: ``layer``'s weight and bias (shared, or the given replacements) and
        a copy of its side path, so adding LoRAs to the new layer leaves ``layer`` (the input MODEL's) as it is."""
        old_bias = layer._parameters["bias"]
        mod = cls.wrap(layer.qweight if weight is None else weight, old_bias if bias is None else bias)
        mod.input_act = getattr(layer, "input_act", None)  # its activation module was folded away
        mod.input_norm = layer.__dict__.get("input_norm")  # its norm module was folded away
        mod.sibling = getattr(layer, "sibling", None)  # its group reads members live: the new layer fuses too
        side = layer.adapter
        if side is not None:
            mod.adapter = side.copy() if isinstance(side, LoRASidePath) else side
        return mod

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ComfyQuantLinear:
        """``.to()`` / ``.cuda()`` move the side path's tensors with the layer (ComfyUI loads a model by moving
        its modules; the side path is a plain object that ``nn.Module`` would not see)."""
        super()._apply(fn, recurse)
        if isinstance(self.adapter, LoRASidePath):
            self.adapter = self.adapter.map_tensors(fn)
        return self

    def _bias_as(self, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``bias`` in ``dtype``, cast once and kept while the bias and its values stay the same (one cast
        kernel per call saved, and a stable object for the bound fast path)."""
        c = self._bias_cast
        if c is not None and c[0] is bias and c[1] == version(bias) and c[2].dtype == dtype:
            return c[2]
        cast = bias.to(dtype)
        if not torch.compiler.is_compiling():
            self._bias_cast = (bias, version(bias), cast)
        return cast

    # ---- ModelPatcher protocol -------------------------------------------------------------------------
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """What ComfyUI patches a LoRA into: the dequantized weight."""
        return weight.dequantize() if isinstance(weight, QuantizedTensor) else weight

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs: Any) -> torch.Tensor | None:
        """Requantize a patched float weight in this layer's format (scales recomputed; backend kept)."""
        qt = self.qweight
        layout = qt.layout_cls
        new = QuantizedTensor.from_float(weight.to(device=qt.device, dtype=qt.dtype), layout,
                                         **layout.requantize_kwargs(qt.params))
        if return_weight:
            return new
        self.weight = nn.Parameter(new, requires_grad=False)
        return None

    # ---- compute ---------------------------------------------------------------------------------------
    def _side_for(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """QuantLinear's optional side path (dynamic LoRAs), its tensors on ``x``'s device for this call."""
        side = getattr(self, "adapter", None)
        if isinstance(side, LoRASidePath) and side.device not in (None, x.device):  # left offloaded (lowvram)
            side = side.map_tensors(lambda t: t.to(x.device, non_blocking=True))
        return side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sib = self.sibling
        if sib is not None and sib[0].armed:  # a member of a fused group: its product may be stashed already
            y = sib[0].product(sib[1], x)
            if y is not None:  # its side path (dynamic LoRAs) included
                return y
        d = self.__dict__  # norm_for_call inline (older pickles lack input_norm)
        norm = d.get("call_norm")
        if norm is None:
            src = d.get("input_norm")
            norm = None if src is None else src.for_call()
            if norm is None and d.get("adapter") is None and not d["weight_function"] and not d["bias_function"] \
                    and not torch.compiler.is_compiling():
                # a plain call: its signature's plan where the bound call has one (None where x's device, dtype
                # or shape is new: weights left on the offload device, a bias to cast; the general path then)
                params = d["_parameters"]
                b = getattr(params["weight"], BOUND_ATTR, None)
                if b is not None and b[0] is params["bias"]:
                    y = b[1].plain(x, d.get("input_act"))
                    if y is not None:
                        return y
        return self._compute(x, norm)

    def _compute(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        params = self._parameters
        w = params["weight"]
        if w is None:
            w = self.qweight  # (raises: no weight loaded yet)
        bias = params["bias"]
        # left on the offload device by a partial (lowvram) load; read on the codes (a torch attribute of the
        # QuantizedTensor itself goes through its __torch_function__: about 1.3 µs a read, every call)
        if w.qdata.device != x.device:
            w = w.to(x.device, non_blocking=True)
            bias = None if bias is None else bias.to(x.device, non_blocking=True)
        if bias is not None and bias.dtype != x.dtype:
            bias = self._bias_as(bias, x.dtype)
        side = None if self.adapter is None else self._side_for(x)  # (most layers have no side path)
        act = getattr(self, "input_act", None)
        if self.weight_function or self.bias_function:
            # a patch ComfyUI applies on the fly (lowvram LoRA, weight wrapper): run it on the float weight
            x = apply_input_act(x if norm is None else rms_norm(x, norm), act)
            wf = w.dequantize().to(x.dtype)
            for f in self.weight_function:
                wf = f(wf)
            for f in self.bias_function:
                bias = f(bias)
            y = F.linear(x, wf, bias)
            return y if side is None else side(x, y)
        # the bound fast path for the layer's own weight (a copy moved here for this call is not bound)
        fn = None if w is not params["weight"] or torch.compiler.is_compiling() else bound_linear(w, bias)
        return run_linear(fn, x, w, bias, side, act, norm)


def is_plain_linear(mod: nn.Module) -> bool:
    """A linear layer with a plain float 2-D weight: ``nn.Linear`` or one of ComfyUI's op-set ``Linear`` classes."""
    if isinstance(mod, QuantLinear):
        return False
    linear_like = isinstance(mod, nn.Linear) or (type(mod).__name__ == "Linear" and hasattr(mod, "in_features")
                                                 and hasattr(mod, "out_features"))
    w = getattr(mod, "weight", None)
    return (linear_like and isinstance(w, torch.Tensor) and type(w) in (torch.Tensor, nn.Parameter)
            and w.dim() == 2 and w.is_floating_point() and not w.is_meta)


def make_comfy_ops() -> type:
    """A ComfyUI op set (``model_options["custom_operations"]``) whose ``Linear`` defers quantized layers.

    Plain layers behave exactly as ComfyUI's ``manual_cast.Linear``. A layer whose state dict carries
    ``comfy_quant`` keeps its tensors aside (``pending_quant``) and holds no float weight;
    :func:`comfyquant.nodes.loader.swap_pending` then replaces it by a :class:`ComfyQuantLinear`.
    """
    import comfy.ops

    class ComfyQuantOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            pending_quant: dict[str, torch.Tensor] | None = None

            def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
                if prefix + "comfy_quant" not in state_dict:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                         unexpected_keys, error_msgs)
                own = {k[len(prefix):]: v for k, v in state_dict.items()
                       if k.startswith(prefix) and "." not in k[len(prefix):]}
                self.pending_quant = own
                self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device="meta"),
                                           requires_grad=False)
                if "bias" in own and self.bias is not None:
                    self.bias = nn.Parameter(own["bias"], requires_grad=False)
                return None

    return ComfyQuantOps
