"""convert_to_quant 1.3.4's format flags mapped onto a comfyquant format and ``LayerOptions``.

``--int8`` / ``--nvfp4`` / ``--mxfp8`` (FP8 without one, as in convert_to_quant), ``--scaling_mode``,
``--convrot[-group-size]``, ``--custom-*``, ``--fallback*``, ``--exclude-layers``, ``--output-dtype``,
``--preserve-layers``, ``-fpmm``, ``--input_scale`` and ``--heur``. :func:`resolve` collects every problem
of a command line and refuses them in one message. docs/CONVERT_TO_QUANT.md has the flag-by-flag table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.layer_config import LayerRule, make_rule
from comfyquant.errors import UserError

KINDS = ("fp8", "int8", "mxfp8", "nvfp4")  # convert_to_quant's --fallback / --custom-type choices
# convert_to_quant's scaling modes (block2d and block3d are its aliases of block) plus the README's "axis".
SCALINGS = ("tensor", "row", "axis", "block", "block2d", "block3d")
INT8_BY_SCALING = {"tensor": "int8-tensor", "row": "int8", "axis": "int8", "block": "int8-block",
                   "block2d": "int8-block", "block3d": "int8-block"}
# The dimension --heur checks against when no --block_size is given (convert_to_quant's per-format blocks).
HEUR_BLOCK = {"fp8": 64, "int8": 128, "mxfp8": 32, "nvfp4": 16}
OUTPUT_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
_FP8_SCALED = ("convert_to_quant's float8_e4m3fn_rowwise / _blockwise formats load in no stock ComfyUI (0.30 "
               "knows only the per-tensor float8_e4m3fn)")

# Format-related convert_to_quant flags comfyquant refuses, with the reason (key: argparse dest).
REFUSED = {
    "make_hybrid_mxfp8": "hybrid_mxfp8 is convert_to_quant's own format, which stock ComfyUI does not load",
    "tensor_scales": "it only feeds --make-hybrid-mxfp8",
    "dynamic_convrot": "comfyquant picks each layer's group itself (the largest power of 4 up to 256 that divides "
                       "in_features); --convrot-group-size fixes one",
    "input_scales": "comfyquant calibrates static activation scales itself (--actcal with --calibration FILE); it "
                    "does not read them from another file",
}


def _alts(name: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def add_format_args(p: argparse.ArgumentParser) -> None:
    """The format flags this module maps (the parser keeps --int8, --convrot, --scaling_mode, --block_size)."""
    p.add_argument("--nvfp4", action="store_true", help="NVFP4 weights (comfyquant format nvfp4)")
    p.add_argument("--mxfp8", action="store_true", help="MXFP8 weights (comfyquant format mxfp8)")
    p.add_argument(*_alts("convrot_group_size"), type=int, dest="convrot_group_size", metavar="N",
                   help="Hadamard group of --convrot layers, a power of 4 (default: per layer, <= 256)")
    p.add_argument("--fallback", choices=KINDS, help="format for the excluded layers (--exclude-layers and the "
                   "preset's high-precision layers) instead of keeping them")
    p.add_argument(*_alts("fallback_block_size"), type=int, dest="fallback_block_size", metavar="B")
    p.add_argument(*_alts("fallback_simple"), action="store_true", dest="fallback_simple",
                   help="accepted: round-to-nearest is what comfyquant does")
    p.add_argument(*_alts("custom_layers"), dest="custom_layers", metavar="REGEX",
                   help="layers to store as --custom-type (before exclusions)")
    p.add_argument(*_alts("custom_type"), choices=KINDS, dest="custom_type")
    p.add_argument(*_alts("custom_block_size"), type=int, dest="custom_block_size", metavar="B")
    p.add_argument(*_alts("custom_scaling_mode"), choices=SCALINGS, dest="custom_scaling_mode")
    p.add_argument(*_alts("custom_simple"), action="store_true", dest="custom_simple",
                   help="accepted: round-to-nearest is what comfyquant does")
    p.add_argument(*_alts("custom_heur"), action="store_true", dest="custom_heur")
    p.add_argument("--custom-full-precision-mm", "--custom-fpmm", action="store_true", dest="custom_fpmm")
    p.add_argument("--custom-convrot", action="store_true", dest="custom_convrot")
    p.add_argument("--custom-convrot-group-size", type=int, dest="custom_convrot_group_size", metavar="N")
    p.add_argument(*_alts("exclude_layers"), dest="exclude_layers", metavar="REGEX",
                   help="keep the layers this regex finds in high precision (or store them as --fallback)")
    p.add_argument(*_alts("output_dtype"), choices=sorted(OUTPUT_DTYPES), dest="output_dtype",
                   help="dtype of every floating tensor kept unquantized (default bfloat16, as convert_to_quant)")
    p.add_argument(*_alts("preserve_layers"), dest="preserve_layers", metavar="REGEX",
                   help="tensors this regex finds keep their own dtype")
    p.add_argument("--full_precision_matrix_mult", "--full-precision-matrix-mult", "-fpmm", action="store_true",
                   dest="fpmm", help="mark every quantized layer full_precision_matrix_mult")
    p.add_argument("--heur", action="store_true",
                   help="keep layers whose dimensions are not multiples of the block size in high precision")
    p.add_argument("--input_scale", "--input-scale", action="store_true", dest="input_scale",
                   help="FP8 layers store input_scale = 1.0 (legacy modes: add missing scale inputs)")


@dataclass(frozen=True)
class CompatFormat:
    """What the format flags mean: the comfyquant format, per-layer choices, output-name suffix, notes."""

    format: str
    layers: LayerOptions
    suffix: str
    notes: tuple[str, ...] = ()


class _Problems(list[str]):
    def check(self) -> None:
        if self:
            raise UserError("; ".join(self))


def _kind(a: argparse.Namespace, problems: _Problems) -> str:
    """The primary kind: fp8 (convert_to_quant's default), int8 (also implied by --convrot), nvfp4, mxfp8, fp16."""
    chosen = [f"--{k}" for k in ("int8", "nvfp4", "mxfp8", "fp16") if getattr(a, k)]
    if len(chosen) > 1:
        problems.append(f"{' and '.join(chosen)} select different formats; give one")
    if a.convrot and (a.nvfp4 or a.mxfp8 or a.fp16):
        problems.append("--convrot rotates INT8 weights; it does not combine with "
                        + " ".join(c for c in chosen if c != "--int8"))
    if a.fp16:
        return "fp16"
    if a.nvfp4 or a.mxfp8:
        return "nvfp4" if a.nvfp4 else "mxfp8"
    return "int8" if a.int8 or a.convrot else "fp8"


def kind_format(kind: str, scaling: str | None, convrot: bool, who: str, problems: _Problems,
                explicit: bool = True, notes: list[str] | None = None) -> str:
    """The comfyquant format of one convert_to_quant kind with a scaling mode and convrot.

    ``explicit`` says the scaling mode was given for this kind (an inherited one that the kind cannot take
    falls back to the kind's own scaling with a note, as convert_to_quant's converters do).
    """
    if kind == "int8":
        if convrot:
            if scaling not in (None, "row", "axis"):
                problems.append(f"{who}: convrot works with per-row scales only (--scaling-mode row), not {scaling}")
            return "int8-rot"
        return INT8_BY_SCALING[scaling or "tensor"]
    if convrot and explicit:
        problems.append(f"{who}: convrot rotates INT8 weights only, not {kind}")
    if kind == "fp8" and scaling not in (None, "tensor"):
        if explicit:
            problems.append(f"{who}: FP8 with --scaling-mode {scaling} is refused: {_FP8_SCALED}; FP8 layers get "
                            "one scalar scale (use --int8 for row/block scales, or --mxfp8 for FP8 block scales)")
        elif notes is not None:
            notes.append(f"{who} fp8 layers get one scalar scale, not the inherited --scaling-mode {scaling}: "
                         + _FP8_SCALED)
    return kind


def heur_block(a: argparse.Namespace, kind: str) -> int:
    """The dimension ``--heur`` / ``--custom-heur`` check against: ``--block_size``, else 128 when any INT8 layer
    uses blocks by default (an INT8 custom/fallback type), else the primary format's block, as convert_to_quant."""
    if a.block_size:
        return a.block_size
    if "int8" in (a.custom_type, a.fallback):
        return 128
    return HEUR_BLOCK.get(kind, 64)


def _block_for(fmt: str, own: int | None, a: argparse.Namespace) -> dict[str, int]:
    return {"block_size": own or a.block_size or 128} if fmt == "int8-block" else {}


def resolve(a: argparse.Namespace, mixed: bool) -> CompatFormat:
    """Map the format flags of a parsed command line (``mixed``: a model flag was given)."""
    problems, notes = _Problems(), []
    kind = _kind(a, problems)
    fmt = "fp16" if kind == "fp16" else kind_format(kind, a.scaling_mode, a.convrot, "--scaling-mode", problems)
    if kind == "fp16" and (a.scaling_mode or a.convrot):
        problems.append("--fp16 cannot be combined with --scaling-mode or --convrot")
    rules, custom_fmt = _custom(a, problems, notes)
    excluded = _fallback(a, problems, notes)
    fmts = {fmt, custom_fmt, excluded.format if excluded else None} - {None}
    if kind in ("nvfp4", "mxfp8") and a.scaling_mode and not fmts & {"int8", "int8-tensor", "int8-block", "fp8"}:
        problems.append(f"--scaling-mode does not apply to --{kind} (its scale blocks are fixed)")
    if a.block_size is not None and "int8-block" not in fmts and not (a.heur or a.custom_heur):
        problems.append("--block_size applies to --scaling-mode block (INT8) and --heur only")
    if a.convrot_group_size is not None and fmt != "int8-rot" and not (excluded and excluded.format == "int8-rot"):
        problems.append("--convrot-group-size needs --convrot")
    if a.input_scale and "fp8" not in fmts and not a.layer_config:
        problems.append("--input_scale adds the static activation scale of FP8 layers, and this conversion writes "
                        "none (it applies to FP8 only)")
    simple = [f for f, v in (("--custom-simple", a.custom_simple), ("--fallback-simple", a.fallback_simple)) if v]
    if simple and getattr(a, "optimizer", None):
        problems.append(f"{' and '.join(simple)} with --optimizer: comfyquant optimizes every quantized layer alike "
                        "(no per-layer round-to-nearest)")
    if a.heur and kind == "fp16":
        problems.append("--heur decides which layers to quantize; --fp16 quantizes none")
    keep_dtype = OUTPUT_DTYPES[a.output_dtype] if a.output_dtype else None
    if kind == "fp16" and keep_dtype not in (None, "fp16"):
        problems.append("--fp16 stores every floating tensor as float16; --output-dtype bfloat16 contradicts it")
    if a.preserve_layers and kind == "fp16":
        problems.append("--preserve-layers keeps dtypes under --output-dtype; --fp16 casts the whole file")
    problems.check()
    layers = LayerOptions(
        rules=rules, exclude=(a.exclude_layers,) if a.exclude_layers else (), excluded=excluded,
        keep_dtype=None if kind == "fp16" else keep_dtype or "bf16",
        preserve_dtype=(a.preserve_layers,) if a.preserve_layers else (),
        full_precision_matrix_mult=a.fpmm, convrot_groupsize=a.convrot_group_size, input_scale=a.input_scale,
        align=heur_block(a, kind) if a.heur else None)
    return CompatFormat(fmt, layers, _suffix(fmt, kind, a, mixed or bool(a.custom_layers)), tuple(notes))


def _custom(a: argparse.Namespace, problems: _Problems, notes: list[str]) -> tuple[tuple[LayerRule, ...], str | None]:
    """``--custom-layers REGEX --custom-type KIND`` and its ``--custom-*`` options as one command-line rule."""
    given = [f for f in ("custom_block_size", "custom_scaling_mode", "custom_heur", "custom_fpmm", "custom_convrot",
                         "custom_convrot_group_size", "custom_simple") if getattr(a, f) not in (None, False)]
    if not (a.custom_layers and a.custom_type):
        if a.custom_layers or a.custom_type or given:
            problems.append("--custom-layers and --custom-type go together (the --custom-* options need both)")
        return (), None
    convrot = a.custom_convrot or (a.convrot and a.custom_type == "int8")
    scaling = a.custom_scaling_mode or a.scaling_mode
    fmt = kind_format(a.custom_type, scaling, convrot, "--custom-type", problems,
                      explicit=a.custom_scaling_mode is not None or a.custom_convrot, notes=notes)
    opts: dict[str, object] = _block_for(fmt, a.custom_block_size, a)
    if a.custom_block_size is not None and fmt != "int8-block":
        problems.append("--custom-block-size applies to --custom-type int8 with block scaling only")
    if a.custom_convrot_group_size is not None:
        if fmt != "int8-rot":
            problems.append("--custom-convrot-group-size needs --custom-convrot")
        opts["convrot_groupsize"] = a.custom_convrot_group_size
    if a.custom_fpmm:
        opts["full_precision_matrix_mult"] = True
    opts["align"] = heur_block(a, _kind(a, _Problems())) if a.custom_heur else 0
    if problems:
        return (), fmt
    return (make_rule(a.custom_layers, fmt, "--custom-layers", **opts),), fmt


def _fallback(a: argparse.Namespace, problems: _Problems, notes: list[str]) -> LayerRule | None:
    """``--fallback KIND`` (with ``--fallback-block-size``): what excluded layers become."""
    if a.fallback is None:
        if a.fallback_block_size is not None or a.fallback_simple:
            problems.append("--fallback-block-size / --fallback-simple need --fallback")
        return None
    convrot = a.convrot and a.fallback == "int8"
    fmt = kind_format(a.fallback, a.scaling_mode, convrot, "--fallback", problems, explicit=False, notes=notes)
    if a.fallback_block_size is not None and fmt != "int8-block":
        problems.append("--fallback-block-size applies to an INT8 --fallback with block scaling only")
    if problems:
        return None
    return make_rule(".*", fmt, "--fallback", **_block_for(fmt, a.fallback_block_size, a))


def _suffix(fmt: str, kind: str, a: argparse.Namespace, mixed: bool) -> str:
    """convert_to_quant's default output name for this conversion (``--simple``: round-to-nearest)."""
    tag = "mixed" if mixed else ""
    if kind == "fp16":
        return "_fp16.safetensors"
    if kind in ("nvfp4", "mxfp8"):
        if a.custom_type or a.fallback:
            return f"_{kind}_mixed.safetensors"
        return f"_simple_{kind}{tag}.safetensors"
    if kind == "fp8":
        return f"_simple_fp8{tag}_{a.scaling_mode or 'tensor'}.safetensors"
    scaling = {"int8-tensor": "_tensorwise", "int8": "_rowwise", "int8-rot": "_rowwise"}
    return f"_simple_int8{tag}{scaling.get(fmt, f'_bs{a.block_size or 128}')}.safetensors"
