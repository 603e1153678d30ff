"""``convert_to_quant``: the command line of the convert_to_quant tool, mapped onto comfyquant's API so that
existing scripts keep working (see docs/CONVERT_TO_QUANT.md for the flag-by-flag mapping).

Exit codes as ``comfyquant``: 0 done, 2 bad input or usage (one line on stderr), 1 a bug. Flags of features
comfyquant does not have (yet) are recognised and refused with one line naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from comfyquant.cli import compat_formats, compat_modes
from comfyquant.errors import UserError
from comfyquant.exits import argv_or_sys, run_cli
from comfyquant.progress import HELP as PROGRESS_HELP
from comfyquant.progress import Progress

if TYPE_CHECKING:
    from comfyquant.convert.choices import LayerOptions

PROG = "convert_to_quant"

# model flag -> comfyquant preset name (None: no matching preset yet), and a note where the preset differs.
MODEL_FLAGS: dict[str, str | None] = {
    "flux2": "flux2", "t5xxl": "t5xxl", "mistral": "llm-te", "visual": None, "hunyuan": "hunyuan",
    "wan": "wan", "qwen": "qwen-image", "zimage": "zimage", "zimage_refiner": "zimage-refiner",
    "distillation_large": "chroma", "distillation_small": "chroma", "nerf_large": "chroma",
    "nerf_small": "chroma", "radiance": "chroma", "lora": "lora", "ltxv2": "ltxv",
    "gemma4": None, "qwen_vlm": None, "qwen35": None, "generic_text": None, "anima": None, "lens": None,
    "krea2": None, "ideogram4": None, "minimaxh3": None, "boogu": None,
}
_CHROMA_NOTE = ("comfyquant's chroma preset keeps distilled_guidance_layer, img_in/img_in_patch, txt_in, "
                "final_layer and the nerf_* head in high precision")
MODEL_NOTES = {f: f"--{f}: {_CHROMA_NOTE}" for f in ("distillation_small", "nerf_large", "nerf_small", "radiance")}
MODEL_NOTES["ltxv2"] = ("--ltxv2: comfyquant's ltxv preset keeps the patchify/adaln/caption/connector/proj_out layers "
                        "in high precision and quantizes every transformer block (convert_to_quant also keeps "
                        "blocks 0, 1, 46 and 47)")
_NO_PRESET = "comfyquant has no preset for this model family yet (use --model none with --layer-config)"
_UNSUPPORTED_MODEL = {f: _NO_PRESET for f, p in MODEL_FLAGS.items() if p is None}
_UNSUPPORTED_MODEL.update(
    visual="comfyquant has no vision-encoder preset that keeps the MLP layers in high precision",
    generic_text="convert_to_quant's --generic_text excludes no layer (it only changes FP8 input scales)",
    qwen35="an alias of --qwen_vlm, which has no comfyquant preset yet")

# Features of the convert_to_quant README that comfyquant plans (the optimizer flags ctq_optimizer_flags handles
# are taken out first); refused with "(planned)".
PLANNED = (
    "optimizer smoothquant quip_requant_scheme quip_store_transformed quip_checkpointed quip_checkpoint_threshold "
    "quip_checkpoint_segments streaming_mode bf16_compute bf16_threshold bf16_hadamard_threshold "
    "bf16_hessian_threshold no_memory_limits calibration_lora lr num_iter lr_schedule lr_gamma lr_patience "
    "lr_factor lr_min lr_cooldown lr_threshold lr_adaptive_mode lr_shape_influence lr_threshold_mode "
    "early_stop_loss early_stop_lr early_stop_stall esloss eslr esstall calib_samples calib_cpu top_p min_k max_k "
    "full_matrix use_speed scale_optimization scale_refinement"
).split()
# Other convert_to_quant 1.3.4 flags comfyquant does not offer.
UNSUPPORTED = (
    "lora_depth lora_ar_threshold actcal actcal_samples "
    "actcal_percentile actcal_lora actcal_seed actcal_device "
    "verbose_pinned help_learned help_experimental help_filters help_advanced help_modes help_lora "
    "hl he hf ha hm hlr"
).split()

PROGRESS = Progress(prog=PROG)  # a bar on a terminal, plain lines in a redirected stderr; warnings always


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {PROG} --help)")


def _alts(name: str) -> list[str]:
    """``--a_b`` and ``--a-b`` spellings, as convert_to_quant accepts both."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="convert_to_quant-compatible front end of comfyquant: round-to-nearest "
                "FP8 (default), INT8, NVFP4 or MXFP8 with ComfyUI comfy_quant metadata.")
    p.add_argument("-i", "--input", required=True, help="input .safetensors file (or sharded .index.json)")
    p.add_argument("-o", "--output", help="output path (default: derived from the input name, as "
                   "convert_to_quant does, e.g. model_simple_int8_tensorwise.safetensors)")
    p.add_argument(*_alts("comfy_quant"), action="store_true", dest="comfy_quant",
                   help="write per-layer comfy_quant metadata (always on in comfyquant)")
    p.add_argument("--int8", action="store_true", help="INT8 weights (without a format flag: FP8)")
    p.add_argument("--simple", action="store_true", help="round to nearest (what comfyquant always does)")
    p.add_argument("--fp16", action="store_true", help="store every floating tensor as float16 instead")
    p.add_argument("--convrot", action="store_true",
                   help="INT8 per-row with group-wise Hadamard rotation (comfyquant format int8-rot)")
    p.add_argument(*_alts("scaling_mode"), dest="scaling_mode", choices=compat_formats.SCALINGS,
                   help="INT8 scales: tensor (one scalar, default), row/axis (per output row), block (tiles; "
                        "block2d, block3d are aliases)")
    p.add_argument(*_alts("block_size"), *_alts("group_size"), type=int, dest="block_size",
                   help="tile edge for --scaling-mode block (default 128)")
    for flag in MODEL_FLAGS:
        p.add_argument(*_alts(flag), action="store_true", dest=f"model_{flag}", help=argparse.SUPPRESS)
    p.add_argument(*_alts("layer_config"), dest="layer_config", metavar="FILE",
                   help="JSON of per-layer regex rules (comfyquant's or convert_to_quant's form)")
    p.add_argument("--fullmatch", action="store_true",
                   help="refused: write \"fullmatch\": true into a comfyquant-form layer config instead")
    p.add_argument(*_alts("dry_run"), dest="dry_run", nargs="?", const="analyze",
                   choices=["analyze", "create-template"],
                   help="analyze: print the plan without writing; create-template: write a layer-config template")
    p.add_argument(*_alts("edit_quant"), action="store_true", dest="edit_quant",
                   help="edit an already quantized file (with --remove-keys / --save-quant-metadata)")
    p.add_argument(*_alts("remove_keys"), dest="remove_keys", default="", metavar="K1,K2",
                   help="tensors or comfy_quant keys to remove (with --edit-quant)")
    p.add_argument(*_alts("save_quant_metadata"), action="store_true", dest="save_quant_metadata",
                   help="also write the _quantization_metadata header entry")
    p.add_argument(*_alts("convert_fp8_scaled"), action="store_true", dest="convert_fp8_scaled",
                   help="upgrade a legacy scaled_fp8 file to comfy_quant metadata (no re-quantization)")
    p.add_argument(*_alts("low_memory"), "-lm", action="store_true", dest="low_memory",
                   help="bounded memory: smaller statistics samples, eager freeing")
    p.add_argument(*_alts("report_quality"), action="store_true", dest="report_quality",
                   help="print per-layer SQNR/MSE (comfyquant always prints its quality report)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--verbose", choices=["DEBUG", "VERBOSE", "NORMAL", "MINIMAL"],
                   help="accepted for compatibility; comfyquant prints the same report at every level")
    p.add_argument(*_alts("manual_seed"), type=int, dest="manual_seed",
                   help="accepted for compatibility; round-to-nearest uses no randomness")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument(*_alts("strict_preset"), action="store_true", dest="strict_preset",
                   help="make a model flag whose preset does not fit the file an error (exit 2) instead of a warning")
    p.add_argument(*_alts("no_normalize_scales"), action="store_true", dest="no_normalize_scales",
                   help="accepted, no effect (as in convert_to_quant 1.3.4); per-tensor scales are scalars")
    compat_formats.add_format_args(p)
    compat_modes.add_mode_args(p)
    g = p.add_argument_group("LoRA (docs/LORA.md)")
    g.add_argument(*_alts("merge_lora"), action="append", default=[], dest="merge_lora", metavar="LORA",
                   help="merge a LoRA into the base before quantizing (repeatable)")
    g.add_argument(*_alts("merge_loras"), nargs="+", default=[], dest="merge_loras", metavar="LORA",
                   help="merge several LoRAs, in order")
    g.add_argument(*_alts("merge_lora_scale"), type=float, default=1.0, dest="merge_lora_scale",
                   help="strength of every merged LoRA (default 1.0)")
    g.add_argument(*_alts("merge_lora_dampen"), nargs="?", const=True, default=True, type=_bool,
                   dest="merge_lora_dampen", metavar="BOOL",
                   help="scale the i-th merged LoRA by 0.9^(i-1) (default True; --merge-lora-dampen=False: off)")
    g.add_argument(*_alts("extract_lora"), action="store_true", dest="extract_lora",
                   help="also write the quantization error's rank --lora-rank SVD as a correcting LoRA")
    g.add_argument(*_alts("lora_rank"), type=int, default=32, dest="lora_rank", help="rank for --extract-lora (32)")
    g.add_argument(*_alts("lora_target"), dest="lora_target", metavar="REGEX",
                   help="--extract-lora only for layers matching this regex")
    g.add_argument(*_alts("lora_output"), dest="lora_output", metavar="FILE",
                   help="--extract-lora output (default: OUTPUT with _lora.safetensors)")
    from comfyquant.cli import ctq_optimizer_flags

    ctq_optimizer_flags.add_args(p)
    p.epilog = "model flags: " + " ".join(f"--{f}" for f in MODEL_FLAGS) + ". " + PROGRESS_HELP
    return p


