"""Key-name + shape specifications of real architectures, for tests and speed/memory benchmarks only.

``arch_tensors(arch, size)`` lists ``(name, shape)`` in checkpoint order. ``"full"`` has the real widths and
depths; ``"tiny"`` the same key names with depth 2 and small widths (multiples of 256 where the real ones
are) so CI converts them in seconds; ``"small"`` (some archs) sits between, for quick memory tests.
Where ComfyUI's model detection hard-codes a width (Wan's 4096-wide text input, HunyuanVideo's 768-wide
vector input, LTXV's 4096 caption channels, SD3's ``hidden = 64 * depth``), the tiny config keeps it, so
ComfyUI builds the tiny Flux, Flux.2, HunyuanVideo, Wan, LTXV and SD3 models from these files unchanged.
Random weights written from these say nothing about image quality.

CLI: ``python -m comfyquant.testing --arch flux --size full -o flux.safetensors``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from comfyquant.errors import UserError
from comfyquant.testing import arch_dit as dit
from comfyquant.testing import arch_unet_text as ut
from comfyquant.testing.arch_dit import TensorSpec

SIZES = ("tiny", "small", "full")


@dataclass(frozen=True)
class Arch:
    """One architecture: its builder, per-size configs and the preset auto-detection must pick for it."""

    name: str
    preset: str
    build: Callable[[dict[str, Any]], list[TensorSpec]]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""


def _flux_cfg(hidden: int, heads: int, depth: int, single: int, ctx: int, vec: int) -> dict[str, Any]:
    return {"hidden": hidden, "heads": heads, "mlp_ratio": 4.0, "depth": depth, "single": single,
            "in_channels": 64, "vec_in": vec, "context": ctx}


_T5 = {"tiny": {"d_model": 256, "d_ff": 512, "heads": 4, "layers": 2, "vocab": 1024},
       "small": {"d_model": 1024, "d_ff": 2816, "heads": 16, "layers": 6, "vocab": 32128},
       "full": {"d_model": 4096, "d_ff": 10240, "heads": 64, "layers": 24, "vocab": 32128}}
_CLIP_L = {"tiny": {"width": 256, "layers": 2, "vocab": 1024}, "full": {"width": 768, "layers": 12, "vocab": 49408}}
_CLIP_G = {"tiny": {"width": 256, "layers": 2, "vocab": 1024}, "full": {"width": 1280, "layers": 32, "vocab": 49408}}
_SDXL = {"tiny": {"channels": 64, "mult": (1, 2, 4), "depth": (0, 1, 1), "middle_depth": 1, "context": 256,
                  "adm": 256},
         "small": {"channels": 128, "mult": (1, 2, 4), "depth": (0, 1, 2), "middle_depth": 2, "context": 512,
                   "adm": 512},
         "full": {"channels": 320, "mult": (1, 2, 4), "depth": (0, 2, 10), "middle_depth": 10, "context": 2048,
                  "adm": 2816}}
_FLUX = {"tiny": _flux_cfg(256, 2, 2, 2, 256, 256), "small": _flux_cfg(1024, 8, 2, 4, 1024, 768),
         "full": _flux_cfg(3072, 24, 19, 38, 4096, 768)}
_VAE = {"tiny": {"channels": 64, "latent": 4}, "full": {"channels": 512, "latent": 16}}


def _bundle(parts: Sequence[tuple[str, Callable[[dict[str, Any]], list[TensorSpec]], dict[str, Any]]]
            ) -> list[TensorSpec]:
    return [(prefix + name, shape) for prefix, build, cfg in parts for name, shape in build(cfg)]


def _sdxl_checkpoint(size: str) -> list[TensorSpec]:
    return _bundle((("model.diffusion_model.", ut.sdxl, _SDXL[size]),
                    ("first_stage_model.", ut.vae, {**_VAE[size], "latent": 4}),
                    ("conditioner.embedders.0.transformer.", ut.clip, _CLIP_L[size]),
                    ("conditioner.embedders.1.model.", ut.open_clip_g, _CLIP_G[size])))


def _flux_checkpoint(size: str) -> list[TensorSpec]:
    return _bundle((("model.diffusion_model.", dit.flux, _FLUX[size]),
                    ("vae.", ut.vae, _VAE[size]),
                    ("text_encoders.clip_l.transformer.", ut.clip, _CLIP_L[size]),
                    ("text_encoders.t5xxl.transformer.", ut.t5, _T5[size])))


_SIZE_ONLY = {size: {"size": size} for size in ("tiny", "full")}


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("flux", "flux", dit.flux, _FLUX, "ldm/flux/model.py: Flux.1-dev"),
    Arch("flux2", "flux2", dit.flux2, {
        "tiny": {"hidden": 256, "heads": 2, "mlp_ratio": 3.0, "depth": 2, "single": 2, "in_channels": 128,
                 "context": 512},
        "full": {"hidden": 6144, "heads": 48, "mlp_ratio": 3.0, "depth": 8, "single": 48, "in_channels": 128,
                 "context": 15360}}, "ldm/flux/model.py + model_detection.py: Flux.2-dev"),
    Arch("chroma", "chroma", dit.chroma, {
        "tiny": {**_FLUX["tiny"], "approx_hidden": 512, "approx_layers": 5},
        "full": {**_FLUX["full"], "approx_hidden": 5120, "approx_layers": 5}}, "ldm/chroma: Chroma"),
    Arch("hunyuan", "hunyuan", dit.hunyuan, {
        "tiny": {**_FLUX["tiny"], "in_channels": 16, "vec_in": 768},
        "full": {**_FLUX["full"], "depth": 20, "single": 40, "in_channels": 16}},
        "ldm/hunyuan_video/model.py: HunyuanVideo 1.0"),
    Arch("wan", "wan", dit.wan, {
        "tiny": {"dim": 256, "ffn": 768, "layers": 2, "text_dim": 4096, "freq_dim": 256, "in_dim": 16, "out_dim": 16},
        "small": {"dim": 1536, "ffn": 8960, "layers": 4, "text_dim": 4096, "freq_dim": 256, "in_dim": 16,
                  "out_dim": 16},
        "full": {"dim": 5120, "ffn": 13824, "layers": 40, "text_dim": 4096, "freq_dim": 256, "in_dim": 16,
                 "out_dim": 16}}, "ldm/wan/model.py: Wan 2.1 14B t2v"),
    Arch("ltxv", "ltxv", dit.ltxv, {
        "tiny": {"inner": 256, "cross": 256, "caption": 4096, "in_channels": 128, "layers": 2},
        "full": {"inner": 2048, "cross": 2048, "caption": 4096, "in_channels": 128, "layers": 28}},
        "ldm/lightricks/model.py: LTXV 0.9 2B"),
    Arch("qwen-image", "qwen-image", dit.qwen_image, {
        "tiny": {"inner": 256, "layers": 2, "joint": 256, "in_channels": 64},
        "full": {"inner": 3072, "layers": 60, "joint": 3584, "in_channels": 64}}, "ldm/qwen_image/model.py"),
    Arch("zimage", "zimage", dit.zimage, {
        "tiny": {"dim": 256, "ffn": 768, "layers": 2, "refiners": 2, "cap_feat": 256},
        "full": {"dim": 3840, "ffn": 10240, "layers": 30, "refiners": 2, "cap_feat": 2560}},
        "ldm/lumina/model.py: Z-Image Turbo"),
    Arch("sd3", "sd3", dit.sd3, {
        "tiny": {"hidden": 256, "depth": 4, "pos": 64, "adm": 256, "context": 256},
        "full": {"hidden": 1536, "depth": 24, "pos": 36864, "adm": 2048, "context": 4096}},
        "ldm/modules/diffusionmodules/mmdit.py: SD3 medium"),
    Arch("sdxl", "sdxl", ut.sdxl, _SDXL, "ldm/modules/diffusionmodules/openaimodel.py: SDXL base UNet"),
    Arch("t5xxl", "t5xxl", ut.t5, _T5, "text_encoders/t5.py: T5 v1.1 XXL encoder"),
    Arch("t5xxl-with-decoder", "t5xxl", functools.partial(ut.t5, with_decoder=True), _T5,
         "text_encoders/t5.py + 2 decoder blocks and lm_head (to test dropping)"),
    Arch("clip", "clip", ut.clip, _CLIP_L, "clip_model.py: CLIP-L text"),
    Arch("llm-te", "llm-te", ut.llm_te, {
        "tiny": {"hidden": 256, "inter": 768, "layers": 2, "kv_heads": 1, "vocab": 1024, "vis_hidden": 128,
                 "vis_inter": 256, "vis_layers": 2},
        "full": {"hidden": 3584, "inter": 18944, "layers": 28, "kv_heads": 4, "vocab": 152064,
                 "vis_hidden": 1280, "vis_inter": 3420, "vis_layers": 32}},
        "text_encoders/llama.py + qwen_vl.py: Qwen2.5-VL-7B"),
    Arch("lora", "lora", ut.lora, {
        "tiny": {"hidden": 256, "rank": 16, "depth": 2, "single": 2},
        "full": {"hidden": 3072, "rank": 32, "depth": 19, "single": 38}}, "kohya/PEFT Flux LoRA"),
    Arch("sdxl-checkpoint", "sdxl", lambda c: _sdxl_checkpoint(c["size"]), _SIZE_ONLY,
         "full SDXL checkpoint: UNet + VAE + CLIP-L + OpenCLIP-G"),
    Arch("flux-checkpoint", "flux", lambda c: _flux_checkpoint(c["size"]), _SIZE_ONLY,
         "ComfyUI all-in-one Flux checkpoint: model + vae + clip_l + t5xxl"),
)}


def arch_tensors(arch: str, size: str = "tiny") -> list[TensorSpec]:
    """``(name, shape)`` of every tensor of ``arch`` at ``size`` (``"tiny"``, ``"small"`` or ``"full"``)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    if size not in spec.configs:
        raise UserError(f"architecture {arch!r} has no size {size!r}; choose one of: {', '.join(spec.configs)}")
    return spec.build(spec.configs[size])
