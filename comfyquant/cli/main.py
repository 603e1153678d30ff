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

from comfyquant.autoprec.cli_flags import add_auto_args
from comfyquant.errors import UserError
from comfyquant.exits import argv_or_sys, run_cli
from comfyquant.presets.fit import STRICT_HELP
from comfyquant.progress import HELP as PROGRESS_HELP
from comfyquant.progress import Progress

if TYPE_CHECKING:
    from comfyquant.convert.choices import LayerOptions
    from comfyquant.distributed.config import DistConfig


def format_choices() -> list[str]:
    """Every registered format's CLI name (the registry decides what --format accepts), and ``auto``."""
    from comfyquant.formats import REGISTRY

    return [*REGISTRY.names(), "auto"]


def auto_probe(fmt: str, model: str) -> object | None:
    """The workload probe of a reference model for ``--format auto`` (None for other models / formats)."""
    if fmt != "auto":
        return None
    try:
        from comfyquant.eval.autoprobe import probe_for
    except ImportError:  # pragma: no cover - an installation without the eval extra
        return None
    return probe_for(model)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as a UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        # run_cli prefixes "comfyquant: error: "; the command's name is in the --help hint
        raise UserError(f"{message} (see {self.prog} --help)")


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
    p.add_argument("--strict-preset", action="store_true", help=STRICT_HELP)
    g = p.add_argument_group("LoRA (docs/LORA.md)")
    g.add_argument("--merge-lora", action="append", default=[], metavar="LORA[:SCALE]",
                   help="merge this LoRA into the float weights before quantizing (repeatable; in order)")
    g.add_argument("--merge-lora-scale", type=float, default=1.0, metavar="S",
                   help="global strength multiplier for every merged LoRA (default: 1.0)")
    g.add_argument("--no-dampen", action="store_true",
                   help="merge several LoRAs at full strength (default: the i-th at 0.9^(i-1))")
    g.add_argument("--extract-lora", type=int, default=0, metavar="RANK",
                   help="also write the rank-RANK SVD of each quantized layer's error as a correcting LoRA")
    g.add_argument("--extract-lora-output", metavar="FILE",
                   help="where --extract-lora writes (default: OUTPUT stem + _qerr_r<RANK>.safetensors)")
    g.add_argument("--extract-lora-target", metavar="REGEX",
                   help="--extract-lora only for quantized layers whose name matches this regex")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress and no report table (warnings and errors are still printed)")
    add_auto_args(p)
    from comfyquant.optimize.cli_flags import add_optimizer_args

    add_optimizer_args(p)
    _add_layer_args(p)
    p.epilog = PROGRESS_HELP
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


def _progress(a: argparse.Namespace) -> Progress:
    return Progress(mode="off" if getattr(a, "quiet", False) else "auto", prog="comfyquant")


def _add_layer_args(p: argparse.ArgumentParser) -> None:
    """Per-layer choices (``convert.choices.LayerOptions``), shared by convert, inspect and template."""
    g = p.add_argument_group("per-layer choices (docs/LAYER_CONFIG.md)")
    g.add_argument("--rule", action="append", default=[], metavar="PATTERN=FORMAT[,opt=val]",
                   help="a layer rule after the --layer-config file's rules, first match wins (repeatable), "
                        "e.g. 'mlp=int8-block,block_size=64' or 'img_in=skip'")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep the linear layers this regex finds in high precision (repeatable)")
    g.add_argument("--excluded-format", metavar="FORMAT[,opt=val]",
                   help="store excluded layers (--exclude and the preset's high-precision layers) in this format "
                        "instead of keeping them")
    g.add_argument("--keep-dtype", choices=_cast_choices(),
                   help="store every floating tensor that is not quantized (norms, biases, kept layers) in this dtype")
    g.add_argument("--preserve-dtype", action="append", default=[], metavar="REGEX",
                   help="tensors this regex finds keep their own dtype under --keep-dtype (repeatable)")
    g.add_argument("--full-precision-matrix-mult", action="store_true",
                   help="mark every quantized layer full_precision_matrix_mult (ComfyUI computes it in bf16/fp16)")
    g.add_argument("--convrot-group-size", type=int, metavar="N",
                   help="Hadamard group of int8-rot layers, a power of 4 (default: per layer, the largest <= 256 "
                        "dividing in_features)")
    g.add_argument("--input-scale", action="store_true",
                   help="fp8 layers also store a unit static activation scale (input_scale = 1.0)")
    g.add_argument("--align", type=int, metavar="N",
                   help="keep in high precision the linear layers whose dimensions are not multiples of N")


def _cast_choices() -> list[str]:
    from comfyquant.formats import REGISTRY

    return [f.name for f in REGISTRY.formats() if not f.is_quantized]