def _bool(text: str) -> bool:
    """``True``/``False`` (also 1/0, yes/no, on/off) for ``--merge-lora-dampen=...``."""
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def refuse_later_flags(argv: Sequence[str]) -> None:
    """One-line refusal naming every convert_to_quant flag of a feature comfyquant does not have."""
    from comfyquant.cli.ctq_optimizer_flags import HANDLED

    planned, refused = [], []
    for tok in argv:
        if not tok.startswith("-") or tok in ("-", "--"):
            continue
        flag = tok.split("=", 1)[0]
        key = flag.lstrip("-").replace("-", "_")
        if key in HANDLED:
            continue
        if key in PLANNED:
            planned.append(flag)
        elif key in compat_formats.REFUSED:
            refused.append(f"{flag} ({compat_formats.REFUSED[key]})")
        elif key in UNSUPPORTED:
            refused.append(f"{flag} (a convert_to_quant feature with no comfyquant equivalent)")
    parts = []
    if planned:
        parts.append(f"not implemented yet in comfyquant: {', '.join(dict.fromkeys(planned))} (planned)")
    if refused:
        parts.append(f"not supported by comfyquant: {', '.join(dict.fromkeys(refused))}")
    if parts:
        raise UserError("; ".join(parts))


def resolve_model(a: argparse.Namespace) -> tuple[str, list[str]]:
    """The preset the model flags select (``auto`` without any) and notes on how it differs from the flag."""
    flags = [f for f in MODEL_FLAGS if getattr(a, f"model_{f}")]
    missing = [f"flag --{f} is not supported yet: {_UNSUPPORTED_MODEL[f]}" for f in flags if MODEL_FLAGS[f] is None]
    if missing:
        raise UserError("; ".join(missing))
    presets = sorted({MODEL_FLAGS[f] for f in flags if MODEL_FLAGS[f]})
    if len(presets) > 1:
        raise UserError(f"model flags {' '.join('--' + f for f in flags)} select different presets "
                        f"({', '.join(presets)}); give one")
    if not presets:
        return "auto", []
    from comfyquant.presets.registry import get_preset

    return get_preset(presets[0]).name, [MODEL_NOTES[f] for f in flags if f in MODEL_NOTES]


