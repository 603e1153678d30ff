"""The settings of the rounding optimizers: one frozen :class:`OptimizerConfig` passed down to every method."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from comfyquant.errors import UserError

METHODS = ("rtn", "gptq", "learned", "quip")
LEARNED_OPTIMIZERS = ("adamw", "radam", "original", "prodigy")
LR_SCHEDULES = ("adaptive", "exponential", "plateau", "cosine", "constant")
QUIP_STORAGE = ("auto", "folded", "convrot")


@dataclass(frozen=True)
class LearnedConfig:
    """Learned rounding (AdaRound-style): the optimizer over the rounding variables and its LR schedule.

    ``lr`` None = the optimizer's default (adamw/radam 0.1, original 1.0 on the normalized gradient,
    prodigy 1.0 as Prodigy's multiplier). The plateau/exponential/adaptive knobs follow convert_to_quant's
    flags of the same names.

    Defaults (measured on the digits DiT's calibration Hessians, docs/OPTIMIZERS.md): a constant LR, because
    a decaying one freezes the rounding variables before the annealed regularizer has made them binary (the
    soft loss ends far below the hard one); ``reg_weight`` 10, because the reconstruction loss is normalized
    by RTN's error, so its per-weight curvature (~24/n) exceeds the regularizer's (~8/n at beta 2) unless the
    regularizer is weighted above ~3; no warmup, because the rounding starts at the continuous optimum
    (zero reconstruction gradient), so steps without the regularizer do nothing.
    """

    optimizer: str = "adamw"
    iters: int = 500
    lr: float | None = None
    schedule: str = "constant"
    lr_gamma: float = 0.99
    lr_patience: int = 10
    lr_factor: float = 0.5
    lr_min: float = 1e-6
    lr_cooldown: int = 0
    lr_threshold: float = 0.0
    lr_threshold_mode: str = "rel"
    early_stop_loss: float = 0.0
    early_stop_lr: float = 0.0
    early_stop_stall: int = 0  # 0: no stall stop
    reg_weight: float = 10.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.0  # fraction of iterations without the rounding regularizer

    def default_lr(self) -> float:
        return self.lr if self.lr is not None else {"adamw": 0.1, "radam": 0.1}.get(self.optimizer, 1.0)


@dataclass(frozen=True)
class OptimizerConfig:
    """One conversion's optimizer settings (CLI flags ``--optimizer`` ... map onto these fields).

    ``damp``: GPTQ/LDLQ damping, a fraction of the mean Hessian diagonal (raised x10 up to
    ``damp_retries`` times when the Cholesky factorization fails, then the layer falls back to RTN);
    ``block``: GPTQ's lazy-update block width; ``act_order``: columns by decreasing Hessian diagonal;
    ``quip_storage``: ``convrot`` (the format's own rotation is the incoherence; needs a rotated format),
    ``folded`` (random incoherence, folded back and requantized), ``auto`` (convrot for rotated formats);
    ``smoothquant``/``alpha``: SmoothQuant migration strength; ``bias_correction``: mean output error into
    the bias; ``input_scale_percentile``: FP8 static ``input_scale`` from this |x| percentile (100 = absmax);
    ``lora_strength``: weight of a LoRA's input directions added to the Hessian (``--calibration-lora``).
    """

    method: str = "rtn"
    damp: float = 0.01
    damp_retries: int = 4
    block: int = 128
    act_order: bool = True
    learned: LearnedConfig = field(default_factory=LearnedConfig)
    quip_storage: str = "auto"
    smoothquant: bool = False
    alpha: float = 0.5
    bias_correction: bool = False
    input_scale_percentile: float | None = None
    lora_strength: float = 1.0
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"--optimizer {self.method}: choose one of {', '.join(METHODS)}")
        if self.learned.optimizer not in LEARNED_OPTIMIZERS:
            problems.append(f"learned-rounding optimizer {self.learned.optimizer}: choose one of "
                            f"{', '.join(LEARNED_OPTIMIZERS)}")
        if self.learned.schedule not in LR_SCHEDULES:
            problems.append(f"--lr-schedule {self.learned.schedule}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.quip_storage not in QUIP_STORAGE:
            problems.append(f"QuIP storage {self.quip_storage}: choose one of {', '.join(QUIP_STORAGE)}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha {self.alpha}: must be in [0, 1]")
        if self.damp <= 0 or self.block < 1 or self.learned.iters < 0:
            problems.append("damping must be > 0, the block >= 1 and iterations >= 0")
        p = self.input_scale_percentile
        if p is not None and not 0 < p <= 100:
            problems.append(f"activation percentile {p}: must be in (0, 100]")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def needs_calibration(self) -> bool:
        """Whether any setting reads calibration statistics (RTN alone does not)."""
        return (self.method != "rtn" or self.smoothquant or self.bias_correction
                or self.input_scale_percentile is not None)

    def with_(self, **changes: Any) -> OptimizerConfig:
        return replace(self, **changes)
