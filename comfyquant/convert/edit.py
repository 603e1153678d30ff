"""``comfyquant edit``: rewrite a quantized checkpoint's metadata without re-quantizing, streamed and atomic.

Removes tensors or ``comfy_quant`` keys, moves per-layer ``comfy_quant`` into the legacy header entry
``_quantization_metadata`` or back, and upgrades legacy files (that header, old ``scaled_fp8`` files) to
per-layer ``comfy_quant`` the way ComfyUI's own ``convert_old_quants`` reads them at load time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.io.comfy_meta import (
    HEADER_KEY,
    QUANT_SUFFIX,
    decode_comfy_quant,
    encode_comfy_quant,
    make_header_metadata,
)
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import StreamingWriter, TensorSpec

MARKER = "scaled_fp8"
_FP8_FORMATS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


@dataclass
class QuantState:
    """How a file's quantization metadata reads, as ComfyUI would see it after its legacy upgrade.

    ``layers`` maps layer name -> ``comfy_quant`` object; ``source`` says where each came from (``layer``,
    ``header`` or ``scaled_fp8``); ``renames`` maps legacy input tensor names to their upgraded names and
    ``dropped`` lists input tensors the upgrade leaves out (markers, unit ``scale_input``), with the reason.
    """

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    legacy: list[str] = field(default_factory=list)
    markers: dict[str, int] = field(default_factory=dict)  # scaled_fp8 prefix -> marker element count


def read_quant_state(reader: CheckpointReader, drop: Iterable[str] = (),
                     problems: list[str] | None = None) -> QuantState:
    """Collect the per-layer configs of a checkpoint (reads only ``comfy_quant`` and legacy scale tensors).

    ``drop`` names input tensors to ignore (``--remove-keys``). A malformed ``comfy_quant`` tensor or header
    entry is a UserError naming it, or, when a ``problems`` list is given (``inspect``), a line appended to it
    (the entry is then left out, and a legacy fp8 scale on a non-fp8 weight is read as ComfyUI reads it).
    """
    dropped = set(drop)
    names = [n for n in reader.infos if n not in dropped]
    st = QuantState()
    for n in names:
        if n.endswith(QUANT_SUFFIX):
            layer = n[: -len(QUANT_SUFFIX)]
            conf = _decode(reader, n, problems)
            if conf is not None:
                st.layers[layer] = conf
                st.source[layer] = "layer"
    if HEADER_KEY in reader.metadata:
        st.legacy.append("header")
        for layer, conf in _header_layers(reader, problems).items():
            st.layers[layer] = conf  # ComfyUI writes the header's configs over per-layer ones
            st.source[layer] = "header"
        return st  # ComfyUI ignores scaled_fp8 markers when the header entry is present
    markers = {n[: -len(MARKER)]: reader.infos[n].numel for n in names if n == MARKER or n.endswith("." + MARKER)}
    if markers:
        st.legacy.append("scaled_fp8")
        st.markers = markers
        _upgrade_scaled_fp8(reader, names, st, problems)
    return st


def _fail(problems: list[str] | None, message: str) -> None:
    """Raise the UserError, or record it when collecting problems."""
    if problems is None:
        raise UserError(message)
    problems.append(message)


def _decode(reader: CheckpointReader, name: str, problems: list[str] | None) -> dict[str, Any] | None:
    t = reader.get(name)
    if t.dtype != torch.uint8 or t.dim() != 1:
        _fail(problems, f"{reader.path}: '{name}' must be a 1-D uint8 tensor, is {t.dtype} {tuple(t.shape)}")
        return None
    try:
        return decode_comfy_quant(t)
    except (ValueError, UnicodeDecodeError) as e:
        _fail(problems, f"{reader.path}: '{name}' does not hold a JSON object ({e})")
        return None


def _header_layers(reader: CheckpointReader, problems: list[str] | None) -> dict[str, dict[str, Any]]:
    try:
        obj = json.loads(reader.metadata[HEADER_KEY])
    except ValueError as e:
        _fail(problems, f"{reader.path}: header entry {HEADER_KEY} is not valid JSON ({e})")
        return {}
    layers = obj.get("layers") if isinstance(obj, dict) else None
    if not isinstance(layers, dict):
        _fail(problems, f"{reader.path}: header entry {HEADER_KEY} has no \"layers\" object")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for layer, conf in layers.items():
        if isinstance(conf, str):  # a bare format string; ComfyUI would store it as a JSON string and fail
            _fail(problems, f"{reader.path}: {HEADER_KEY} layer '{layer}' is a bare string {conf!r}, "
                  "not an object with a \"format\" key")
        elif not isinstance(conf, dict):
            _fail(problems, f"{reader.path}: {HEADER_KEY} layer '{layer}' is not a JSON object")
        else:
            out[layer] = dict(conf)
    return out


def _prefix_of(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest scaled_fp8 prefix ``name`` starts with (each marker governs the keys under its prefix)."""
    best = None
    for p in prefixes:
        if name.startswith(p) and (best is None or len(p) > len(best)):
            best = p
    return best