def default_output(inp: str, suffix: str) -> str:
    """``<input without extension><suffix>`` next to the input, as convert_to_quant names its outputs."""
    base = inp[: -len(".safetensors.index.json")] if inp.endswith(".safetensors.index.json") \
        else os.path.splitext(inp)[0]
    return base + suffix


def run(argv: Sequence[str]) -> int:
    """Parse and run one command line (raises UserError for bad usage)."""
    argv = list(argv)
    refuse_later_flags(argv)
    a = build_parser().parse_args(argv)
    if a.block_size is not None and a.block_size < 1:
        raise UserError(f"--block_size must be a positive integer, got {a.block_size}")
    if a.fullmatch:
        raise UserError("--fullmatch is not supported; set \"fullmatch\": true in a comfyquant-form layer config "
                        "(docs/LAYER_CONFIG.md)")
    mode = compat_modes.selected_mode(a)
    if mode is not None:
        print(compat_modes.run_mode(a, mode, default_output(a.input, compat_modes.MODES[mode][1])))
        return 0
    model, notes, cf = _resolve(a)
    fmt, block = cf.format, a.block_size or 128
    notes += cf.notes
    if a.dry_run == "analyze":
        from comfyquant.convert.inspect import inspect_checkpoint
        from comfyquant.convert.preset_check import preset_warning

        result = inspect_checkpoint(a.input, model=model, fmt=fmt, block_size=block, layer_config=a.layer_config,
                                    layers=cf.layers)
        warning = preset_warning(a.input, model, a.strict_preset, PROGRESS)
        if warning is not None:
            result.notes.append(warning)
        print(result.to_text())
    elif a.dry_run == "create-template":
        from comfyquant.convert.template import write_template

        out = a.output or default_output(a.input, "_layer_config_template.json")
        n = write_template(a.input, out, model=model, fmt=fmt, block_size=block, force=a.force,
                           layer_config=a.layer_config, strict_preset=a.strict_preset, progress=PROGRESS,
                           layers=cf.layers)
        print(f"wrote {out} ({n} rules)")
    else:
        if not a.comfy_quant and fmt != "fp16":  # a plain fp16 cast carries no comfy_quant metadata at all
            notes.append("comfyquant always writes per-layer comfy_quant metadata (--comfy_quant is implied)")
        from comfyquant.cli.ctq_optimizer_flags import resolve

        opt, calibration, lora, fmt, opt_notes = resolve(a, fmt)
        notes.extend(opt_notes)
        suffix = cf.suffix if opt is None else cf.suffix.replace("_simple_", "_learned_")  # as convert_to_quant
        out = a.output or default_output(a.input, suffix)
        _run_convert(a, out, fmt, model, block, cf.layers, opt, calibration, lora)
    for n in notes:  # after the work, so that a failure stays one line on stderr
        print(f"note: {n}", file=sys.stderr)
    return 0


