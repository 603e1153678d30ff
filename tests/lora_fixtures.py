"""Helpers for the LoRA tests: tiny base checkpoints with real key layouts, LoRAs in each format's real key names,
and ComfyUI 0.30's own key maps and ``calculate_weight`` as the oracle for the merged weights.

ComfyUI builds its Flux, SD3 and Wan classes from the tiny files; for SDXL and Qwen-Image (whose tiny widths
ComfyUI's model table does not accept) the key map comes from ComfyUI's ``model_lora_keys_unet`` run on a stand-in
object of ComfyUI's own model class (an instance whose ``state_dict`` lists the tiny model's keys), and for the
text encoders from ``model_lora_keys_clip`` likewise.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Mapping
from typing import Any

import torch

from comfyquant.testing.architectures import arch_tensors

LORA_SUFFIXES = {  # style -> (up suffix, down suffix)
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
    "diffusers": (".lora.up.weight", ".lora.down.weight"),
    "processor": ("_lora.up.weight", "_lora.down.weight"),
    "mochi": (".lora_B", ".lora_A"),
    "linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"),
}


class LoraBuilder:
    """Accumulates LoRA tensors with a seeded generator; sizes chosen so each difference is comparable to W."""

    def __init__(self, seed: int = 0, scale: float = 0.1) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.sd: dict[str, torch.Tensor] = {}

    def r(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * self.scale

    def lora(self, module: str, out: int, inp: int | tuple[int, ...], rank: int = 4, style: str = "kohya",
             alpha: float | None = 2.0, dora: str | None = None) -> LoraBuilder:
        up_s, down_s = LORA_SUFFIXES[style]
        in_shape = (inp,) if isinstance(inp, int) else tuple(inp)
        down = self.r(rank, *in_shape)
        up = self.r(out, rank, *([1] * (len(in_shape) - 1)))
        self.sd[module + up_s], self.sd[module + down_s] = up, down
        if alpha is not None:
            self.sd[module + ".alpha"] = torch.tensor(alpha)
        if dora == "in":
            self.sd[module + ".dora_scale"] = 1.0 + self.r(1, math.prod(in_shape))
        elif dora == "out":
            self.sd[module + ".dora_scale"] = 1.0 + self.r(out, 1)
        return self

    def locon_tucker(self, module: str, out: int, inp: int, k: int = 3, rank: int = 4) -> LoraBuilder:
        self.sd[module + ".lora_up.weight"] = self.r(out, rank, 1, 1)
        self.sd[module + ".lora_down.weight"] = self.r(rank, inp, 1, 1)
        self.sd[module + ".lora_mid.weight"] = self.r(rank, rank, k, k)
        self.sd[module + ".alpha"] = torch.tensor(3.0)
        return self

    def loha(self, module: str, out: int, inp: int, rank: int = 4, alpha: float = 2.0) -> LoraBuilder:
        for w in ("w1", "w2"):
            self.sd[f"{module}.hada_{w}_a"] = self.r(out, rank)
            self.sd[f"{module}.hada_{w}_b"] = self.r(rank, inp)
        self.sd[module + ".alpha"] = torch.tensor(alpha)
        return self

    def loha_cp(self, module: str, out: int, inp: int, k: int = 3, rank: int = 4) -> LoraBuilder:
        for w, t in (("w1", "t1"), ("w2", "t2")):
            self.sd[f"{module}.hada_{w}_a"] = self.r(rank, out)
            self.sd[f"{module}.hada_{w}_b"] = self.r(rank, inp)
            self.sd[f"{module}.hada_{t}"] = self.r(rank, rank, k, k)
        self.sd[module + ".alpha"] = torch.tensor(2.0)
        return self

    def lokr(self, module: str, out: tuple[int, int], inp: tuple[int, int], rank: int = 4,
             decompose_w1: bool = False, alpha: float = 2.0) -> LoraBuilder:
        if decompose_w1:
            self.sd[module + ".lokr_w1_a"], self.sd[module + ".lokr_w1_b"] = self.r(out[0], 2), self.r(2, inp[0])
        else:
            self.sd[module + ".lokr_w1"] = self.r(out[0], inp[0])
        self.sd[module + ".lokr_w2_a"], self.sd[module + ".lokr_w2_b"] = self.r(out[1], rank), self.r(rank, inp[1])
        self.sd[module + ".alpha"] = torch.tensor(alpha)
        return self

    def diff(self, module: str, shape: tuple[int, ...], bias: int | None = None) -> LoraBuilder:
        self.sd[module + ".diff"] = self.r(*shape) * 0.1
        if bias is not None:
            self.sd[module + ".diff_b"] = self.r(bias)
        return self


def base_weights(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """Random weights with ``arch``'s real tiny key names and shapes (std 0.02; norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in arch_tensors(arch, "tiny"):
        t = torch.randn(shape, generator=g) * 0.02
        if len(shape) == 1 and "norm" in name:
            t = t + 1.0
        out[prefix + name] = t.to(dtype)
    return out


