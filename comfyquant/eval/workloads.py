"""The two reference workloads the eval runs: the digits DiT (images) and MiniLM (sentence embeddings).

Each knows its float reference file, how to build an empty model to load a quantized file into, one
representative forward pass for per-layer statistics, and its end-to-end metrics against the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from comfyquant.errors import UserError
from comfyquant.eval import metrics as M
from comfyquant.eval.plots import save_grid
from comfyquant.eval.sampling import SampleConfig, class_labels, initial_noise, sample
from comfyquant.progress import QUIET, Progress

DIT_FIXTURE = Path(__file__).parent / "assets" / "digits_dit.safetensors"


def _stats(v: torch.Tensor | np.ndarray) -> dict[str, float]:
    a = np.asarray(v, dtype=np.float64)
    return {"mean": round(float(a.mean()), 6), "min": round(float(a.min()), 6)}


@dataclass
class DigitsWorkload:
    """Samples of the digits DiT at fixed seeds: PSNR/SSIM vs the bf16 model, class accuracy, Frechet distance."""

    reference: Path = DIT_FIXTURE
    sampling: SampleConfig = field(default_factory=SampleConfig)
    name: str = "digits-dit"

    def reference_file(self) -> Path:
        return self.reference

    def layer_config(self) -> dict[str, Any] | None:
        return None

    def peer_extra_args(self) -> list[str]:
        return []

    def float_model(self) -> nn.Module:
        """The bf16 fixture, computed in float32."""
        from comfyquant.eval.dit import DigitsDiT, config_from_state_dict

        sd = load_file(str(self.reference))
        model = DigitsDiT(config_from_state_dict(sd))
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return model.eval()

    def empty_model(self) -> nn.Module:
        from comfyquant.eval.dit import DigitsDiT, config_from_state_dict

        sd = load_file(str(self.reference))
        return DigitsDiT(config_from_state_dict(sd)).eval()

    def stats_pass(self, model: nn.Module) -> None:
        """One velocity prediction on 64 real digits noised to t = 0.5."""
        from comfyquant.eval.data import load_digits, to_latent

        d = load_digits()
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(d.labels), generator=gen)[:64]
        x0 = to_latent(d.images[idx])
        noise = torch.randn(x0.shape, generator=gen)
        model.velocity(0.5 * x0 + 0.5 * noise, torch.full((64,), 0.5), d.labels[idx])

    def evaluate(self, ref: nn.Module, quant: nn.Module, out: Path, progress: Progress = QUIET) -> dict[str, Any]:
        from comfyquant.eval.classifier import train_classifier
        from comfyquant.eval.data import load_digits

        s = self.sampling
        n_cls = ref.cfg.num_classes
        labels = class_labels(n_cls, s.per_class)
        noise = initial_noise(len(labels), (16, 8, 8), s.seed)
        images = []
        for i, (what, model) in enumerate((("float reference", ref), ("quantized model", quant))):
            progress.stage(f"sampling {i + 1}/2: {what}, {len(labels)} images x {s.steps} Euler steps")
            with progress.task(f"sampling {i + 1}/2", s.steps, "steps") as bar:
                images.append(sample(model.velocity, labels, n_cls, noise, s.steps, s.cfg, on_step=bar.update))
        img_ref, img_q = images
        progress.stage("metrics: PSNR/SSIM against the reference, digit classifier, Frechet distance")
        digits = load_digits()
        clf = train_classifier(digits)
        f_real, f_ref, f_q = clf.features(digits.images), clf.features(img_ref), clf.features(img_q)
        psnr = [M.psnr(a, b) for a, b in zip(img_ref, img_q, strict=True)]
        grid = out / "samples.png"
        save_grid(img_ref, img_q, n_cls, s.per_class, grid)  # eval/plots.py
        return {
            "samples": len(labels), "sampler": {"steps": s.steps, "cfg": s.cfg, "seed": s.seed},
            "psnr_db": _stats(np.minimum(psnr, 99.0)), "ssim": _stats(M.ssim(img_ref, img_q)),
            "class_acc_reference": M.accuracy(clf.predict(img_ref), labels.numpy()),
            "class_acc": M.accuracy(clf.predict(img_q), labels.numpy()),
            "fd_reference_vs_real": round(M.frechet_distance(f_ref, f_real), 4),
            "fd_vs_real": round(M.frechet_distance(f_q, f_real), 4),
            "fd_vs_reference": round(M.frechet_distance(f_q, f_ref), 4),
            "sample_grid": grid.name,
        }


@dataclass
class MiniLMWorkload:
    """Sentence embeddings of all-MiniLM-L6-v2 over the committed sentences: cosine vs float32."""

    reference: Path | None = None
    limit: int | None = None
    name: str = "minilm"

    def layer_config(self) -> dict[str, Any] | None:
        """Embedding tables are lookups, not matmuls: keep them (the generic preset would quantize them)."""
        return {"rules": [{"pattern": r"^embeddings\.", "format": "skip"}]}

    def peer_extra_args(self) -> list[str]:
        return ["--exclude-layers", r"embeddings\."]

    def reference_file(self) -> Path:
        from comfyquant.eval.minilm import weights_path

        return self.reference or weights_path()

    def float_model(self) -> nn.Module:
        from comfyquant.eval.minilm import build_minilm

        return build_minilm(self.reference_file())

    def empty_model(self) -> nn.Module:
        from comfyquant.eval.minilm import empty_minilm

        return empty_minilm()

    def _tok(self) -> Any:
        from comfyquant.eval.minilm import Tokenizer, model_dir

        return Tokenizer(model_dir())

    def stats_pass(self, model: nn.Module) -> None:
        """One forward pass over the first 64 sentences (fewer when the run is limited to fewer)."""
        from comfyquant.eval.minilm import load_sentences

        ids, mask = self._tok()(load_sentences(min(64, self.limit or 64)))
        model(ids, mask)

    def evaluate(self, ref: nn.Module, quant: nn.Module, out: Path, progress: Progress = QUIET) -> dict[str, Any]:
        from comfyquant.eval.minilm import embed, load_sentences

        sents = load_sentences(self.limit)
        tok = self._tok()
        vectors = []
        for i, (what, model) in enumerate((("float reference", ref), ("quantized model", quant))):
            progress.stage(f"embedding {i + 1}/2: {len(sents)} sentences with the {what}")
            with progress.task(f"embedding {i + 1}/2", len(sents), "sentences") as bar:
                vectors.append(embed(model, tok, sents, on_batch=bar.update))
        progress.stage("metrics: embedding cosine against the reference")
        cos = M.cosine(*vectors)
        return {"sentences": len(sents), "cosine": _stats(cos),
                "cosine_p01": round(float(torch.quantile(cos, 0.01)), 6)}


def _file_keys(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), dict(f.metadata() or {})


def is_quantized_file(path: Path) -> bool:
    keys, meta = _file_keys(path)
    return any(k.endswith(".comfy_quant") or k.endswith("scaled_fp8") for k in keys) or \
        "_quantization_metadata" in meta


def resolve_workload(model: str, sampling: SampleConfig, limit: int | None) -> tuple[Any, Path | None]:
    """``minilm`` | ``digits-dit`` | a file; returns the workload and the quantized file when one was given."""
    if model == "digits-dit":
        return DigitsWorkload(sampling=sampling), None
    if model == "minilm":
        return MiniLMWorkload(limit=limit), None
    path = Path(model)
    if not path.exists():
        raise UserError(f"--model {model}: no such file (give minilm, digits-dit or a .safetensors file)")
    if not path.is_file():
        raise UserError(f"--model {model}: not a file (give minilm, digits-dit or a .safetensors file)")
    keys, _ = _file_keys(path)
    quantized = is_quantized_file(path)
    if "conditioner.txt_table" in keys:
        return (DigitsWorkload(sampling=sampling), path) if quantized else \
            (DigitsWorkload(reference=path, sampling=sampling), None)
    if "encoder.layer.0.attention.self.query.weight" in keys:
        return (MiniLMWorkload(limit=limit), path) if quantized else (MiniLMWorkload(reference=path, limit=limit),
                                                                      None)
    raise UserError(f"{path}: not a digits-DiT or MiniLM checkpoint (the eval has no workload for it): "
                    f"{json.dumps(sorted(keys)[:3])}...")
