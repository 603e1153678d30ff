"""Calibration data for the reference models: what real inputs look like for each of them.

The digits DiT is calibrated on whole sampling trajectories (every Euler step of the schedule, conditional
and unconditional passes of classifier-free guidance, every class) from seeds the eval never uses, so the
statistics cover the timesteps a diffusion model actually sees. MiniLM is calibrated on its own sentences,
disjoint from the eval's (``eval/assets/calibration_sentences.txt``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def dit_source(reference: Path | None = None, per_class: int = 2, steps: int = 20, cfg: float = 3.0,
               seed: int = DIT_CALIBRATION_SEED) -> Source:
    """The digits DiT sampling ``per_class`` images of every class with the eval's sampler settings."""
    from comfyquant.eval.sampling import SampleConfig, class_labels, initial_noise, sample
    from comfyquant.eval.workloads import DigitsWorkload

    wl = DigitsWorkload(reference=reference) if reference else DigitsWorkload()
    model = wl.float_model()
    s = SampleConfig(steps=steps, cfg=cfg, per_class=per_class, seed=seed)

    def run(m: nn.Module) -> None:
        n_cls = m.cfg.num_classes
        labels = class_labels(n_cls, s.per_class)
        sample(m.velocity, labels, n_cls, initial_noise(len(labels), (16, 8, 8), s.seed), s.steps, s.cfg)

    meta = {"source": "digits-dit sampling", "model": "digits-dit", "classes": model.cfg.num_classes,
            "per_class": per_class, "steps": steps, "cfg": cfg, "seed": seed,
            "timesteps": "every Euler step of the schedule from t=1 to t=0, cond + uncond"}
    return Source("digits-dit", model, run, meta)


def load_calibration_sentences(limit: int | None = None) -> list[str]:
    lines = [s for s in CALIBRATION_SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines[:limit] if limit else lines


def minilm_source(reference: Path | None = None, sentences: int | None = None, batch: int = 32) -> Source:
    """MiniLM over the calibration sentences (none of them is in the eval set)."""
    from comfyquant.eval.minilm import Tokenizer, build_minilm, model_dir

    model = build_minilm(reference)
    sents = load_calibration_sentences(sentences)
    tok = Tokenizer(model_dir())

    def run(m: nn.Module) -> None:
        for i in range(0, len(sents), batch):
            ids, mask = tok(sents[i:i + batch])
            m(ids, mask)

    meta = {"source": "minilm sentences", "model": "minilm", "sentences": len(sents),
            "file": CALIBRATION_SENTENCES.name}
    return Source("minilm", model, run, meta)


def resolve_source(model: str, *, samples: int | None = None, seed: int | None = None) -> Source:
    """``digits-dit`` | ``minilm`` | a float file of one of them. Other checkpoints need model code to run:
    use ``comfyquant.calibrate(model, data)`` or the ComfyUI node."""
    if model == "digits-dit":
        return dit_source(per_class=samples or 2, seed=DIT_CALIBRATION_SEED if seed is None else seed)
    if model == "minilm":
        return minilm_source(sentences=samples)
    path = Path(model)
    if not path.is_file():
        raise UserError(f"MODEL must be digits-dit, minilm or a float .safetensors of one of them; '{model}' "
                        "is none of these (calibrate other models with comfyquant.calibrate(model, data) "
                        "or the ComfyUI node)")
    from comfyquant.eval.workloads import _file_keys

    keys, _ = _file_keys(path)
    if "conditioner.txt_table" in keys:
        return dit_source(path, per_class=samples or 2, seed=DIT_CALIBRATION_SEED if seed is None else seed)
    if "encoder.layer.0.attention.self.query.weight" in keys:
        return minilm_source(path, sentences=samples)
    raise UserError(f"{path}: comfyquant cannot run this model by itself; calibrate it from Python with "
                    "comfyquant.calibrate(model, data) (any nn.Module) or in ComfyUI with the Capture "
                    "Calibration node")
