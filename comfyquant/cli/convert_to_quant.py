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
from typing import NoReturn

from comfyquant.errors import UserError
from comfyquant.exits import argv_or_sys, run_cli
from comfyquant.progress import HELP as PROGRESS_HELP
from comfyquant.progress import Progress

PROG = "convert_to_quant"

# model flag -> comfyquant preset name (None: no matching preset yet), and a note where the preset differs.
MODEL_FLAGS: dict[str, str | None] = {
    "flux2": "flux2", "t5xxl": "t5xxl", "mistral": "llm-te", "visual": None, "hunyuan": "hunyuan",
    "wan": "wan", "qwen": "qwen-image", "zimage": "zimage", "zimage_refiner": "zimage-refiner",
    "distillation_large": "chroma", "distillation_small": "chroma", "nerf_large": "chroma",
    "nerf_small": "chroma", "radiance": "chroma", "lora": "lora",
}
_CHROMA_NOTE = ("comfyquant's chroma preset keeps distilled_guidance_layer, img_in/img_in_patch, txt_in, "
                "final_layer and the nerf_* head in high precision")
MODEL_NOTES = {f: f"--{f}: {_CHROMA_NOTE}" for f in ("distillation_small", "nerf_large", "nerf_small", "radiance")}
_UNSUPPORTED_MODEL = {"visual": "comfyquant has no vision-encoder preset that keeps the MLP layers in high "
                                "precision"}

# Features of the convert_to_quant README that comfyquant plans (optimizers, calibration, LoRA merge, memory
# modes); refused with "(planned)".
PLANNED = (
    "optimizer smoothquant quip_requant_scheme quip_store_transformed quip_checkpointed quip_checkpoint_threshold "
    "quip_checkpoint_segments streaming_mode bf16_compute bf16_threshold bf16_hadamard_threshold "
    "bf16_hessian_threshold no_memory_limits calibration_lora merge_lora merge_loras merge_lora_scale "
    "merge_lora_dampen lr num_iter lr_schedule lr_gamma lr_patience lr_factor lr_min lr_cooldown lr_threshold "
    "lr_adaptive_mode lr_shape_influence lr_threshold_mode early_stop_loss early_stop_lr early_stop_stall "
    "esloss eslr esstall calib_samples calib_cpu top_p min_k max_k full_matrix use_speed "
    "scale_optimization scale_refinement"
).split()
# Other convert_to_quant 1.3.4 flags comfyquant does not offer.
UNSUPPORTED = (
    "nvfp4 mxfp8 make_hybrid_mxfp8 tensor_scales fallback custom_layers custom_type custom_block_size "
    "custom_scaling_mode custom_simple custom_heur custom_full_precision_mm custom_fpmm custom_convrot "
    "custom_convrot_group_size fallback_block_size fallback_simple exclude_layers preserve_layers output_dtype "
    "full_precision_matrix_mult fpmm full_precision_mm heur input_scale input_scales dynamic_convrot "
    "convrot_group_size extract_lora lora_rank lora_target lora_depth lora_ar_threshold lora_output "
    "convert_int8_scaled legacy_input_add cleanup_fp8_scaled scaled_fp8_marker hp_filter actcal actcal_samples "
    "actcal_percentile actcal_lora actcal_seed actcal_device add_keys quant_filter no_normalize_scales "
    "verbose_pinned help_learned help_experimental help_filters help_advanced help_modes help_lora "
    "hl he hf ha hm hlr"
).split()

PROGRESS = Progress(prog=PROG)  # a bar on a terminal, plain lines in a redirected stderr; warnings always

SCALING = {"tensor": "int8-tensor", "axis": "int8", "row": "int8", "block": "int8-block", "block2d": "int8-block"}
_SCALING_SUFFIX = {"int8-tensor": "_tensorwise", "int8": "_rowwise", "int8-rot": "_rowwise"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {PROG} --help)")