def _resolve(a: argparse.Namespace) -> tuple[str, list[str], compat_formats.CompatFormat]:
    """Model and format flags together, so that one message names every problem of both."""
    problems: list[str] = []
    model, notes = "auto", []
    try:
        model, notes = resolve_model(a)
    except UserError as e:
        problems.append(str(e))
    try:
        cf = compat_formats.resolve(a, mixed=model != "auto" or bool(problems))
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    return model, notes, cf


def _run_convert(a: argparse.Namespace, out: str, fmt: str, model: str, block: int, layers: LayerOptions,
                 optimizer: object = None, calibration: str | None = None, lora: str | None = None) -> None:
    from comfyquant.convert.api import convert

    kwargs = {"format": fmt, "model": model, "layer_config": a.layer_config, "device": a.device,
              "low_memory": a.low_memory, "block_size": block, "progress": PROGRESS,
              "strict_preset": a.strict_preset, "optimizer": optimizer, "calibration": calibration,
              "calibration_lora": lora, "layers": layers, "merge_loras": [*a.merge_lora, *a.merge_loras],
              "merge_lora_scale": a.merge_lora_scale, "merge_lora_dampen": a.merge_lora_dampen}
    if a.extract_lora:
        kwargs.update(extract_lora=a.lora_rank, extract_lora_target=a.lora_target,
                      extract_lora_output=a.lora_output or os.path.splitext(out)[0] + "_lora.safetensors")
    if not a.save_quant_metadata:
        report = convert(a.input, out, force=a.force, **kwargs)
    else:  # convert next to the output, then add the header entry while keeping the per-layer tensors
        from comfyquant.convert.edit import edit_checkpoint

        target = Path(out)
        if target.exists() and not a.force:
            raise UserError(f"output exists: {target} (use --force to overwrite)")
        stage = target.with_name(f"{target.name}.stage-{os.getpid()}.safetensors")
        try:
            report = convert(a.input, stage, force=True, **kwargs)
            edit_checkpoint(stage, target, to_header_metadata=True, keep_layer_metadata=True, force=a.force)
        finally:
            if stage.exists():  # not created in a read-only folder, where even unlink(missing_ok) fails (EROFS)
                stage.unlink()
    print(report.to_text())
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: UserError and Ctrl-C -> exit 2 with one line, bugs -> exit 1."""
    return run_cli(PROG, run, argv_or_sys(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
