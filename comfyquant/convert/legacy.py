"""Legacy quantized files: convert_to_quant's scaled INT8 form, and cleaning up old ``scaled_fp8`` files.

Scaled INT8 (``L.weight`` int8 next to ``L.scale_weight``) has no loader in ComfyUI; :func:`scaled_int8_layers`
reads its layers so that ``edit`` can write them as per-layer ``comfy_quant`` (int8_tensorwise, per-tensor or
per-row, or int8_blockwise). :func:`cleanup_scaled_fp8` keeps the ``scaled_fp8`` form and tidies it: orphan
scales out, the marker sized as asked, 1-element scales as scalars, optionally unit ``scale_input`` added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.errors import UserError
from comfyquant.io.reader import CheckpointReader, TensorInfo
from comfyquant.io.writer import StreamingWriter, TensorSpec

MARKER = "scaled_fp8"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Int8Upgrade:
    """What reading a scaled INT8 file found: configs by layer, renamed / reshaped / dropped input tensors."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    reshape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def int8_layout(shape: tuple[int, int], scale: tuple[int, ...], block_size: int | None,
                where: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The ``comfy_quant`` of an int8 ``[N, K]`` weight with a scale of shape ``scale``, and the shape the
    scale is stored in: scalar (per-tensor), ``[N, 1]`` (per-row), or a ``[ceil(N/b), ceil(K/b)]`` tile grid
    (``int8_blockwise``, ``group_size`` b; ``block_size`` picks b when several fit)."""
    n, k = shape
    numel = 1
    for d in scale:
        numel *= d
    if numel == 1:
        return {"format": "int8_tensorwise"}, ()
    if tuple(scale) in ((n,), (n, 1)):
        return {"format": "int8_tensorwise"}, (n, 1)
    if len(scale) == 2:
        gn, gk = scale
        candidates = [b for b in (block_size, -(-n // gn), -(-k // gk)) if b]
        for b in candidates:
            if -(-n // b) == gn and -(-k // b) == gk:
                return {"format": "int8_blockwise", "group_size": b}, tuple(scale)
    raise UserError(f"{where}: scale shape {list(scale)} fits neither a per-tensor, a per-row nor a square-tile "
                    f"scale of the int8 weight {[n, k]}")


def scaled_int8_layers(infos: Mapping[str, TensorInfo], known: set[str], block_size: int | None) -> Int8Upgrade:
    """The layers of a scaled INT8 file (layers in ``known`` already have a config and are left alone).

    ``L.scale_weight`` of an int8 weight becomes ``L.weight_scale``; one next to a float weight is a dummy left
    by the writer and is dropped; ``L.scale_input`` of an int8 layer is dropped (ComfyUI's int8_tensorwise
    takes no activation scale: it quantizes activations per token itself).
    """
    up = Int8Upgrade()
    for n, info in infos.items():
        if not n.endswith(".scale_weight"):
            continue
        layer = n[: -len(".scale_weight")]
        if layer in known:
            continue
        w = infos.get(f"{layer}.weight")
        if w is not None and w.dtype == torch.int8 and len(w.shape) == 2:
            conf, scale_shape = int8_layout((w.shape[0], w.shape[1]), info.shape, block_size, n)
            up.layers[layer] = conf
            up.renames[n] = f"{layer}.weight_scale"
            if scale_shape != info.shape:
                up.reshape[n] = scale_shape
        elif w is not None and w.dtype in FLOAT_DTYPES:
            up.dropped[n] = f"dummy scale of the high-precision weight {layer}.weight"
        else:
            what = "missing" if w is None else str(w.dtype).removeprefix("torch.")
            raise UserError(f"'{n}' scales '{layer}.weight', which is {what}, not int8 (an fp8 file is "
                            "converted with --convert-fp8-scaled / --to-layer-metadata)")
    for n in infos:
        if n.endswith(".scale_input") and n[: -len(".scale_input")] in up.layers:
            up.dropped[n] = "int8 layers take no input_scale in ComfyUI"
    return up


@dataclass
class CleanupResult:
    """What :func:`cleanup_scaled_fp8` did (printed by the CLI)."""

    output: Path
    tensors_in: int
    tensors_out: int
    fp8_layers: int
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    scalars: list[str] = field(default_factory=list)
    marker: str = ""

    def to_text(self) -> str:
        lines = [f"wrote {self.output}: {self.tensors_out} tensors (input had {self.tensors_in}), "
                 f"{self.fp8_layers} fp8 layers, scaled_fp8 form kept; {self.marker}"]
        if self.removed:
            lines.append(f"removed {len(self.removed)} scale(s) of non-fp8 weights: {', '.join(self.removed)}")
        if self.scalars:
            lines.append(f"stored {len(self.scalars)} one-element scale(s) as scalars")
        if self.added:
            lines.append(f"added scale_input = 1.0 to {len(self.added)} fp8 layer(s)")
        return "\n".join(lines)


def cleanup_scaled_fp8(path: str | Path, output: str | Path, marker_size: int | None = None,
                       add_scale_input: bool = False, remove_orphans: bool = True,
                       force: bool = False) -> CleanupResult:
    """Write a tidied copy of a ``scaled_fp8`` checkpoint, still in that legacy form.

    ``marker_size`` resizes the ``scaled_fp8`` marker (ComfyUI reads 2 elements as full_precision_matrix_mult,
    anything else as not); None keeps it. ``remove_orphans`` drops ``scale_weight``/``scale_input`` tensors
    whose weight is missing or not fp8; ``add_scale_input`` gives fp8 layers without one a scalar 1.0 (ComfyUI
    0.30 treats a unit ``scale_input`` like none).
    """
    reader = CheckpointReader(path)
    out = Path(output)
    if any(out.resolve() == f.resolve() for f in [reader.path, *reader.files]):
        raise UserError(f"output {out} is the input file; choose another output path")
    if out.exists() and not force:
        raise UserError(f"output exists: {out} (use --force to overwrite)")
    infos = reader.infos
    markers = [n for n in infos if n == MARKER or n.endswith("." + MARKER)]
    if not markers:
        raise UserError(f"{reader.path} is not a scaled_fp8 checkpoint (it has no 'scaled_fp8' marker tensor)")
    fp8 = {n[: -len(".weight")] for n, i in infos.items() if n.endswith(".weight") and i.dtype in FP8_DTYPES}
    res = CleanupResult(out, len(infos), 0, len(fp8))
    specs: list[TensorSpec] = []
    sources: list[str | torch.Tensor] = []

    def emit(name: str, dtype: torch.dtype, shape: tuple[int, ...], src: str | torch.Tensor) -> None:
        specs.append(TensorSpec(name, dtype, shape))
        sources.append(src)

    for n, info in infos.items():
        suffix = next((s for s in (".scale_weight", ".scale_input") if n.endswith(s)), None)
        if n in markers:
            size = info.numel if marker_size is None else marker_size
            emit(n, info.dtype, (size,), n if marker_size is None else torch.zeros(size, dtype=info.dtype))
            res.marker = f"marker {n}: {info.numel} -> {size} element(s)"
        elif suffix is not None and n[: -len(suffix)] not in fp8 and remove_orphans:
            res.removed.append(n)
        elif suffix is not None and info.numel == 1 and info.shape != ():
            emit(n, info.dtype, (), reader.get(n).reshape(()))
            res.scalars.append(n)
        else:
            emit(n, info.dtype, info.shape, n)
        if add_scale_input and n.endswith(".weight") and n[: -len(".weight")] in fp8:
            name = f"{n[: -len('.weight')]}.scale_input"
            if name not in infos:
                emit(name, torch.float32, (), torch.ones((), dtype=torch.float32))
                res.added.append(name)
    with StreamingWriter(out, specs, dict(reader.metadata), overwrite=force) as w:
        for spec, src in zip(specs, sources, strict=True):
            w.write(spec.name, src if isinstance(src, torch.Tensor) else reader.get(src))
    res.tensors_out = len(specs)
    return res
