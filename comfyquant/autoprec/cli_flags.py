"""The ``--format auto`` flags shared by ``comfyquant convert``, ``inspect`` and ``eval`` (argparse only)."""

from __future__ import annotations

import argparse

from comfyquant.autoprec.budget import HELP
from comfyquant.autoprec.plan import AutoConfig
from comfyquant.formats import GPU_GENERATIONS


def add_auto_args(p: argparse.ArgumentParser) -> None:
    """``--budget``, ``--target-gpu``, ``--allow-comfyquant-formats``, ``--auto-confidence``, ``--auto-margin-db``."""
    g = p.add_argument_group("automatic precision, --format auto (docs/AUTO_PRECISION.md)")
    g.add_argument("--budget", metavar="KIND=VALUE", help=HELP)
    g.add_argument("--target-gpu", choices=GPU_GENERATIONS,
                   help="GPU the file is for: formats needing a newer one are not candidates (nvfp4 and mxfp8 "
                        "need blackwell; default: any GPU)")
    g.add_argument("--allow-comfyquant-formats", action="store_true",
                   help="also formats stock ComfyUI 0.30 cannot load (int8-block): the file then needs "
                        "comfyquant's runtime or node pack")
    g.add_argument("--auto-confidence", type=float, metavar="P",
                   help="a psnr=/cosine= floor must hold on this one-sided lower confidence bound of the "
                        "calibration items' mean, 0.5 <= P < 1 (0.5: on the mean itself; higher: more headroom "
                        f"where the items spread or are few; default {AutoConfig.confidence:g})")
    g.add_argument("--auto-margin-db", type=float, metavar="DB",
                   help="fixed headroom in dB on top of that bound for a psnr=/cosine= floor, >= 0 (for what the "
                        "calibration items cannot show; cosine: on 1 - cos as a factor; default "
                        f"{AutoConfig.margin_db:g})")