def _layer_options(a: argparse.Namespace) -> LayerOptions:
    from comfyquant.convert.choices import LayerOptions
    from comfyquant.convert.layer_config import parse_format_spec, parse_rule

    return LayerOptions(
        rules=tuple(parse_rule(r) for r in a.rule), exclude=tuple(a.exclude),
        excluded=parse_format_spec(a.excluded_format, "--excluded-format") if a.excluded_format else None,
        keep_dtype=a.keep_dtype, preserve_dtype=tuple(a.preserve_dtype),
        full_precision_matrix_mult=a.full_precision_matrix_mult, convrot_groupsize=a.convrot_group_size,
        input_scale=a.input_scale, align=a.align)


def _run_convert(a: argparse.Namespace) -> int:
    from comfyquant.convert.api import convert, convert_options, write_outputs
    from comfyquant.optimize.cli_flags import optimizer_config, resolve_requant

    kwargs = dict(format=resolve_requant(a.format, a), model=a.model, layer_config=a.layer_config,
                  device=a.device, low_memory=a.low_memory, force=a.force, block_size=a.block_size,
                  progress=_progress(a), strict_preset=a.strict_preset, fallback=a.fallback,
                  optimizer=optimizer_config(a, a.device), calibration=a.calibration,
                  calibration_lora=a.calibration_lora, layers=_layer_options(a), merge_loras=a.merge_lora,
                  merge_lora_scale=a.merge_lora_scale, merge_lora_dampen=not a.no_dampen,
                  extract_lora=a.extract_lora, extract_lora_output=a.extract_lora_output,
                  extract_lora_target=a.extract_lora_target, budget=a.budget, target_gpu=a.target_gpu,
                  allow_comfyquant_formats=a.allow_comfyquant_formats, auto_confidence=a.auto_confidence,
                  auto_margin_db=a.auto_margin_db)
    job = dist_config(a)
    if job is None:
        report = convert(a.input, a.output, report=a.report, plot=a.plot, probe=auto_probe(a.format, a.input),
                         **kwargs)
    else:
        from comfyquant.distributed import Session
        from comfyquant.distributed.convert import convert_distributed, refuse_in_job

        if a.plot is not None:
            from comfyquant.convert.plot import require_matplotlib

            require_matplotlib()
        opts = convert_options(a.output, **kwargs)
        refuse_in_job(opts)  # every rank says it, before any rank joins (and could end the others' job)
        with Session(job, "comfyquant", "cuda" if a.device.startswith("cuda") else "cpu") as s:
            report = convert_distributed(a.input, a.output, opts, s, announce=not a.quiet)
        if report is None:  # not rank 0: rank 0 writes the file, the report and the table
            return 0
        write_outputs(report, a.report, a.plot)
    if not a.quiet:
        print(report.to_text())
        print(f"wrote {a.output}")
        for what, path in (("report", a.report), ("plot", a.plot)):
            if path:
                print(f"wrote {what} {path}")
    return 0


# -- inspect / template / edit (thin wiring to comfyquant.convert.{inspect,template,edit}) -----------------
def _add_plan_args(p: argparse.ArgumentParser, auto: bool = True) -> None:
    p.add_argument("--model", default="auto", help="model preset, or auto to detect it (default: auto)")
    choices = format_choices() if auto else [f for f in format_choices() if f != "auto"]
    p.add_argument("--format", default="int8", choices=choices, help="planned format (default: int8)")
    p.add_argument("--layer-config", metavar="FILE", help="JSON of ordered regex rules -> format or skip")
    p.add_argument("--block-size", type=int, default=128, help="tile edge for int8-block (default: 128)")
    p.add_argument("--strict-preset", action="store_true", help=STRICT_HELP)
    _add_layer_args(p)


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help=".safetensors file or sharded index")
    _add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_auto_args(p)
    p.add_argument("--calibration", metavar="FILE", help="--format auto: layer statistics from `comfyquant calibrate`")
    p.add_argument("--device", default="cpu", help="--format auto: where the sensitivity math runs")


def _run_inspect(a: argparse.Namespace) -> int:
    from comfyquant.convert.inspect import inspect_checkpoint
    from comfyquant.convert.preset_check import preset_warning

    result = inspect_checkpoint(a.file, model=a.model, fmt=a.format, block_size=a.block_size,
                                layer_config=a.layer_config, layers=_layer_options(a), budget=a.budget,
                                target_gpu=a.target_gpu, allow_comfyquant_formats=a.allow_comfyquant_formats,
                                calibration=a.calibration, device=a.device, probe=auto_probe(a.format, a.file),
                                auto_confidence=a.auto_confidence, auto_margin_db=a.auto_margin_db)
    if result.kind == "float":  # a quantized file is described as it is; --model plays no part there
        warning = preset_warning(a.file, a.model, a.strict_preset, _progress(a))
        if warning is not None:
            result.notes.append(warning)
    print(json.dumps(result.to_dict(), indent=1) if a.json else result.to_text())
    return 0


