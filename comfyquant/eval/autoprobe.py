"""Automatic-precision probes for the two reference models (``autoprec.probe.Probe``).

The digits DiT is probed on whole 20-step sampling trajectories (CFG 3) from seed 777, two images per digit:
distortion = each image's mean squared error against the float model, metric = mean sample PSNR (range 2,
capped at 99 dB, as the eval computes it). MiniLM is probed on its 122 calibration sentences: distortion =
``|a - b|^2`` of each unit-norm embedding, metric = mean cosine (``1 - d / 2``). Held-out checks load the
written file through ``load_quantized`` and use the eval's own inputs (seed 1234, 100 images; the 213 eval
sentences), which the calibration never sees. The reference run also collects the calibration statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.autoprec.probe import Assignment, cosine_of, psnr_of
from comfyquant.calibration.collector import Collector
from comfyquant.calibration.stats import CalibrationStats
from comfyquant.eval.calibration_sources import DIT_CALIBRATION_SEED, load_calibration_sentences
from comfyquant.eval.sampling import SampleConfig, class_labels, initial_noise, sample


@contextmanager
def fake_quantized(model: nn.Module, assign: Assignment) -> Iterator[None]:
    """Inside the block, ``assign``'s linear layers compute with their format's stored weight (quantized and
    dequantized) and rounded activations (``QuantFormat.quantize_input``); restored on exit."""
    mods = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, (fmt, params) in assign.items():
            mod = mods[name]
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{name} is not an nn.Linear")
            w = mod.weight.data
            saved[name] = w
            tensors = fmt.quantize(w.float(), params)
            mod.weight.data = fmt.dequantize(tensors, params, torch.float32).to(w.dtype)
            handles.append(mod.register_forward_pre_hook(_input_hook(fmt, dict(params))))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():
            mods[name].weight.data = w


def _input_hook(fmt: Any, params: dict[str, Any]) -> Callable[..., tuple[Any, ...]]:
    def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        k = x.shape[-1]
        xq = fmt.quantize_input(x.reshape(-1, k).float(), params).reshape(x.shape).to(x.dtype)
        return (xq, *args[1:])
    return hook


@dataclass
class ModelProbe:
    """A float model, how to run its calibration inputs (``run`` -> outputs ``[items, ...]``), the per-item
    distortion, the metric, and the held-out check."""

    name: str
    metric: str
    model: nn.Module
    run: Callable[[nn.Module], torch.Tensor]
    per_item: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    quality_fn: Callable[[torch.Tensor], float]
    heldout_fn: Callable[[Path], dict[str, Any]]
    _ref: torch.Tensor | None = field(default=None, repr=False)
    _stats: CalibrationStats | None = field(default=None, repr=False)

    def _reference(self) -> torch.Tensor:
        if self._ref is None:
            with torch.no_grad(), Collector(self.model) as c:
                self._ref = self.run(self.model).detach()
            self._stats = c.stats({"source": f"{self.name} auto-precision probe"})
        return self._ref

    def statistics(self) -> CalibrationStats:
        self._reference()
        assert self._stats is not None
        return self._stats

    def distortion(self, assign: Assignment) -> torch.Tensor:
        ref = self._reference()
        with torch.no_grad(), fake_quantized(self.model, assign):
            out = self.run(self.model)
        return self.per_item(ref, out).double()

    def quality(self, d: torch.Tensor) -> float:
        return self.quality_fn(d)

    def heldout(self, path: Path) -> dict[str, Any]:
        return self.heldout_fn(Path(path))


def _image_mse(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (ref.double() - out.double()).square().flatten(1).mean(1)


def _sq_dist(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (ref.double() - out.double()).square().sum(1)


def dit_probe(reference: Path | None = None, per_class: int = 2, steps: int = 20, cfg: float = 3.0,
              seed: int = DIT_CALIBRATION_SEED, heldout: SampleConfig | None = None) -> ModelProbe:
    """The digits DiT probe (module docstring); ``heldout`` defaults to the eval's sampler (seed 1234)."""
    from comfyquant.eval.workloads import DigitsWorkload

    wl = DigitsWorkload(reference=reference) if reference else DigitsWorkload()
    model = wl.float_model()
    n_cls = model.cfg.num_classes
    labels = class_labels(n_cls, per_class)
    noise = initial_noise(len(labels), (16, 8, 8), seed)

    def run(m: nn.Module) -> torch.Tensor:
        return sample(m.velocity, labels, n_cls, noise, steps, cfg)

    held = heldout or SampleConfig()

    def check(path: Path) -> dict[str, Any]:
        from comfyquant.eval.metrics import psnr
        from comfyquant.runtime.loader import load_quantized

        quant = load_quantized(wl.empty_model(), path, compute_dtype=torch.float32).eval()
        hl = class_labels(n_cls, held.per_class)
        hn = initial_noise(len(hl), (16, 8, 8), held.seed)
        a = sample(model.velocity, hl, n_cls, hn, held.steps, held.cfg)
        b = sample(quant.velocity, hl, n_cls, hn, held.steps, held.cfg)
        vals = [min(99.0, psnr(x, y)) for x, y in zip(a, b, strict=True)]
        return {"psnr": sum(vals) / len(vals), "psnr_min": min(vals), "items": len(vals),
                "inputs": f"{len(vals)} samples, seed {held.seed}, {held.steps} steps, cfg {held.cfg:g}"}

    return ModelProbe("digits-dit", "psnr", model, run, _image_mse, psnr_of, check)


def minilm_probe(reference: Path | None = None, sentences: int | None = None) -> ModelProbe:
    """The MiniLM probe (module docstring): calibration sentences in, the eval sentences held out."""
    from comfyquant.eval.minilm import Tokenizer, build_minilm, embed, empty_minilm, load_sentences, model_dir

    model = build_minilm(reference)
    tok = Tokenizer(model_dir())
    calib = load_calibration_sentences(sentences)

    def run(m: nn.Module) -> torch.Tensor:
        return embed(m, tok, calib)

    def check(path: Path) -> dict[str, Any]:
        from comfyquant.eval.metrics import cosine
        from comfyquant.runtime.loader import load_quantized

        quant = load_quantized(empty_minilm(), path, compute_dtype=torch.float32).eval()
        sents = load_sentences()
        cos = cosine(embed(model, tok, sents), embed(quant, tok, sents))
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "items": len(sents),
                "inputs": f"{len(sents)} eval sentences"}

    return ModelProbe("minilm", "cosine", model, run, _sq_dist, cosine_of, check)


def probe_for(model: str | Path) -> ModelProbe | None:
    """The probe of ``digits-dit`` / ``minilm`` or of a float file of either; None for any other model."""
    from comfyquant.eval.workloads import _file_keys, is_quantized_file

    if str(model) == "digits-dit":
        return dit_probe()
    if str(model) == "minilm":
        return minilm_probe()
    path = Path(model)
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    keys, _ = _file_keys(path)
    if is_quantized_file(path):
        return None
    if "conditioner.txt_table" in keys:
        return dit_probe(path)
    if "encoder.layer.0.attention.self.query.weight" in keys:
        return minilm_probe(path)
    return None
