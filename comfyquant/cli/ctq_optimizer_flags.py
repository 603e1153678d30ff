"""convert_to_quant's optimizer, calibration and memory flags, mapped onto comfyquant's optimizers.

Kept apart from ``convert_to_quant.py`` so that file only calls :func:`add_args` and :func:`resolve`.
Learned-rounding names (``original``, ``adamw``, ``radam``, ``prodigy``) select comfyquant's learned
rounding with that optimizer; ``gptq`` and ``quip`` select those methods. Without ``--calibration FILE`` the
optimizers calibrate on synthetic inputs, as convert_to_quant does, and the report says so. Memory and
precision knobs of the peer's implementation are accepted and reported as having no effect (comfyquant
always streams one tensor at a time and computes in float32).
"""

from __future__ import annotations

import argparse

from comfyquant.errors import UserError
from comfyquant.optimize.config import LearnedConfig, OptimizerConfig

LEARNED_NAMES = ("original", "adamw", "radam", "prodigy")
# flags accepted for compatibility whose effect comfyquant does not need, with the reason (printed as a note)
NO_EFFECT = {
    "streaming_mode": "comfyquant always streams one tensor at a time",
    "bf16_compute": "comfyquant computes the optimizers in float32/float64",
    "bf16_threshold": "comfyquant computes the optimizers in float32/float64",
    "bf16_hadamard_threshold": "comfyquant computes the optimizers in float32/float64",
    "bf16_hessian_threshold": "comfyquant computes the optimizers in float32/float64",
    "no_memory_limits": "comfyquant has no OOM guard to disable",
    "quip_checkpointed": "comfyquant's LDLQ already works one column block at a time",
    "quip_checkpoint_threshold": "comfyquant's LDLQ already works one column block at a time",
    "quip_checkpoint_segments": "comfyquant's LDLQ already works one column block at a time",
    "top_p": "comfyquant's learned rounding minimizes the output error on calibration inputs, not in an SVD subspace",
    "min_k": "comfyquant's learned rounding minimizes the output error on calibration inputs, not in an SVD subspace",
    "max_k": "comfyquant's learned rounding minimizes the output error on calibration inputs, not in an SVD subspace",
    "full_matrix": "comfyquant's learned rounding uses no SVD",
    "use_speed": "comfyquant's Prodigy has no speed variant",
    "lr_adaptive_mode": "comfyquant's adaptive schedule has one counter mode",
    "lr_shape_influence": "comfyquant's plateau schedule is not shape-dependent",
    "calib_samples": "comfyquant's synthetic calibration draws 256 rows per layer",
    "calib_cpu": "calibration statistics are read one layer at a time",
    "actcal_samples": "the statistics come from the calibration file",
    "actcal_seed": "the statistics come from the calibration file",
    "actcal_device": "the statistics come from the calibration file",
}
HANDLED = (
    "optimizer smoothquant smoothquant_alpha calibration calibration_lora quip_requant_scheme quip_store_transformed "
    "lr num_iter lr_schedule lr_gamma lr_patience lr_factor lr_min lr_cooldown lr_threshold lr_threshold_mode "
    "early_stop_loss early_stop_lr early_stop_stall esloss eslr esstall bias_correction actcal actcal_percentile "
    "actcal_lora"
).split() + list(NO_EFFECT)


