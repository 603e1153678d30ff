"""convert_to_quant 1.3.4's file modes (no re-quantization): ``--edit-quant``, ``--convert-fp8-scaled``,
``--convert-int8-scaled``, ``--cleanup-fp8-scaled`` and ``--legacy_input_add``, mapped onto ``comfyquant edit``
(``convert.edit``) and ``convert.legacy``. Every problem of a command line is refused in one message."""

from __future__ import annotations

import argparse
import os

from comfyquant.errors import UserError

# mode dest -> (flag, default output suffix)
MODES = {
    "edit_quant": ("--edit-quant", "_edited.safetensors"),
    "convert_fp8_scaled": ("--convert-fp8-scaled", "_fp8mixed.safetensors"),
    "convert_int8_scaled": ("--convert-int8-scaled", "_int8_comfy.safetensors"),
    "cleanup_fp8_scaled": ("--cleanup-fp8-scaled", "_cleaned.safetensors"),
    "legacy_input_add": ("--legacy_input_add", "_with_input_scale.safetensors"),
}
# flag dest -> (flag, modes it belongs to)
_MODE_FLAGS = {
    "remove_keys": ("--remove-keys", ("edit_quant",)),
    "add_keys": ("--add-keys", ("edit_quant",)),
    "quant_filter": ("--quant-filter", ("edit_quant",)),
    "hp_filter": ("--hp-filter", ("convert_fp8_scaled", "convert_int8_scaled")),
    "full_precision_mm": ("--full-precision-mm", ("convert_fp8_scaled",)),
    "scaled_fp8_marker": ("--scaled-fp8-marker", ("cleanup_fp8_scaled",)),
}


def _alts(name: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def add_mode_args(p: argparse.ArgumentParser) -> None:
    """The mode flags besides --edit-quant, --remove-keys, --save-quant-metadata, --convert-fp8-scaled."""
    p.add_argument(*_alts("convert_int8_scaled"), action="store_true", dest="convert_int8_scaled",
                   help="upgrade convert_to_quant's legacy scaled INT8 file (.scale_weight) to comfy_quant metadata")
    p.add_argument(*_alts("cleanup_fp8_scaled"), action="store_true", dest="cleanup_fp8_scaled",
                   help="tidy a legacy scaled_fp8 file, keeping that form: orphan scales removed, scalar scales")
    p.add_argument(*_alts("scaled_fp8_marker"), type=int, choices=[0, 2], dest="scaled_fp8_marker",
                   help="with --cleanup-fp8-scaled: resize the scaled_fp8 marker (2 = full_precision_matrix_mult "
                        "in ComfyUI; default: keep it)")
    p.add_argument("--legacy_input_add", "--legacy-input-add", action="store_true", dest="legacy_input_add",
                   help="add scale_input = 1.0 to the fp8 layers of a legacy scaled_fp8 file that lack one")
    p.add_argument(*_alts("hp_filter"), dest="hp_filter", metavar="REGEX",
                   help="with --convert-*-scaled: fail if a layer this regex finds is quantized")
    p.add_argument(*_alts("full_precision_mm"), action="store_true", dest="full_precision_mm",
                   help="with --convert-fp8-scaled: mark the layers full_precision_matrix_mult")
    p.add_argument(*_alts("add_keys"), dest="add_keys", metavar="\"'KEY': VALUE, ...\"",
                   help="with --edit-quant: set comfy_quant keys, e.g. \"'full_precision_matrix_mult': true\"")
    p.add_argument(*_alts("quant_filter"), dest="quant_filter", metavar="REGEX",
                   help="with --edit-quant: edit only the layers this regex finds")


def selected_mode(a: argparse.Namespace) -> str | None:
    """The mode dest given on the command line (None: a conversion); refuses misplaced mode flags, all at once."""
    modes = [m for m in MODES if getattr(a, m)]
    problems = []
    if len(modes) > 1:
        problems.append(f"{' and '.join(MODES[m][0] for m in modes)} are separate modes; give one")
    for dest, (flag, owners) in _MODE_FLAGS.items():
        if getattr(a, dest) not in (None, False, "") and not set(modes) & set(owners):
            problems.append(f"{flag} needs {' or '.join(MODES[o][0] for o in owners)}")
    if problems:
        raise UserError("; ".join(problems))
    return modes[0] if modes else None


def run_mode(a: argparse.Namespace, mode: str, default_output: str) -> str:
    """Run one file mode; returns the text to print."""
    out = a.output or default_output
    if os.path.abspath(out) == os.path.abspath(a.input):
        raise UserError("the output file cannot be the input file")
    if mode in ("cleanup_fp8_scaled", "legacy_input_add"):
        from comfyquant.convert.legacy import cleanup_scaled_fp8

        if a.save_quant_metadata:
            raise UserError(f"{MODES[mode][0]} keeps the legacy scaled_fp8 form; --save-quant-metadata does not "
                            "apply (use --convert-fp8-scaled to write comfy_quant metadata)")
        cleanup = mode == "cleanup_fp8_scaled"
        res = cleanup_scaled_fp8(a.input, out, marker_size=a.scaled_fp8_marker, remove_orphans=cleanup,
                                 add_scale_input=a.input_scale or not cleanup, force=a.force)
        return res.to_text()
    from comfyquant.convert.edit import edit_checkpoint
    from comfyquant.convert.edit_ops import parse_add_keys

    keys = [k.strip() for k in (a.remove_keys or "").split(",") if k.strip()]
    add = parse_add_keys(a.add_keys) if a.add_keys else {}
    if mode == "edit_quant" and not (keys or add or a.save_quant_metadata):
        raise UserError("--edit-quant needs --remove-keys, --add-keys and/or --save-quant-metadata")
    if mode == "convert_fp8_scaled":
        from comfyquant.io.comfy_meta import is_scaled_fp8
        from comfyquant.io.reader import CheckpointReader

        if not is_scaled_fp8(CheckpointReader(a.input).infos):
            raise UserError(f"{a.input} is not a scaled_fp8 checkpoint (no 'scaled_fp8' marker tensor); "
                            "--convert-fp8-scaled upgrades only those")
        if a.full_precision_mm:
            add["full_precision_matrix_mult"] = True
    if mode == "convert_int8_scaled" and a.input_scale:
        raise UserError("--input_scale with --convert-int8-scaled is refused: ComfyUI's int8 layers take no "
                        "input_scale (it would load as an unexpected key)")
    if mode == "edit_quant" and a.input_scale:
        raise UserError("--input_scale does not apply to --edit-quant")
    res = edit_checkpoint(a.input, out, remove_keys=keys, to_header_metadata=a.save_quant_metadata,
                          keep_layer_metadata=a.save_quant_metadata, force=a.force, add_keys=add or None,
                          layer_filter=a.quant_filter, scaled_int8=mode == "convert_int8_scaled",
                          int8_block_size=a.block_size, add_input_scale=a.input_scale, high_precision=a.hp_filter)
    return res.to_text()
