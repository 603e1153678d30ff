"""Argument parsing for ``comfyquant eval`` and ``comfyquant demo`` (wired into ``comfyquant.cli.main``).

Both ``main`` functions return an exit status: 0 done, 2 a user mistake (one line on stderr).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from comfyquant.errors import UserError
from comfyquant.eval.sampling import SampleConfig
from comfyquant.exits import run_cli
from comfyquant.progress import HELP as PROGRESS_HELP
from comfyquant.progress import Progress


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (exit 2) like every other comfyquant command, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="comfyquant eval", epilog=PROGRESS_HELP,
                description="Measure a quantized reference model against its float original.")
    p.add_argument("--model", help="minilm | digits-dit | a .safetensors file (float reference or quantized)")
    p.add_argument("--format", help="comfyquant format to convert to (int8, int8-rot, int8-tensor, fp8, ..., or "
                                    "auto with --budget)")
    p.add_argument("--peer", choices=("simple", "default"),
                   help="convert with convert_to_quant 1.3.4 instead (its --simple RTN or default optimizer)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder (default: eval-out)")
    p.add_argument("--per-class", type=int, default=SampleConfig.per_class, help="DiT samples per digit")
    p.add_argument("--steps", type=int, default=SampleConfig.steps, help="DiT Euler steps")
    p.add_argument("--cfg", type=float, default=SampleConfig.cfg, help="DiT classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=SampleConfig.seed, help="DiT sampling seed")
    p.add_argument("--sentences", type=int, default=None, help="MiniLM: use only the first N sentences")
    p.add_argument("--lora", type=Path, metavar="FILE", help="evaluate with this LoRA: the reference is the float "
                   "model with it merged (docs/LORA.md)")
    p.add_argument("--lora-mode", default="merge", choices=("merge", "bake", "dynamic"),
                   help="merge into the float weights before quantizing (default), or bake / run dynamically after")
    p.add_argument("--lora-strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--stochastic", action="store_true", help="--lora-mode bake: stochastic rounding")
    p.add_argument("--extract-lora", type=int, default=0, metavar="RANK",
                   help="also extract the quantization error at this rank and run it as a dynamic LoRA")
    p.add_argument("--compare", nargs="+", type=Path, metavar="REPORT.json",
                   help="print these reports side by side and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress (the result table is still printed)")
    from comfyquant.autoprec.cli_flags import add_auto_args
    from comfyquant.optimize.cli_flags import add_optimizer_args

    add_auto_args(p)
    add_optimizer_args(p)
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """``comfyquant eval ...``: exit 0, or 2 with one line for a user mistake (the shared CLI guard)."""
    return run_cli("comfyquant eval", _eval, argv)


def _eval(argv: list[str] | None) -> int:
    args = eval_parser().parse_args(argv)
    if args.compare:
        from comfyquant.eval.compare import compare_files

        print(compare_files(args.compare), end="")
        return 0
    if not args.model:
        raise UserError("--model is required (minilm, digits-dit or a file), or use --compare")
    from comfyquant.eval.compare import side_by_side
    from comfyquant.eval.harness import EvalConfig, run_eval
    from comfyquant.optimize.cli_flags import optimizer_config, resolve_requant

    argv_list = sys.argv[1:] if argv is None else argv
    fmt = resolve_requant(args.format, args) if args.format else None
    cfg = EvalConfig(model=args.model, format=fmt, out=args.out, optimizer=optimizer_config(args),
                     calibration=args.calibration, calibration_lora=args.calibration_lora,
                     peer=args.peer, sentences=args.sentences,
                     sampling=SampleConfig(args.steps, args.cfg, args.per_class, args.seed),
                     command="comfyquant eval " + shlex.join(argv_list), lora=args.lora, lora_mode=args.lora_mode,
                     lora_strength=args.lora_strength, stochastic=args.stochastic, extract_lora=args.extract_lora,
                     progress=Progress(mode="off" if args.quiet else "auto", prog="comfyquant eval"),
                     budget=args.budget, target_gpu=args.target_gpu,
                     allow_comfyquant_formats=args.allow_comfyquant_formats,
                     auto_confidence=args.auto_confidence, auto_margin_db=args.auto_margin_db)
    report = run_eval(cfg)
    print(side_by_side([report], [f"{report['model']} {report['format']}"]), end="")
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'}, {args.out / 'layers.png'}")
    return 0


def demo_main(argv: list[str] | None = None) -> int:
    """``comfyquant demo [--out DIR]``: exit 0, or 2 with one line for a user mistake."""
    return run_cli("comfyquant demo", _demo, argv)


def _demo(argv: list[str] | None) -> int:
    p = _Parser(prog="comfyquant demo", epilog=PROGRESS_HELP,
                description="Convert the bundled digits DiT to int8 and show what changed.")
    p.add_argument("--out", type=Path, default=Path("comfyquant-demo"), help="output folder")
    p.add_argument("--format", default="int8", help="format to demonstrate (default int8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress (the results are still printed)")
    args = p.parse_args(argv)
    from comfyquant.eval.demo import DEMO_SAMPLING, run_demo

    run_demo(args.out, args.format, DEMO_SAMPLING,
             Progress(mode="off" if args.quiet else "auto", prog="comfyquant demo"))
    return 0


# The names comfyquant.cli.main registers.
main_eval = eval_main
main_demo = demo_main
