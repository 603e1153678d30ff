"""The ``comfyquant`` command line: argument parsing and exit codes only; the work happens in the API.

Exit codes: 0 done, 2 bad input or usage (one line ``comfyquant: error: ...`` on stderr, also for Ctrl-C),
1 a bug (traceback). Subcommands are one row each in ``COMMANDS`` (parsed here) or ``EXTERNAL``
(``"module:function"`` entry points that parse their own ``argv``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from comfyquant.errors import UserError
from comfyquant.exits import argv_or_sys, run_cli

if TYPE_CHECKING:
    from comfyquant.distributed.config import DistConfig


def format_choices() -> list[str]:
    """Every registered format's CLI name (the registry decides what --format accepts)."""
    from comfyquant.formats import REGISTRY

    return REGISTRY.names()


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as a UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


# -- convert ------------------------------------------------------------------------------------------------
def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help=".safetensors file or sharded *.safetensors.index.json")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output .safetensors file")
    p.add_argument("--format", default="int8", choices=format_choices(), help="output format (default: int8)")
    p.add_argument("--fallback", metavar="FORMAT",
                   help="format for layers whose shape cannot take --format (e.g. K not a multiple of the "
                        "rotation group), or 'none' to keep them in high precision (default: the format's own "
                        "fallback, int8-rot -> int8; others stay in high precision)")
    p.add_argument("--model", default="auto", help="model preset, or auto to detect it (default: auto)")
    p.add_argument("--layer-config", metavar="FILE", help="JSON of ordered regex rules -> format or skip")
    p.add_argument("--report", metavar="FILE.json", help="write the per-layer quality report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw per-layer SQNR as a PNG (needs matplotlib)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the quantization math runs")
    p.add_argument("--low-memory", action="store_true",
                   help="error statistics on a 256K-element row sample per layer (instead of 1M) and GPU "
                        "memory freed after every tensor")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUTPUT; keep NaN/Inf layers in high precision instead of failing")
    p.add_argument("--block-size", type=int, default=128, help="tile edge for int8-block (default: 128)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no report table (the bar is shown only when stderr is a terminal)")
    from comfyquant.optimize.cli_flags import add_optimizer_args

    add_optimizer_args(p)
    add_dist_args(p)


def add_dist_args(p: argparse.ArgumentParser) -> None:
    """Flags that matter only under ``torchrun --nproc-per-node N -m comfyquant ...``."""
    g = p.add_argument_group("several processes / GPUs (under torchrun)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: longest wait on another rank before the job fails as hung "
                        "(default 1800; a killed rank ends the job at once)")


def dist_config(a: argparse.Namespace) -> DistConfig | None:
    """The distributed job this process was launched in by torchrun (read from its environment variables
    here, at the edge), or None for a plain single-process run."""
    from comfyquant.distributed.config import from_torchrun_env

    return from_torchrun_env(os.environ, a.dist_timeout)


def _run_convert(a: argparse.Namespace) -> int:
    from comfyquant.convert.api import convert, convert_options, write_outputs
    from comfyquant.optimize.cli_flags import optimizer_config, resolve_requant

    kwargs = dict(format=resolve_requant(a.format, a), model=a.model, layer_config=a.layer_config,
                  device=a.device, low_memory=a.low_memory, force=a.force, block_size=a.block_size,
                  progress=not a.quiet and sys.stderr.isatty(), fallback=a.fallback,
                  optimizer=optimizer_config(a, a.device), calibration=a.calibration,
                  calibration_lora=a.calibration_lora)
    job = dist_config(a)
    if job is None:
        report = convert(a.input, a.output, report=a.report, plot=a.plot, **kwargs)
    else:
        from comfyquant.distributed import Session
        from comfyquant.distributed.convert import convert_distributed

        if a.plot is not None:
            from comfyquant.convert.plot import require_matplotlib

            require_matplotlib()
        with Session(job, "comfyquant", "cuda" if a.device.startswith("cuda") else "cpu") as s:
            report = convert_distributed(a.input, a.output, convert_options(**kwargs), s, announce=not a.quiet)
        if report is None:  # not rank 0: rank 0 writes the file, the report and the table
            return 0
        write_outputs(report, a.report, a.plot)
    if not a.quiet:
        print(report.to_text())
        print(f"wrote {a.output}")
    return 0