def _alts(name: str) -> list[str]:
    """``--a_b`` and ``--a-b`` spellings, as convert_to_quant accepts both."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="convert_to_quant-compatible front end of comfyquant: round-to-nearest "
                "INT8 (default) or FP16 with ComfyUI comfy_quant metadata.")
    p.add_argument("-i", "--input", required=True, help="input .safetensors file (or sharded .index.json)")
    p.add_argument("-o", "--output", help="output path (default: derived from the input name, as "
                   "convert_to_quant does, e.g. model_simple_int8_tensorwise.safetensors)")
    p.add_argument(*_alts("comfy_quant"), action="store_true", dest="comfy_quant",
                   help="write per-layer comfy_quant metadata (always on in comfyquant)")
    p.add_argument("--int8", action="store_true", help="INT8 weights (the default)")
    p.add_argument("--simple", action="store_true", help="round to nearest (what comfyquant always does)")
    p.add_argument("--fp16", action="store_true", help="store every floating tensor as float16 instead")
    p.add_argument("--convrot", action="store_true",
                   help="INT8 per-row with group-wise Hadamard rotation (comfyquant format int8-rot)")
    p.add_argument(*_alts("scaling_mode"), dest="scaling_mode", choices=sorted(SCALING),
                   help="INT8 scales: tensor (one scalar, default), axis/row (per output row), block (tiles)")
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
    from comfyquant.cli import ctq_optimizer_flags

    ctq_optimizer_flags.add_args(p)
    p.epilog = "model flags: " + " ".join(f"--{f}" for f in MODEL_FLAGS) + ". " + PROGRESS_HELP
    return p


def refuse_later_flags(argv: Sequence[str]) -> None:
    """One-line refusal naming every convert_to_quant flag of a feature comfyquant does not have."""
    from comfyquant.cli.ctq_optimizer_flags import HANDLED

    planned, unsupported = [], []
    for tok in argv:
        if not tok.startswith("-") or tok in ("-", "--"):
            continue
        flag = tok.split("=", 1)[0]
        key = flag.lstrip("-").replace("-", "_")
        if key in HANDLED:
            continue
        if key in PLANNED:
            planned.append(flag)
        elif key in UNSUPPORTED:
            unsupported.append(flag)
    parts = []
    if planned:
        parts.append(f"not implemented yet in comfyquant: {', '.join(planned)} (planned)")
    if unsupported:
        parts.append(f"not supported by comfyquant: {', '.join(unsupported)} (convert_to_quant features with no "
                     "comfyquant equivalent)")
    if parts:
        raise UserError("; ".join(parts))


def resolve_model(a: argparse.Namespace) -> tuple[str, list[str]]:
    """The preset the model flags select (``auto`` without any) and notes on how it differs from the flag."""
    flags = [f for f in MODEL_FLAGS if getattr(a, f"model_{f}")]
    for f in flags:
        if MODEL_FLAGS[f] is None:
            raise UserError(f"flag --{f} is not supported yet: {_UNSUPPORTED_MODEL[f]}")
    presets = sorted({MODEL_FLAGS[f] for f in flags if MODEL_FLAGS[f]})
    if len(presets) > 1:
        raise UserError(f"model flags {' '.join('--' + f for f in flags)} select different presets "
                        f"({', '.join(presets)}); give one")
    if not presets:
        return "auto", []
    from comfyquant.presets.registry import get_preset

    return get_preset(presets[0]).name, [MODEL_NOTES[f] for f in flags if f in MODEL_NOTES]


def resolve_format(a: argparse.Namespace) -> str:
    """comfyquant format name for the format flags."""
    if a.fp16:
        if a.scaling_mode or a.convrot or a.int8:
            raise UserError("--fp16 cannot be combined with --int8, --scaling-mode or --convrot")
        return "fp16"
    if a.convrot:
        if a.scaling_mode not in (None, "axis", "row"):
            raise UserError("--convrot works with per-row scales only (--scaling-mode axis)")
        return "int8-rot"
    fmt = SCALING[a.scaling_mode or "tensor"]
    if a.block_size is not None and fmt != "int8-block":
        raise UserError("--block_size applies to --scaling-mode block only")
    return fmt


def default_output(inp: str, suffix: str) -> str:
    """``<input without extension><suffix>`` next to the input, as convert_to_quant names its outputs."""
    base = inp[: -len(".safetensors.index.json")] if inp.endswith(".safetensors.index.json") \
        else os.path.splitext(inp)[0]
    return base + suffix


def conversion_suffix(fmt: str, block_size: int, mixed: bool) -> str:
    """``_simple_int8[mixed]_tensorwise`` etc. (round-to-nearest is convert_to_quant's ``--simple``)."""
    if fmt == "fp16":
        return "_fp16.safetensors"
    scaling = _SCALING_SUFFIX.get(fmt, f"_bs{block_size}")
    return f"_simple_int8{'mixed' if mixed else ''}{scaling}.safetensors"


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
    if a.edit_quant or a.convert_fp8_scaled:
        return _run_edit(a)
    if a.remove_keys:
        raise UserError("--remove-keys needs --edit-quant")
    model, notes = resolve_model(a)
    fmt = resolve_format(a)
    block = a.block_size or 128
    if a.dry_run == "analyze":
        from comfyquant.convert.inspect import inspect_checkpoint
        from comfyquant.convert.preset_check import preset_warning

        result = inspect_checkpoint(a.input, model=model, fmt=fmt, block_size=block, layer_config=a.layer_config)
        warning = preset_warning(a.input, model, a.strict_preset, PROGRESS)
        if warning is not None:
            result.notes.append(warning)
        print(result.to_text())
    elif a.dry_run == "create-template":
        from comfyquant.convert.template import write_template

        out = a.output or default_output(a.input, "_layer_config_template.json")
        n = write_template(a.input, out, model=model, fmt=fmt, block_size=block, force=a.force,
                           layer_config=a.layer_config, strict_preset=a.strict_preset, progress=PROGRESS)
        print(f"wrote {out} ({n} rules)")
    else:
        if not a.comfy_quant and fmt != "fp16":  # a plain fp16 cast carries no comfy_quant metadata at all
            notes.append("comfyquant always writes per-layer comfy_quant metadata (--comfy_quant is implied)")
        from comfyquant.cli.ctq_optimizer_flags import resolve

        opt, calibration, lora, fmt, opt_notes = resolve(a, fmt)
        notes.extend(opt_notes)
        out = a.output or default_output(a.input, conversion_suffix(fmt, block, model != "auto"))
        _run_convert(a, out, fmt, model, block, opt, calibration, lora)
    for n in notes:  # after the work, so that a failure stays one line on stderr
        print(f"note: {n}", file=sys.stderr)
    return 0


def _run_convert(a: argparse.Namespace, out: str, fmt: str, model: str, block: int, optimizer: object = None,
                 calibration: str | None = None, lora: str | None = None) -> None:
    from comfyquant.convert.api import convert

    kwargs = {"format": fmt, "model": model, "layer_config": a.layer_config, "device": a.device,
              "low_memory": a.low_memory, "block_size": block, "progress": PROGRESS,
              "strict_preset": a.strict_preset, "optimizer": optimizer, "calibration": calibration,
              "calibration_lora": lora}
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


def _run_edit(a: argparse.Namespace) -> int:
    from comfyquant.convert.edit import edit_checkpoint

    if a.convert_fp8_scaled and a.edit_quant:
        raise UserError("give one of --edit-quant and --convert-fp8-scaled")
    keys = [k.strip() for k in a.remove_keys.split(",") if k.strip()]
    if a.edit_quant and not keys and not a.save_quant_metadata:
        raise UserError("--edit-quant needs --remove-keys and/or --save-quant-metadata")
    suffix = "_fp8mixed.safetensors" if a.convert_fp8_scaled else "_edited.safetensors"
    out = a.output or default_output(a.input, suffix)
    res = edit_checkpoint(a.input, out, remove_keys=keys, to_header_metadata=a.save_quant_metadata,
                          keep_layer_metadata=a.save_quant_metadata, force=a.force)
    print(res.to_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: UserError and Ctrl-C -> exit 2 with one line, bugs -> exit 1."""
    return run_cli(PROG, run, argv_or_sys(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
