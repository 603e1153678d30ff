"""``comfyquant edit``: rewrite a quantized checkpoint's metadata without re-quantizing, streamed and atomic.

Removes tensors or ``comfy_quant`` keys, moves per-layer ``comfy_quant`` into the legacy header entry
``_quantization_metadata`` or back, and upgrades legacy files (that header, old ``scaled_fp8`` files) to
per-layer ``comfy_quant`` the way ComfyUI's own ``convert_old_quants`` reads them at load time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.convert.edit_ops import add_config_keys, check_high_precision, select_layers
from comfyquant.convert.legacy import scaled_int8_layers
from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.io.comfy_meta import (
    HEADER_KEY,
    QUANT_SUFFIX,
    encode_comfy_quant,
    make_header_metadata,
)
from comfyquant.io.legacy import FP8_FORMATS as _FP8_FORMATS
from comfyquant.io.legacy import QuantState, read_quant_state
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import StreamingWriter, TensorSpec


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
    added_config_keys: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [f"wrote {self.output}: {self.tensors_out} tensors (input had {self.tensors_in}), "
                 f"{self.layers} quantized layers; metadata {self.metadata_in} -> {self.metadata_out}"]
        if self.removed_tensors:
            lines.append(f"removed tensors: {', '.join(self.removed_tensors)}")
        for k, n in self.removed_config_keys.items():
            lines.append(f"removed '{k}' from {n} layer configs")
        for k, n in self.added_config_keys.items():
            lines.append(f"set '{k}' in {n} layer configs")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _same_file(a: Path, b: Path) -> bool:
    return (a.exists() and b.exists() and a.samefile(b)) or a.resolve() == b.resolve()


def edit_checkpoint(path: str | Path, output: str | Path, remove_keys: Iterable[str] = (),
                    to_header_metadata: bool = False, to_layer_metadata: bool = False, force: bool = False,
                    keep_layer_metadata: bool = False, add_keys: Mapping[str, Any] | None = None,
                    layer_filter: str | None = None, scaled_int8: bool = False, int8_block_size: int | None = None,
                    add_input_scale: bool = False, high_precision: str | None = None) -> EditResult:
    """Write an edited copy of ``path`` to ``output`` (the input is never modified).

    ``remove_keys``: tensor names to drop, or ``comfy_quant`` keys (e.g. ``full_precision_matrix_mult``) to
    delete from every layer config; ``add_keys`` sets keys in them; ``layer_filter`` (a regex) limits both to
    the layers it finds. The output carries per-layer ``comfy_quant`` tensors (legacy forms are upgraded;
    ``scaled_int8`` also reads convert_to_quant's scaled INT8 form, ``int8_block_size`` choosing the tile when
    a scale grid fits several) unless ``to_header_metadata``, which moves them into the header
    (``keep_layer_metadata`` keeps the tensors too). ``add_input_scale`` gives fp8 layers without an
    ``input_scale`` a scalar 1.0; ``high_precision`` (a regex) fails if any quantized layer matches it.
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
    if scaled_int8:
        _read_scaled_int8(reader, st, set(drop_tensors), int8_block_size)
    if high_precision is not None:
        check_high_precision(st.layers, high_precision)
    res = EditResult(out, len(reader.infos), 0, len(st.layers), _where(st.source.values()),
                     "none" if not st.layers else "header" if to_header_metadata else "layer",
                     removed_tensors=drop_tensors)
    chosen = select_layers(st.layers, layer_filter)
    changed = _remove_config_keys(st, [k for k in keys if k not in reader.infos], res, reader.path, chosen)
    if add_keys:
        res.added_config_keys = add_config_keys(st.layers, add_keys, chosen)
        changed |= set(chosen)
    if add_input_scale:
        _add_input_scales(reader, st, set(drop_tensors))
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


def _read_scaled_int8(reader: CheckpointReader, st: QuantState, dropped: set[str], block: int | None) -> None:
    """Fold convert_to_quant's scaled INT8 layers into ``st`` (layers already described are left alone)."""
    infos = {n: i for n, i in reader.infos.items() if n not in dropped}
    up = scaled_int8_layers(infos, set(st.layers), block)
    if not up.layers and not st.layers:
        raise UserError(f"{reader.path} has no int8 weight with a scale_weight: not a scaled INT8 checkpoint")
    st.layers.update(up.layers)
    st.source.update(dict.fromkeys(up.layers, "scaled_int8"))
    st.renames.update(up.renames)
    st.reshape.update(up.reshape)
    st.dropped.update(up.dropped)
    if up.layers:
        st.legacy.append("scaled_int8")


def _add_input_scales(reader: CheckpointReader, st: QuantState, dropped: set[str]) -> None:
    """A scalar 1.0 ``input_scale`` for every fp8 layer without one (static activation scale of 1)."""
    present = {st.renames.get(n, n) for n in reader.infos if n not in dropped and n not in st.dropped}
    for layer, conf in st.layers.items():
        name = f"{layer}.input_scale"
        if str(conf.get("format", "")).startswith("float8") and name not in present:
            st.added[name] = torch.ones((), dtype=torch.float32)


def _where(sources: Iterable[str]) -> str:
    kinds = sorted(set(sources))
    return "none" if not kinds else kinds[0] if len(kinds) == 1 else "mixed (" + ", ".join(kinds) + ")"


def _remove_config_keys(st: QuantState, keys: list[str], res: EditResult, path: Path,
                        chosen: list[str]) -> set[str]:
    """Delete ``keys`` from the configs of ``chosen`` layers (top level and under ``params``); returns the
    changed layers."""
    changed: set[str] = set()
    for key in keys:
        if key == "format":
            raise UserError("cannot remove 'format' from comfy_quant configs: ComfyUI needs it")
        n = 0
        for layer in chosen:
            conf = st.layers[layer]
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
            which = "any" if len(chosen) == len(st.layers) else "any selected"
            raise UserError(f"--remove-keys: '{key}' is neither a tensor in {path} nor a key of {which} "
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
        if layer in emitted:
            return
        emitted.add(layer)
        for extra, t in st.added.items():
            if extra.startswith(layer + ".") and "." not in extra[len(layer) + 1:]:
                specs.append(TensorSpec(extra, t.dtype, tuple(t.shape)))
                sources.append(t)
        if header_only:
            return
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
        shape = st.reshape.get(n)
        specs.append(TensorSpec(out_name, info.dtype, info.shape if shape is None else shape))
        sources.append(n if shape is None else reader.get(n).reshape(shape))
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

