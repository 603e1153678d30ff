"""The one reader of a file's quantization metadata, as ComfyUI 0.30 reads it at load time.

Per-layer ``L.comfy_quant`` tensors; the legacy header entry ``__metadata__["_quantization_metadata"]``
(``{"format_version": "1.0", "layers": {...}}``, written over per-layer configs, as ComfyUI does); old
``scaled_fp8`` files (a marker tensor, ``L.scale_weight`` / ``L.scale_input``), upgraded by ComfyUI's rules.
``edit``, ``inspect`` and the runtime loader all read files through :func:`read_quant_state`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import HEADER_KEY, QUANT_SUFFIX, decode_comfy_quant
from comfyquant.io.reader import CheckpointReader

FP8_FORMATS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


MARKER = "scaled_fp8"
FP8_FORMATS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


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
    reshape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input name -> stored shape
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # new output tensors, written after the layer


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
            if wdtype not in FP8_FORMATS and problems is None:
                raise UserError(
                    f"{reader.path}: '{n}' scales '{layer}.weight', which is "
                    f"{'missing' if weight is None else str(wdtype).removeprefix('torch.')}, not fp8; "
                    f"remove it with --remove-keys {n}")
            conf: dict[str, Any] = {"format": FP8_FORMATS.get(wdtype, "float8_e4m3fn")}
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