# -- ComfyUI oracle ------------------------------------------------------------------------------------------
def comfy_lora_module(comfy: Any) -> types.ModuleType:
    return importlib.import_module("comfy.lora")


def comfy_flux_like_keymap(comfy: Any, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ComfyUI's LoRA key map for a diffusion model it can build (Flux, SD3, Wan) from ``sd``."""
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    assert patcher is not None
    return comfy_lora_module(comfy).model_lora_keys_unet(patcher.model, {})


def comfy_standin_keymap(comfy: Any, class_name: str, sd: Mapping[str, torch.Tensor],
                         unet_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """ComfyUI's ``model_lora_keys_unet`` on a stand-in of ``comfy.model_base.<class_name>`` listing ``sd``."""
    base = importlib.import_module("comfy.model_base")
    cls = getattr(base, class_name)
    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    keys = {f"diffusion_model.{k}": v for k, v in sd.items()}
    obj.state_dict = lambda *a, **kw: keys
    obj.model_config = types.SimpleNamespace(unet_config=unet_config or {})
    return comfy_lora_module(comfy).model_lora_keys_unet(obj, {})


def comfy_clip_keymap(comfy: Any, internal: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ComfyUI's ``model_lora_keys_clip`` for a CLIP stand-in whose state dict is ``internal``."""
    obj = types.SimpleNamespace(state_dict=lambda: dict(internal))
    return comfy_lora_module(comfy).model_lora_keys_clip(obj, {})


def comfy_merged(comfy: Any, lora_sd: Mapping[str, torch.Tensor], key_map: Mapping[str, Any],
                 weights: Mapping[str, torch.Tensor], strength: float = 1.0,
                 more: list[tuple[Mapping[str, torch.Tensor], float]] | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's merged float32 weight for every key its loader patches: ``load_lora`` + ``calculate_weight``.

    ``weights`` maps ComfyUI's internal keys (``diffusion_model.X.weight``) to tensors; ``more`` adds further
    LoRAs (each with its strength) applied after the first, as chained LoraLoader nodes would.
    """
    cl = comfy_lora_module(comfy)
    convert = importlib.import_module("comfy.lora_convert").convert_lora
    patches: dict[str, list[tuple]] = {}
    for sd, s in [(lora_sd, strength), *(more or [])]:
        loaded = cl.load_lora(convert(dict(sd)), dict(key_map), log_missing=False)
        for k, v in loaded.items():  # what ModelPatcher.add_patches records
            key, offset, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            assert key in weights, f"ComfyUI patches {key}, which the test's weights do not hold"
            patches.setdefault(key, []).append((s, v, 1.0, offset, fn))
    return {k: cl.calculate_weight(p, weights[k].float().clone(), k) for k, p in patches.items()}


def assert_close_weights(ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                         rename: Mapping[str, str] | None = None) -> None:
    """Same changed tensors, and each merged weight equal to ComfyUI's within float32 rounding."""
    rename = rename or {}
    mapped = {rename.get(k, k): v for k, v in ours.items()}
    assert set(mapped) == set(ref), (sorted(set(mapped) ^ set(ref))[:8])
    for k, want in ref.items():
        got = mapped[k]
        tol = 2e-6 * float(want.abs().max()) + 1e-7
        err = float((got - want).abs().max())
        assert err <= tol, f"{k}: max |ours - ComfyUI| {err:.3e} > {tol:.3e}"
