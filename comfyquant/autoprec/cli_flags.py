"""The ``--format auto`` flags shared by ``comfyquant convert``, ``inspect`` and ``eval`` (argparse only)."""

from __future__ import annotations

import argparse

from comfyquant.autoprec.budget import HELP
from comfyquant.formats import GPU_GENERATIONS


def add_auto_args(p: argparse.ArgumentParser) -> None:
    """``--budget``, ``--target-gpu``, ``--allow-comfyquant-formats``."""
    g = p.add_argument_group("automatic precision, --format auto (docs/AUTO_PRECISION.md)")
    g.add_argument("--budget", metavar="KIND=VALUE", help=HELP)
    g.add_argument("--target-gpu", choices=GPU_GENERATIONS,
                   help="GPU the file is for: formats needing a newer one are not candidates (nvfp4 and mxfp8 "
                        "need blackwell; default: any GPU)")
    g.add_argument("--allow-comfyquant-formats", action="store_true",
                   help="also formats stock ComfyUI 0.30 cannot load (int8-block): the file then needs "
                        "comfyquant's runtime or node pack")
