"""``--extract-lora RANK``: the quantization error of every quantized layer, ``W - dequant(Q(W))``, as a rank-r
LoRA that corrects it (``up @ down`` is the best rank-r approximation of the error, from a seeded randomized SVD).

The file uses ComfyUI-native module names (``diffusion_model.<layer>`` for the diffusion model, the full layer
name elsewhere) with ``alpha = rank``, so ``comfyquant.lora.apply(model, file, mode="dynamic")`` runs it as a
side path next to the quantized weights, and stock ComfyUI's LoRA loader reads it as a plain LoRA.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import dequantize_weight
from comfyquant.io.writer import save_file
from comfyquant.presets.prefixes import DIFFUSION, NONE, split_name

OVERSAMPLE = 8
POWER_ITERS = 2
EXACT_LIMIT = 1 << 30  # N*K*min(N,K) up to which the exact SVD is cheaper than a randomized one is worth


def low_rank_svd(e: torch.Tensor, rank: int, seed: int = 0, exact_limit: int = EXACT_LIMIT
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U [N,r], S [r], Vh [r,K])`` of the best rank-``rank`` approximation of ``e`` (float32, 2-D).

    Matrices up to ``exact_limit`` (``N*K*min(N,K)``) take the exact SVD; larger ones a seeded randomized range
    finder with power iterations (Halko et al.), deterministic for a given seed and device.
    """
    n, k = e.shape
    r = min(rank, n, k)
    if min(n, k) <= r + OVERSAMPLE or n * k * min(n, k) <= exact_limit:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    gen = torch.Generator(device=e.device).manual_seed(seed)
    q = torch.linalg.qr(e @ torch.randn(k, r + OVERSAMPLE, generator=gen, device=e.device)).Q
    for _ in range(POWER_ITERS):
        q = torch.linalg.qr(e @ (e.T @ q)).Q
    u, s, vh = torch.linalg.svd(q.T @ e, full_matrices=False)
    return (q @ u)[:, :r], s[:r], vh[:r]


def lora_module_name(tensor: str, diffusion_file: bool) -> str:
    """ComfyUI-native module name of a weight: ``diffusion_model.<layer>`` for a diffusion model's layer (in a
    bundled checkpoint, or any layer of a diffusion-only file), else the full layer name."""
    layer = tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor
    parts = split_name(layer)
    if parts.component == DIFFUSION or (parts.component == NONE and diffusion_file):
        return f"diffusion_model.{parts.rest}"
    return layer


class QuantErrorLoRA:
    """Collects the rank-r factors of each quantized layer's error; ``finish`` writes them as one LoRA file."""

    def __init__(self, path: str | Path, rank: int, *, force: bool = False, dtype: torch.dtype = torch.float16,
                 seed: int = 0, target: str | None = None) -> None:
        if rank < 1:
            raise UserError(f"--extract-lora needs a rank >= 1, got {rank}")
        try:
            self.target = re.compile(target) if target else None
        except re.error as e:
            raise UserError(f"--extract-lora target: invalid regex {target!r}: {e}") from None
        self.path, self.rank, self.force, self.dtype, self.seed = Path(path), rank, force, dtype, seed
        if self.path.exists() and not force:
            raise UserError(f"LoRA output exists: {self.path} (use --force to overwrite)")
        if not self.path.parent.is_dir():
            raise UserError(f"LoRA output directory does not exist: {self.path.parent}")
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.energy: dict[str, tuple[float, float]] = {}

    @classmethod
    def for_output(cls, output: str | Path, rank: int, path: str | Path | None = None, *,
                   force: bool = False, target: str | None = None, suffix: str | None = None) -> QuantErrorLoRA:
        """The sink for a conversion writing ``output`` (default file: ``<stem><suffix>``, suffix
        ``_qerr_r<rank>.safetensors``)."""
        out = Path(output)
        file = Path(path) if path is not None else out.with_name(f"{out.stem}{suffix or f'_qerr_r{rank}.safetensors'}")
        if file.resolve() == out.resolve():
            raise UserError(f"the LoRA output {file} is the conversion's output file; choose another name")
        return cls(file, rank, force=force, target=target)

    def add(self, name: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
            comfy_quant: Mapping[str, Any] | None) -> None:
        """Factor one quantized layer's error (float32 on the weight's device, factors kept on the CPU)."""
        if weight.dim() != 2 or (self.target is not None and self.target.search(name) is None):
            return
        err = weight.to(torch.float32) - dequantize_weight(tensors, comfy_quant, torch.float32).to(weight.device)
        u, s, vh = low_rank_svd(err, self.rank, self.seed)
        root = s.sqrt()
        up, down = (u * root).cpu(), (root[:, None] * vh).cpu()
        total = float(err.double().square().sum())
        self.factors[name] = (up, down)
        self.energy[name] = (float(s.double().square().sum()), total)

    def finish(self) -> list[str]:
        """Write the LoRA (atomically) and return one report note; nothing is written when no layer was seen."""
        if not self.factors:
            return [f"--extract-lora: no quantized layers, so no LoRA was written ({self.path})"]
        from comfyquant.presets.registry import detect_preset

        diffusion = detect_preset({n: (u.shape[0], d.shape[1]) for n, (u, d) in self.factors.items()}).kind \
            in ("diffusion", "any")
        tensors: dict[str, torch.Tensor] = {}
        for name, (up, down) in self.factors.items():
            m = lora_module_name(name, diffusion)
            tensors[f"{m}.lora_up.weight"] = up.to(self.dtype).contiguous()
            tensors[f"{m}.lora_down.weight"] = down.to(self.dtype).contiguous()
            tensors[f"{m}.alpha"] = torch.tensor(float(up.shape[1]), dtype=torch.float32)
        captured = sum(c for c, _ in self.energy.values())
        total = sum(t for _, t in self.energy.values())
        frac = captured / total if total > 0 else 1.0
        meta = {"comfyquant.extract_lora": json.dumps({"rank": self.rank, "layers": len(self.factors),
                                                        "captured_error_energy": round(frac, 6)})}
        save_file(self.path, tensors, meta, overwrite=self.force)
        residual_db = -10 * math.log10(max(1.0 - frac, 1e-12))
        return [f"--extract-lora {self.rank}: wrote {self.path} ({len(self.factors)} layers); the rank-{self.rank} "
                f"factors hold {frac:.1%} of the quantization error's energy (error power -{residual_db:.2f} dB "
                "when applied)"]