def _alts(name: str, *extra: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}", *extra]))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=(*LEARNED_NAMES, "gptq", "quip"),
                   help="original/adamw/radam/prodigy: learned rounding with that optimizer; gptq; quip")
    p.add_argument(*_alts("calibration"), dest="calibration", metavar="FILE|synthetic",
                   help="statistics from `comfyquant calibrate` (default for optimizers: synthetic)")
    p.add_argument(*_alts("calibration_lora"), dest="calibration_lora", metavar="LORA")
    p.add_argument("--smoothquant", action="store_true")
    p.add_argument(*_alts("smoothquant_alpha", "--alpha"), dest="smoothquant_alpha", type=float, default=0.5)
    p.add_argument(*_alts("bias_correction"), dest="bias_correction", action="store_true")
    p.add_argument(*_alts("quip_requant_scheme"), dest="quip_requant_scheme", choices=("tensor", "block"))
    p.add_argument(*_alts("quip_store_transformed"), dest="quip_store_transformed", action="store_true")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(*_alts("num_iter"), dest="num_iter", type=int, default=None)
    p.add_argument(*_alts("lr_schedule"), dest="lr_schedule", choices=("adaptive", "exponential", "plateau"))
    for name, typ in (("lr_gamma", float), ("lr_patience", int), ("lr_factor", float), ("lr_min", float),
                      ("lr_cooldown", int), ("lr_threshold", float)):
        p.add_argument(*_alts(name), dest=name, type=typ, default=None)
    p.add_argument(*_alts("lr_threshold_mode"), dest="lr_threshold_mode", choices=("rel", "abs"), default=None)
    p.add_argument(*_alts("early_stop_loss", "-esloss"), dest="early_stop_loss", type=float, default=None)
    p.add_argument(*_alts("early_stop_lr", "-eslr"), dest="early_stop_lr", type=float, default=None)
    p.add_argument(*_alts("early_stop_stall", "-esstall"), dest="early_stop_stall", type=int, default=None)
    p.add_argument("--actcal", action="store_true")
    p.add_argument(*_alts("actcal_percentile"), dest="actcal_percentile", type=float, default=99.9)
    p.add_argument(*_alts("actcal_lora"), dest="actcal_lora")
    for name in NO_EFFECT:
        p.add_argument(*_alts(name), dest=f"noeffect_{name}", nargs="?", const=True, default=None)


def resolve(a: argparse.Namespace, fmt: str) -> tuple[OptimizerConfig | None, str | None, str | None, str, list[str]]:
    """(optimizer config or None for RTN, calibration, calibration LoRA, format, notes) from the flags."""
    notes = [f"--{n.replace('_', '-')} accepted, no effect: {why}" for n, why in NO_EFFECT.items()
             if getattr(a, f"noeffect_{n}") is not None]
    opt = a.optimizer
    if opt is not None and a.simple:
        raise UserError("--simple (round to nearest) cannot be combined with --optimizer")
    if a.quip_requant_scheme or a.quip_store_transformed:
        if opt != "quip":
            raise UserError("--quip-requant-scheme / --quip-store-transformed need --optimizer quip")
        if fmt == "fp16":
            raise UserError("--optimizer quip writes int8, not --fp16")
        fmt = "int8-rot" if a.quip_store_transformed else {"tensor": "int8-tensor", "block": "int8-block"}[
            a.quip_requant_scheme] if a.quip_requant_scheme else fmt
    lora = a.calibration_lora or a.actcal_lora
    if opt is None and not (a.smoothquant or a.bias_correction or a.actcal or lora):
        if a.calibration:
            raise UserError("--calibration needs --optimizer, --smoothquant, --bias-correction or --actcal")
        return None, None, None, fmt, notes
    defaults = LearnedConfig()
    knobs = {k: getattr(a, k) for k in ("lr_gamma", "lr_patience", "lr_factor", "lr_min", "lr_cooldown",
                                         "lr_threshold", "lr_threshold_mode", "early_stop_loss", "early_stop_lr",
                                         "early_stop_stall") if getattr(a, k) is not None}
    learned = LearnedConfig(optimizer=opt if opt in LEARNED_NAMES else "adamw",
                            iters=a.num_iter if a.num_iter is not None else defaults.iters, lr=a.lr,
                            schedule=a.lr_schedule or defaults.schedule, **knobs)
    method = "learned" if opt in LEARNED_NAMES else (opt or "rtn")
    cfg = OptimizerConfig(method=method, learned=learned, smoothquant=a.smoothquant, alpha=a.smoothquant_alpha,
                          bias_correction=a.bias_correction,
                          input_scale_percentile=a.actcal_percentile if a.actcal else None,
                          device=a.device)
    calibration = a.calibration
    if calibration is None and (cfg.needs_calibration or lora):
        calibration = "synthetic"
        notes.append("no --calibration FILE: calibrating on synthetic inputs, as convert_to_quant does (make a "
                     "real one with `comfyquant calibrate`)")
    return cfg, calibration, lora, fmt, notes