def _upgrade_scaled_fp8(reader: CheckpointReader, names: list[str], st: QuantState,
                        problems: list[str] | None) -> None:
    """ComfyUI's scaled_fp8 rules: ``L.scale_weight`` -> ``L.weight_scale`` plus a ``float8_e4m3fn`` config
    (``full_precision_matrix_mult`` when the marker has 2 elements); ``L.scale_input`` -> ``L.input_scale``,
    left out when it is exactly 1.0; the marker itself is left out.

    One deliberate difference: a layer whose weight is stored as e5m2 gets ``float8_e5m2``.
    """
    for n in names:
        prefix = _prefix_of(n, st.markers)
        if prefix is None:
            continue
        if n == prefix + MARKER:
            st.dropped[n] = "scaled_fp8 marker"
            continue
        if n.endswith(".scale_weight"):
            layer = n[: -len(".scale_weight")]
            st.renames[n] = f"{layer}.weight_scale"
            weight = reader.infos.get(f"{layer}.weight")
            wdtype = weight.dtype if weight is not None else None
            if wdtype not in _FP8_FORMATS and problems is None:
                raise UserError(
                    f"{reader.path}: '{n}' scales '{layer}.weight', which is "
                    f"{'missing' if weight is None else str(wdtype).removeprefix('torch.')}, not fp8; "
                    f"remove it with --remove-keys {n}")
            conf: dict[str, Any] = {"format": _FP8_FORMATS.get(wdtype, "float8_e4m3fn")}
            if st.markers[prefix] == 2:
                conf["full_precision_matrix_mult"] = True
            st.layers[layer] = conf
            st.source[layer] = "scaled_fp8"
        elif n.endswith(".scale_input"):
            layer = n[: -len(".scale_input")]
            t = reader.get(n)
            if t.numel() == 1 and float(t.float().reshape(())) == 1.0:
                st.dropped[n] = "scale_input of 1.0 (ComfyUI drops it)"
            else:
                st.renames[n] = f"{layer}.input_scale"


@dataclass
class EditResult:
    """What an edit did (printed by the CLI)."""

    output: Path
    tensors_in: int
    tensors_out: int
    layers: int
    metadata_in: str  # where the quantization metadata was: none / layer / header / scaled_fp8 / mixed
    metadata_out: str
    removed_tensors: list[str] = field(default_factory=list)
    removed_config_keys: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [f"wrote {self.output}: {self.tensors_out} tensors (input had {self.tensors_in}), "
                 f"{self.layers} quantized layers; metadata {self.metadata_in} -> {self.metadata_out}"]
        if self.removed_tensors:
            lines.append(f"removed tensors: {', '.join(self.removed_tensors)}")
        for k, n in self.removed_config_keys.items():
            lines.append(f"removed '{k}' from {n} layer configs")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _same_file(a: Path, b: Path) -> bool:
    return (a.exists() and b.exists() and a.samefile(b)) or a.resolve() == b.resolve()


