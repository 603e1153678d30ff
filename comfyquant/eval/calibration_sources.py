"""Calibration data for the reference models: what real inputs look like for each of them.

The digits DiT is calibrated on whole sampling trajectories (every Euler step of the schedule, conditional
and unconditional passes of classifier-free guidance, every class) from seeds the eval never uses, so the
statistics cover the timesteps a diffusion model actually sees. MiniLM is calibrated on its own sentences,
disjoint from the eval's (``eval/assets/calibration_sentences.txt``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.errors import UserError

CALIBRATION_SENTENCES = Path(__file__).parent.parent / "eval" / "assets" / "calibration_sentences.txt"
DIT_CALIBRATION_SEED = 777  # the eval samples from seed 1234


@dataclass(frozen=True)
class Source:
    """A model to calibrate and how to run it: ``run(model)``, plus what to record in the file header."""

    name: str
    model: nn.Module
    run: Callable[[nn.Module], Any]
    meta: dict[str, Any]


Shard = tuple[int, int]  # (this process's index, number of processes): which part of the inputs to run


def shard_of(items: Sequence[int], shard: Shard | None) -> list[int]:
    """The contiguous part of ``items`` that process ``shard[0]`` of ``shard[1]`` runs (all when None).
    Parts differ in length by at most one; together, in order, they are ``items``."""
    if shard is None:
        return list(items)
    index, count = shard
    n = len(items)
    lo, hi = n * index // count, n * (index + 1) // count
    return list(items[lo:hi])


def dit_source(reference: Path | None = None, per_class: int = 2, steps: int = 20, cfg: float = 3.0,
               seed: int = DIT_CALIBRATION_SEED, shard: Shard | None = None) -> Source:
    """The digits DiT sampling ``per_class`` images of every class with the eval's sampler settings; with
    ``shard``, only that process's part of the images (same noise and labels per image as one process)."""
    from comfyquant.eval.sampling import SampleConfig, class_labels, initial_noise, sample
    from comfyquant.eval.workloads import DigitsWorkload

    wl = DigitsWorkload(reference=reference) if reference else DigitsWorkload()
    model = wl.float_model()
    s = SampleConfig(steps=steps, cfg=cfg, per_class=per_class, seed=seed)

    def run(m: nn.Module) -> None:
        n_cls = m.cfg.num_classes
        labels = class_labels(n_cls, s.per_class)
        noise = initial_noise(len(labels), (16, 8, 8), s.seed)
        if shard is not None:
            part = torch.tensor(shard_of(range(len(labels)), shard), dtype=torch.long)
            labels, noise = labels[part], noise[part]
        if len(labels):
            sample(m.velocity, labels, n_cls, noise, s.steps, s.cfg)

    meta = {"source": "digits-dit sampling", "model": "digits-dit", "classes": model.cfg.num_classes,
            "per_class": per_class, "steps": steps, "cfg": cfg, "seed": seed,
            "timesteps": "every Euler step of the schedule from t=1 to t=0, cond + uncond"}
    return Source("digits-dit", model, run, meta)


def load_calibration_sentences(limit: int | None = None) -> list[str]:
    lines = [s for s in CALIBRATION_SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines[:limit] if limit else lines


def minilm_source(reference: Path | None = None, sentences: int | None = None, batch: int = 32,
                  shard: Shard | None = None) -> Source:
    """MiniLM over the calibration sentences (none of them is in the eval set); with ``shard``, only that
    process's part of the batches (the same batches, so the same padded rows, as one process)."""
    from comfyquant.eval.minilm import Tokenizer, build_minilm, model_dir

    model = build_minilm(reference)
    sents = load_calibration_sentences(sentences)
    tok = Tokenizer(model_dir())

    def run(m: nn.Module) -> None:
        for i in shard_of(range(0, len(sents), batch), shard):
            ids, mask = tok(sents[i:i + batch])
            m(ids, mask)

    meta = {"source": "minilm sentences", "model": "minilm", "sentences": len(sents),
            "file": CALIBRATION_SENTENCES.name}
    return Source("minilm", model, run, meta)


def resolve_source(model: str, *, samples: int | None = None, seed: int | None = None,
                   shard: Shard | None = None, steps: int | None = None) -> Source:
    """``digits-dit`` | ``minilm`` | a float file of one of them. Other checkpoints need model code to run:
    use ``comfyquant.calibrate(model, data)`` or the ComfyUI node. ``shard``: run only that part of the data;
    ``steps``: sampling steps per DiT trajectory (default 20, the eval's)."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be >= 1")
    dit = {"per_class": samples or 2, "seed": DIT_CALIBRATION_SEED if seed is None else seed, "shard": shard,
           "steps": steps or 20}
    if model == "digits-dit":
        return dit_source(**dit)
    if model == "minilm":
        return minilm_source(sentences=samples, shard=shard)
    path = Path(model)
    if not path.is_file():
        raise UserError(f"MODEL must be digits-dit, minilm or a float .safetensors of one of them; '{model}' "
                        "is none of these (calibrate other models with comfyquant.calibrate(model, data) "
                        "or the ComfyUI node)")
    from comfyquant.eval.workloads import _file_keys

    keys, _ = _file_keys(path)
    if "conditioner.txt_table" in keys:
        return dit_source(path, **dit)
    if "encoder.layer.0.attention.self.query.weight" in keys:
        return minilm_source(path, sentences=samples, shard=shard)
    raise UserError(f"{path}: comfyquant cannot run this model by itself; calibrate it from Python with "
                    "comfyquant.calibrate(model, data) (any nn.Module) or in ComfyUI with the Capture "
                    "Calibration node")