# -- inspect / template / edit (thin wiring to comfyquant.convert.{inspect,template,edit}) -----------------
def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto", help="model preset, or auto to detect it (default: auto)")
    p.add_argument("--format", default="int8", choices=format_choices(), help="planned format (default: int8)")
    p.add_argument("--layer-config", metavar="FILE", help="JSON of ordered regex rules -> format or skip")
    p.add_argument("--block-size", type=int, default=128, help="tile edge for int8-block (default: 128)")


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help=".safetensors file or sharded index")
    _add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_inspect(a: argparse.Namespace) -> int:
    from comfyquant.convert.inspect import inspect_checkpoint

    result = inspect_checkpoint(a.file, model=a.model, fmt=a.format, block_size=a.block_size,
                                layer_config=a.layer_config)
    print(json.dumps(result.to_dict(), indent=1) if a.json else result.to_text())
    return 0


def _add_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help=".safetensors file or sharded index")
    p.add_argument("-o", "--output", required=True, metavar="layers.json")
    _add_plan_args(p)
    p.add_argument("--force", action="store_true", help="overwrite the output file")


def _run_template(a: argparse.Namespace) -> int:
    from comfyquant.convert.template import write_template

    n = write_template(a.input, a.output, model=a.model, fmt=a.format, block_size=a.block_size,
                       force=a.force, layer_config=a.layer_config)
    print(f"wrote {a.output} ({n} rules)")
    return 0


def _add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--remove-keys", default="", metavar="K1,K2",
                   help="comma-separated tensor names, or comfy_quant keys to delete from every layer config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--to-header-metadata", action="store_true",
                   help="move per-layer comfy_quant tensors into the legacy header entry")
    g.add_argument("--to-layer-metadata", action="store_true",
                   help="move legacy header / scaled_fp8 metadata into per-layer comfy_quant tensors")
    p.add_argument("--force", action="store_true", help="overwrite OUT")


def _run_edit(a: argparse.Namespace) -> int:
    from comfyquant.convert.edit import edit_checkpoint

    keys = tuple(k.strip() for k in a.remove_keys.split(",") if k.strip())
    result = edit_checkpoint(a.file, a.output, remove_keys=keys, to_header_metadata=a.to_header_metadata,
                             to_layer_metadata=a.to_layer_metadata, force=a.force)
    print(result.to_text())
    return 0


# name -> (help, add arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "convert": ("convert a float checkpoint to a quantized ComfyUI checkpoint", _add_convert, _run_convert),
    "inspect": ("show the conversion plan, or what a quantized file holds", _add_inspect, _run_inspect),
    "template": ("write a --layer-config template for a model", _add_template, _run_template),
    "edit": ("edit a quantized file's keys and metadata", _add_edit, _run_edit),
}

# name -> (help, "module:function" taking argv: list[str] and returning an exit status)
EXTERNAL: dict[str, tuple[str, str]] = {
    "bench": ("benchmark quantized kernels", "comfyquant.bench.layers:main"),
    "eval": ("evaluate a quantized model against its float original", "comfyquant.eval.cli:eval_main"),
    "demo": ("convert and run the built-in example model", "comfyquant.eval.cli:demo_main"),
    "calibrate": ("run a model on real inputs and save per-layer statistics", "comfyquant.cli.calibrate:main"),
}


def build_parser() -> argparse.ArgumentParser:
    from comfyquant import __version__

    parser = _Parser(prog="comfyquant", description="Quantize diffusion-model checkpoints for ComfyUI.",
                     epilog="more: " + ", ".join(f"{k} ({v[0]})" for k, v in EXTERNAL.items()))
    parser.add_argument("--version", action="version", version=f"comfyquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def _run_external(name: str, argv: list[str]) -> int:
    module_name, _, func = EXTERNAL[name][1].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserError(f"the '{name}' command is not available in this installation") from None
        raise
    return int(getattr(module, func or "main")(argv) or 0)


def run(argv: Sequence[str]) -> int:
    """Dispatch one command line (raises UserError for bad usage)."""
    argv = list(argv)
    if argv and argv[0] in EXTERNAL:
        return _run_external(argv[0], argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help(sys.stderr)
        return 2
    return COMMANDS[a.command][2](a)


def prog_name(environ: Mapping[str, str]) -> str:
    """``comfyquant``, with the rank when torchrun started several processes (their errors interleave)."""
    world = environ.get("WORLD_SIZE")
    if world is None or world == "1":
        return "comfyquant"
    return f"comfyquant [rank {environ.get('RANK', '?')}/{world}]"


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: maps UserError and Ctrl-C to exit 2, bugs to exit 1."""
    return run_cli(prog_name(os.environ), run, argv_or_sys(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