def edit_checkpoint(path: str | Path, output: str | Path, remove_keys: Iterable[str] = (),
                    to_header_metadata: bool = False, to_layer_metadata: bool = False, force: bool = False,
                    keep_layer_metadata: bool = False) -> EditResult:
    """Write an edited copy of ``path`` to ``output`` (the input is never modified).

    ``remove_keys``: tensor names to drop, or ``comfy_quant`` keys (e.g. ``full_precision_matrix_mult``) to
    delete from every layer config. The output carries per-layer ``comfy_quant`` tensors (legacy forms are
    upgraded) unless ``to_header_metadata``, which moves them into the header (``keep_layer_metadata``
    keeps the tensors too).
    """
    if to_header_metadata and to_layer_metadata:
        raise UserError("choose one of --to-header-metadata and --to-layer-metadata")
    reader = CheckpointReader(path)
    out = Path(output)
    if any(_same_file(f, out) for f in [reader.path, *reader.files]):
        raise UserError(f"output {out} is the input file; choose another output path")
    if out.exists() and not force:
        raise UserError(f"output exists: {out} (use --force to overwrite)")
    keys = [k.strip() for k in remove_keys if k.strip()]
    drop_tensors = [k for k in keys if k in reader.infos]
    st = read_quant_state(reader, drop_tensors)
    res = EditResult(out, len(reader.infos), 0, len(st.layers), _where(st.source.values()),
                     "none" if not st.layers else "header" if to_header_metadata else "layer",
                     removed_tensors=drop_tensors)
    changed = _remove_config_keys(st, [k for k in keys if k not in reader.infos], res, reader.path)
    _check_layers(reader, st, set(drop_tensors), res, force)
    specs, sources = _output_plan(reader, st, set(drop_tensors), changed, to_header_metadata and
                                  not keep_layer_metadata)
    metadata = dict(reader.metadata)
    metadata.pop(HEADER_KEY, None)
    if to_header_metadata and st.layers:
        metadata[HEADER_KEY] = make_header_metadata(st.layers)
        if keep_layer_metadata:
            res.metadata_out = "header+layer"
    with StreamingWriter(out, specs, metadata, overwrite=force) as w:
        for spec, src in zip(specs, sources, strict=True):
            w.write(spec.name, src if isinstance(src, torch.Tensor) else reader.get(src))
    res.tensors_out = len(specs)
    return res


def _where(sources: Iterable[str]) -> str:
    kinds = sorted(set(sources))
    return "none" if not kinds else kinds[0] if len(kinds) == 1 else "mixed (" + ", ".join(kinds) + ")"


def _remove_config_keys(st: QuantState, keys: list[str], res: EditResult, path: Path) -> set[str]:
    """Delete ``keys`` from every layer config (top level and under ``params``); returns changed layers."""
    changed: set[str] = set()
    for key in keys:
        if key == "format":
            raise UserError("cannot remove 'format' from comfy_quant configs: ComfyUI needs it")
        n = 0
        for layer, conf in st.layers.items():
            hit = key in conf
            conf.pop(key, None)
            params = conf.get("params")
            if isinstance(params, dict) and key in params:
                params.pop(key)
                hit = True
            if hit:
                n += 1
                changed.add(layer)
        if n == 0:
            raise UserError(f"--remove-keys: '{key}' is neither a tensor in {path} nor a key of any "
                            "comfy_quant config")
        res.removed_config_keys[key] = n
    return changed