def _add_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help=".safetensors file or sharded index")
    p.add_argument("-o", "--output", required=True, metavar="layers.json")
    _add_plan_args(p, auto=False)
    p.add_argument("--force", action="store_true", help="overwrite the output file")


def _run_template(a: argparse.Namespace) -> int:
    from comfyquant.convert.template import write_template

    n = write_template(a.input, a.output, model=a.model, fmt=a.format, block_size=a.block_size,
                       force=a.force, layer_config=a.layer_config, strict_preset=a.strict_preset,
                       progress=_progress(a), layers=_layer_options(a))
    print(f"wrote {a.output} ({n} rules)")
    return 0


def _add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--remove-keys", default="", metavar="K1,K2",
                   help="comma-separated tensor names, or comfy_quant keys to delete from every layer config")
    p.add_argument("--add-keys", metavar="\"'KEY': VALUE, ...\"",
                   help="set comfy_quant keys in every layer config, e.g. \"'full_precision_matrix_mult': true\" "
                        "(keys that decide how the weights decode, such as format or group_size, are refused)")
    p.add_argument("--layers", metavar="REGEX", help="--remove-keys / --add-keys edit only the layers REGEX finds")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--to-header-metadata", action="store_true",
                   help="move per-layer comfy_quant tensors into the legacy header entry")
    g.add_argument("--to-layer-metadata", action="store_true",
                   help="move legacy header / scaled_fp8 metadata into per-layer comfy_quant tensors")
    g.add_argument("--tidy-scaled-fp8", action="store_true",
                   help="keep a legacy scaled_fp8 file in that form: drop scales of non-fp8 weights, store "
                        "one-element scales as scalars (with --marker-size, --add-input-scale)")
    p.add_argument("--scaled-int8", action="store_true",
                   help="also upgrade convert_to_quant's scaled INT8 layers (int8 weight + scale_weight)")
    p.add_argument("--int8-block-size", type=int, metavar="B",
                   help="with --scaled-int8: the tile edge when a scale grid fits several")
    p.add_argument("--add-input-scale", action="store_true",
                   help="fp8 layers without a static activation scale get 1.0 (scale_input under --tidy-scaled-fp8)")
    p.add_argument("--marker-size", type=int, choices=[0, 2],
                   help="with --tidy-scaled-fp8: resize the scaled_fp8 marker (2 = full_precision_matrix_mult)")
    p.add_argument("--check-high-precision", metavar="REGEX",
                   help="fail (writing nothing) if a layer REGEX finds is quantized")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT; also write a file whose removed keys leave a layer ComfyUI cannot load")


def _run_edit(a: argparse.Namespace) -> int:
    from comfyquant.convert.edit import edit_checkpoint
    from comfyquant.convert.edit_ops import parse_add_keys

    if a.tidy_scaled_fp8:
        from comfyquant.convert.legacy import cleanup_scaled_fp8

        other = [f for f, v in (("--remove-keys", a.remove_keys), ("--add-keys", a.add_keys), ("--layers", a.layers),
                                ("--scaled-int8", a.scaled_int8), ("--check-high-precision", a.check_high_precision))
                 if v]
        if other:
            raise UserError(f"--tidy-scaled-fp8 keeps the legacy form; {', '.join(other)} do not apply to it")
        print(cleanup_scaled_fp8(a.file, a.output, marker_size=a.marker_size, add_scale_input=a.add_input_scale,
                                 force=a.force).to_text())
        return 0
    if a.marker_size is not None:
        raise UserError("--marker-size needs --tidy-scaled-fp8")
    keys = tuple(k.strip() for k in a.remove_keys.split(",") if k.strip())
    result = edit_checkpoint(a.file, a.output, remove_keys=keys, to_header_metadata=a.to_header_metadata,
                             to_layer_metadata=a.to_layer_metadata, force=a.force,
                             add_keys=parse_add_keys(a.add_keys) if a.add_keys else None, layer_filter=a.layers,
                             scaled_int8=a.scaled_int8, int8_block_size=a.int8_block_size,
                             add_input_scale=a.add_input_scale, high_precision=a.check_high_precision)
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
    "install-nodes": ("install the ComfyUI node pack into a ComfyUI folder", "comfyquant.nodes.install:main"),
}


def build_parser() -> argparse.ArgumentParser:
    from comfyquant import __version__

    parser = _Parser(prog="comfyquant", description="Quantize diffusion-model checkpoints for ComfyUI.",
                     epilog="COMMAND --help shows the options of each command.")
    parser.add_argument("--version", action="version", version=f"comfyquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    for name, (help_, _entry) in EXTERNAL.items():  # listed here; run() hands their arguments to their own parser
        sub.add_parser(name, help=help_, add_help=False)
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
