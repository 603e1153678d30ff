"""The optimizer flags shared by ``comfyquant convert`` and ``comfyquant eval`` (argparse wiring only)."""

from __future__ import annotations

import argparse

from comfyquant.errors import UserError
from comfyquant.optimize.config import (
    LEARNED_OPTIMIZERS,
    LR_SCHEDULES,
    METHODS,
    LearnedConfig,
    OptimizerConfig,
)

# --quip-requant-scheme: the format the folded QuIP weight is requantized to, for an int8 --format.
REQUANT_FORMATS = {"tensor": "int8-tensor", "block": "int8-block"}


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rounding optimizers (docs/OPTIMIZERS.md)")
    g.add_argument("--optimizer", default="rtn", choices=METHODS,
                   help="rtn (round to nearest, default), gptq, learned (AdaRound-style), quip")
    g.add_argument("--calibration", metavar="FILE|synthetic",
                   help="statistics from `comfyquant calibrate` (or 'synthetic': standard-normal inputs)")
    g.add_argument("--calibration-lora", metavar="LORA", help="weight the Hessians toward a LoRA's input directions")
    g.add_argument("--smoothquant", action="store_true",
                   help="migrate activation outliers into the weights, folded into the preceding norm/modulation")
    g.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    g.add_argument("--bias-correction", action="store_true", help="move the mean output error into the bias")
    g.add_argument("--actcal", action="store_true", help="FP8: static input_scale from calibrated activations")
    g.add_argument("--actcal-percentile", type=float, default=100.0,
                   help="|x| percentile for --actcal (default 100 = absmax)")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ/QuIP damping, fraction of the mean Hessian diagonal")
    g.add_argument("--gptq-block", type=int, default=128, help="GPTQ lazy-update block width (default 128)")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: natural column order")
    g.add_argument("--learned-optimizer", default="adamw", choices=LEARNED_OPTIMIZERS,
                   help="optimizer of learned rounding (default adamw)")
    g.add_argument("--num-iter", type=int, default=LearnedConfig.iters, help="learned rounding steps per layer")
    g.add_argument("--lr", type=float, default=None, help="learned rounding learning rate")
    g.add_argument("--lr-schedule", default=LearnedConfig.schedule, choices=LR_SCHEDULES,
                   help=f"learned rounding LR schedule (default {LearnedConfig.schedule})")
    g.add_argument("--quip-storage", default="auto", choices=("auto", "folded", "convrot"),
                   help="QuIP result: convrot (needs --format int8-rot), folded (plain file), auto")
    g.add_argument("--quip-requant-scheme", choices=sorted(REQUANT_FORMATS),
                   help="folded QuIP with an int8 --format: requantize per tensor or per block")


def optimizer_config(a: argparse.Namespace, device: str | None = None) -> OptimizerConfig:
    learned = LearnedConfig(optimizer=a.learned_optimizer, iters=a.num_iter, lr=a.lr, schedule=a.lr_schedule)
    return OptimizerConfig(method=a.optimizer, damp=a.damp, block=a.gptq_block, act_order=not a.no_act_order,
                           learned=learned, quip_storage=a.quip_storage, smoothquant=a.smoothquant,
                           alpha=a.alpha, bias_correction=a.bias_correction,
                           input_scale_percentile=a.actcal_percentile if a.actcal else None, device=device)


def resolve_requant(fmt: str, a: argparse.Namespace) -> str:
    """The format after ``--quip-requant-scheme`` (only for QuIP with an int8 format)."""
    if a.quip_requant_scheme is None:
        return fmt
    if a.optimizer != "quip" or not fmt.startswith("int8") or fmt == "int8-rot":
        raise UserError("--quip-requant-scheme applies to --optimizer quip with a non-rotated int8 --format")
    return REQUANT_FORMATS[a.quip_requant_scheme]