def _check_layers(reader: CheckpointReader, st: QuantState, dropped: set[str], res: EditResult,
                  force: bool) -> None:
    """Refuse an edit that breaks a layer for ComfyUI's loader (a quantized weight left without its scale, a
    config without its weight) unless ``force``; then, and for layers the input already had broken, a note."""
    before = {st.renames.get(n, n) for n in reader.infos if n not in st.dropped}
    shapes = {st.renames.get(n, n): tuple(t.shape) for n, t in reader.infos.items()}
    after = {n for n in before if n not in {st.renames.get(d, d) for d in dropped}}
    broken: list[str] = []
    for layer, conf in st.layers.items():
        was, now = _load_problem(layer, conf, before, shapes), _load_problem(layer, conf, after, shapes)
        if was is not None:
            res.notes.append(f"'{layer}' has {was} in the input already: ComfyUI will fail to load it")
        elif now is not None:
            broken.append(f"'{layer}' would have {now}")
    if broken and not force:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise UserError(f"{broken[0]}{more}: ComfyUI cannot load that file; keep those tensors, or pass --force "
                        "to write it anyway")
    res.notes += [f"{b}: ComfyUI will fail to load it (written because of --force)" for b in broken]
    for n in dropped:
        if n.endswith(QUANT_SUFFIX):
            w = reader.infos.get(n[: -len(QUANT_SUFFIX)] + ".weight")
            if w is not None and w.dtype in (torch.int8, *_FP8_FORMATS):
                res.notes.append(f"removed '{n}': its {str(w.dtype).removeprefix('torch.')} weight will load as "
                                 "a plain (unscaled) weight")


def _load_problem(layer: str, conf: dict[str, Any], present: set[str],
                  shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What ComfyUI's loader would miss for this layer among the ``present`` tensor names, or None: the
    weight, and every tensor the format registry says a layer of that format stores (optional ones aside)."""
    if f"{layer}.weight" not in present:
        return f"a comfy_quant config but no '{layer}.weight' tensor"
    fmts = FORMATS.for_comfy_format(str(conf.get("format")))
    if not fmts:
        return None  # an unknown format is reported by inspect/the loader with its own message
    try:
        fmt = FORMATS.identify(conf, {k[len(layer) + 1:]: v for k, v in shapes.items() if k.startswith(layer + ".")})
        params = fmt.params_from_conf(conf)
        logical = fmt.logical_shape(shapes[f"{layer}.weight"], params)
        slots = fmt.slots(logical, {**params, **fmt.resolve(logical, params)}) if logical else []
    except ValueError:  # FormatShapeError too: the file's own problem, reported elsewhere
        return None
    missing = [s.suffix for s in slots if s.suffix != "input_scale" and f"{layer}.{s.suffix}" not in present]
    return f"no {', '.join(missing)} for its {conf['format']} weight" if missing else None


def _output_plan(reader: CheckpointReader, st: QuantState, dropped: set[str], changed: set[str],
                 header_only: bool) -> tuple[list[TensorSpec], list[str | torch.Tensor]]:
    """Output tensors in input order, each ``L.comfy_quant`` right after ``L.weight`` (or at the end when the
    layer has no weight); sources are input names or new tensors."""
    specs: list[TensorSpec] = []
    sources: list[str | torch.Tensor] = []
    emitted: set[str] = set()

    def add_conf(layer: str) -> None:
        if header_only or layer in emitted:
            return
        emitted.add(layer)
        name = f"{layer}{QUANT_SUFFIX}"
        if st.source[layer] == "layer" and layer not in changed and name in reader.infos:
            src: str | torch.Tensor = name  # unchanged: copy the original bytes
            info = reader.infos[name]
            specs.append(TensorSpec(name, info.dtype, info.shape))
        else:
            src = encode_comfy_quant(st.layers[layer])
            specs.append(TensorSpec(name, torch.uint8, tuple(src.shape)))
        sources.append(src)

    for n, info in reader.infos.items():
        if n in dropped or n in st.dropped or n.endswith(QUANT_SUFFIX):
            continue
        out_name = st.renames.get(n, n)
        specs.append(TensorSpec(out_name, info.dtype, info.shape))
        sources.append(n)
        if out_name.endswith(".weight") and out_name[: -len(".weight")] in st.layers:
            add_conf(out_name[: -len(".weight")])
    for layer in st.layers:
        add_conf(layer)
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise UserError(f"{reader.path}: upgrading would write '{s.name}' twice (the file has both the "
                            "legacy and the current name)")
        seen.add(s.name)
    return specs, sources

