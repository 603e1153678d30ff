"""``comfyquant inspect`` (convert_to_quant's ``--dry-run analyze``): a float checkpoint's conversion plan, or
what each layer of a quantized file holds and whether stock ComfyUI 0.30 loads it. Reads headers and the
small metadata/scale tensors only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from comfyquant.autoprec.result import FLOOR_KEYS, floor_text
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.plan import KEEP, Plan, PlanOptions, build_plan
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.formats import STOCK_COMFY_0_30, conf_value, get_format
from comfyquant.io.comfy_meta import HEADER_KEY, QUANT_SUFFIX, is_scaled_fp8
from comfyquant.io.legacy import QuantState, read_quant_state
from comfyquant.io.reader import CheckpointReader, TensorInfo

AUTO_KEY = "comfyquant.auto"  # the --format auto summary in __metadata__ (convert.pipeline.AUTO_METADATA)
BLOCKWISE_NOTE = ("stock ComfyUI 0.30 rejects int8_blockwise (its loader fails with KeyError: 'int8_blockwise', "
                  "the format is not in QUANT_ALGOS); load it with comfyquant's runtime (comfyquant.load_quantized)")
LORA_NOTE = ("a quantized LoRA: stock ComfyUI 0.30's LoraLoader is NOT able to use it. It reads lora_up/lora_down "
             "(lora_B/lora_A) as plain tensors and casts them to float, ignoring weight_scale and comfy_quant "
             "('lora key not loaded'), so it would add the raw int8/fp8 codes, a difference off by the two scales. "
             "Use it with comfyquant.lora.apply(model, FILE) or merge it with `comfyquant convert --merge-lora`, "
             "which dequantize it on read")
_LORA_LAYER = (".lora_up", ".lora_down", ".lora_A", ".lora_B", ".lora_mid", ".lora.up", ".lora.down")


def _quant_dtypes() -> set[torch.dtype]:
    """Dtypes the registered formats store quantized weights in."""
    return {f.storage_dtype for f in FORMATS.formats() if f.is_quantized}


def _dt(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class LayerInfo:
    """One quantized layer of a file, as ComfyUI would load it."""

    name: str
    format: str | None
    storage_dtype: str | None
    shape: list[int] | None
    scale_shape: list[int] | None
    convrot: bool = False
    convrot_groupsize: int | None = None
    group_size: int | None = None
    input_scale: bool = False
    full_precision_matrix_mult: bool = False
    metadata: str = "layer"  # where its config lives: layer / header / scaled_fp8
    stock_comfy: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass
class InspectResult:
    """``kind`` is ``float`` (then ``plan`` is set) or ``quantized`` (then ``layers`` is)."""

    path: str
    kind: str
    format: str | None = None
    preset: str | None = None
    plan: Plan | None = None
    layers: list[LayerInfo] = field(default_factory=list)
    legacy: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stock_comfy: bool = True
    bytes_total: int = 0
    lora: bool = False  # a LoRA file (stock_comfy then says whether ComfyUI's LoraLoader can use it)
    auto: Any = None  # the automatic-precision plan: an AutoPlan (float input) or its stored summary (dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind, "stock_comfyui_0_30_loads": self.stock_comfy,
                             "lora": self.lora, "problems": self.problems, "notes": self.notes}
        if self.auto is not None:
            d["auto"] = self.auto if isinstance(self.auto, dict) else self.auto.to_dict()
        if self.plan is not None:
            p = self.plan
            d.update(format=p.format, preset=p.preset, block_size=p.block_size, counts=p.counts(),
                     bytes_before=p.bytes_in, bytes_after=p.bytes_out,
                     entries=[e.to_dict() for e in p.entries])
        else:
            d.update(legacy_metadata=self.legacy, bytes=self.bytes_total,
                     formats=dict(Counter(x.format or "?" for x in self.layers)),
                     layers=[asdict(x) for x in self.layers])
        return d

    def to_text(self) -> str:
        return _plan_text(self) if self.plan is not None else _quant_text(self)


def inspect_checkpoint(path: str | Path, model: str = "auto", fmt: str = "int8", block_size: int = 128,
                       layer_config: str | Path | None = None, layers: LayerOptions | None = None,
                       budget: Any = None, target_gpu: str | None = None, allow_comfyquant_formats: bool = False,
                       calibration: Any = None, device: str = "cpu", probe: Any = None,
                       auto_confidence: float | None = None, auto_margin_db: float | None = None) -> InspectResult:
    """Inspect one checkpoint (file or sharded index): the plan for ``fmt``/``model`` if it holds float
    weights, else its quantized layers and the problems ComfyUI would hit. ``fmt="auto"`` plans automatic
    precision for ``budget`` (this reads the weights, and the ``calibration`` statistics when given; a quality
    floor's headroom from ``auto_confidence`` / ``auto_margin_db``, as ``convert``'s)."""
    reader = CheckpointReader(path)
    if is_quantized(reader.infos, reader.metadata):
        return _inspect_quantized(reader)
    auto = None
    if fmt == "auto":
        from comfyquant.convert.auto import plan_auto_conversion
        from comfyquant.convert.pipeline import ConvertOptions
        from comfyquant.progress import QUIET

        opts_auto = ConvertOptions(format=fmt, model=model, layer_config=layer_config, device=device,
                                   block_size=block_size, calibration=calibration, budget=budget,
                                   target_gpu=target_gpu, allow_comfyquant_formats=allow_comfyquant_formats,
                                   probe=probe, progress=QUIET, layers=layers or LayerOptions(),
                                   auto_confidence=auto_confidence, auto_margin_db=auto_margin_db)
        plan, auto = plan_auto_conversion(reader, opts_auto)
    else:
        get_format(fmt)
        opts = PlanOptions(format=fmt, model=model, layer_config=layer_config, block_size=block_size,
                           layers=layers or LayerOptions())
        plan = build_plan(reader.infos, opts, metadata=reader.metadata)
    res = InspectResult(str(reader.path), "float", plan.format, plan.preset, plan, bytes_total=reader.nbytes,
                        auto=auto)
    unloadable = sorted({e.format for e in plan.entries if e.format and not get_format(e.format).stock_comfy})
    if unloadable:
        res.stock_comfy = False
        res.notes.append(BLOCKWISE_NOTE if unloadable == ["int8-block"] else
                         f"stock ComfyUI 0.30 cannot load {', '.join(unloadable)}; load the file with comfyquant's "
                         "runtime or node pack")
    res.lora = plan.preset == "lora"
    if res.lora and any(e.action == "quantize" for e in plan.entries):
        res.stock_comfy = False
        res.notes.append(LORA_NOTE.replace("a quantized LoRA", "the converted LoRA will be a quantized LoRA"))
    return res


def is_quantized(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> bool:
    """A file with any quantization metadata, or an int8/fp8 weight stored next to a scale."""
    names = set(infos)
    if HEADER_KEY in metadata or is_scaled_fp8(names) or any(n.endswith(QUANT_SUFFIX) for n in names):
        return True
    dtypes = _quant_dtypes()
    return any(n.endswith(".weight") and t.dtype in dtypes
               and ({f"{n[:-7]}.weight_scale", f"{n[:-7]}.scale_weight"} & names) for n, t in infos.items())


def _inspect_quantized(reader: CheckpointReader) -> InspectResult:
    problems: list[str] = []
    st = read_quant_state(reader, problems=problems)
    res = InspectResult(str(reader.path), "quantized", legacy=list(st.legacy), bytes_total=reader.nbytes,
                        problems=problems, auto=_stored_auto(reader))
    infos = _upgraded_infos(reader, st)
    for layer, conf in st.layers.items():
        res.layers.append(_layer(reader, layer, conf, st.source[layer], infos))
    for x in res.layers:
        res.problems += [f"{x.name}: {p}" for p in x.problems]
    _orphans(st, infos, res)
    if "header" in st.legacy:
        res.notes.append(f"legacy '{HEADER_KEY}' header: stock ComfyUI 0.30 still reads it; "
                         "`comfyquant edit FILE -o OUT` rewrites it as per-layer comfy_quant")
    if "scaled_fp8" in st.legacy:
        res.notes.append("legacy scaled_fp8 file (scale_weight/scale_input): stock ComfyUI 0.30 still reads it; "
                         "`comfyquant edit FILE -o OUT` rewrites it as per-layer comfy_quant")
    blockwise = any(x.format == "int8_blockwise" for x in res.layers)
    if blockwise:
        res.notes.append(BLOCKWISE_NOTE)
    res.lora = any(x.name.endswith(_LORA_LAYER) for x in res.layers)
    if res.lora:
        res.notes.append(LORA_NOTE)
    res.stock_comfy = not res.problems and all(x.stock_comfy for x in res.layers) and not res.lora
    return res


def _stored_auto(reader: CheckpointReader) -> dict[str, Any] | None:
    """The automatic-precision summary a ``--format auto`` conversion stored in the header, if any."""
    raw = reader.metadata.get(AUTO_KEY)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return {"error": f"unreadable {AUTO_KEY} metadata"}
    return obj if isinstance(obj, dict) else {"error": f"unreadable {AUTO_KEY} metadata"}


def _upgraded_infos(reader: CheckpointReader, st: QuantState) -> dict[str, TensorInfo]:
    """Tensor infos under the names ComfyUI sees after its legacy upgrade."""
    return {st.renames.get(n, n): t for n, t in reader.infos.items() if n not in st.dropped}


def _layer(reader: CheckpointReader, layer: str, conf: Mapping[str, Any], source: str,
           infos: Mapping[str, TensorInfo]) -> LayerInfo:
    fmt = conf.get("format")
    w, s = infos.get(f"{layer}.weight"), infos.get(f"{layer}.weight_scale")
    x = LayerInfo(layer, fmt if isinstance(fmt, str) else None, _dt(w.dtype) if w else None,
                  list(w.shape) if w else None, list(s.shape) if s else None,
                  input_scale=f"{layer}.input_scale" in infos, metadata=source,
                  full_precision_matrix_mult=bool(conf_value(conf, "full_precision_matrix_mult", False)))
    x.stock_comfy = x.format in STOCK_COMFY_0_30
    if x.format is None:
        x.problems.append("comfy_quant has no \"format\" (ComfyUI: Unknown quantization format)")
        return x
    stored = {k[len(layer) + 1:]: (t.dtype, tuple(t.shape)) for k, t in infos.items()
              if k.startswith(layer + ".") and "." not in k[len(layer) + 1:]}
    try:
        spec = FORMATS.identify(conf, {k: v[1] for k, v in stored.items()})
    except ValueError:
        x.problems.append(f"unknown format '{x.format}' (ComfyUI 0.30 cannot load it)")
        return x
    x.problems += spec.validate(layer, conf, stored)
    try:
        params = spec.params_from_conf(conf)
    except ValueError:
        params = {}
    logical = spec.logical_shape(tuple(w.shape), params) if w else None
    if logical is not None:
        x.shape = list(logical)  # [out, in] of the layer (packed formats store K/2 bytes per row)
    x.convrot = spec.rotated
    x.convrot_groupsize = params.get("convrot_groupsize")
    x.group_size = params.get("block_size")
    return x


def _orphans(st: QuantState, infos: Mapping[str, TensorInfo], res: InspectResult) -> None:
    """Quantized-looking tensors no config covers: ComfyUI would load their raw values as plain weights."""
    dtypes = _quant_dtypes()
    for name, t in infos.items():
        if name.endswith(".weight_scale") and name[: -len(".weight_scale")] not in st.layers:
            res.problems.append(f"{name}: weight_scale without a comfy_quant config (ComfyUI ignores it and "
                                "loads the weight unscaled)")
        elif name.endswith(".weight") and t.dtype in dtypes and name[:-7] not in st.layers:
            res.problems.append(f"{name}: {_dt(t.dtype)} weight without a comfy_quant config")


def _mib(n: int) -> str:
    """A byte count in the largest unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def _plan_text(r: InspectResult) -> str:
    p = r.plan
    assert p is not None
    shown = [e.action != KEEP or (len(e.shape) == 2 and e.name.endswith(".weight")) for e in p.entries]
    rows = [e for e, s in zip(p.entries, shown, strict=True) if s]
    head = f"{'tensor':<60} {'shape':>14} {'action':<8} {'format':<10} {'size before -> after':>24}  rule: reason"
    lines = [f"{r.path}: float checkpoint, preset {p.preset}, format {p.format}", head]
    for e in rows:
        size = f"{_mib(e.bytes_in)} -> {_mib(e.bytes_out)}"
        lines.append(f"{e.name:<60} {'x'.join(map(str, e.shape)):>14} {e.action:<8} {e.format or '-':<10} "
                     f"{size:>24}  {e.rule}: {e.reason}")
    others = Counter(e.reason for e, s in zip(p.entries, shown, strict=True) if not s)
    if others:
        lines.append(f"{sum(others.values())} other tensors kept unchanged: "
                     + "; ".join(f"{n} x {why}" for why, n in others.most_common()))
    counts = ", ".join(f"{k} {v}" for k, v in p.counts().items() if v)
    ratio = p.bytes_out / p.bytes_in if p.bytes_in else 1.0
    lines.append(f"total: {counts}; {_mib(p.bytes_in)} -> {_mib(p.bytes_out)} ({ratio:.1%})")
    if r.auto is not None:
        lines.append(r.auto.to_text())
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _auto_text(auto: dict[str, Any]) -> list[str]:
    """The stored automatic-precision summary: budget, sizes, predicted / measured quality, kept layers."""
    if "error" in auto:
        return [f"auto precision: {auto['error']}"]
    counts = ", ".join(f"{v} {k}" for k, v in (auto.get("counts") or {}).items())
    lines = [f"auto precision: budget {auto.get('budget')}, size {float(auto.get('size', 0)):.1%} of the input; "
             f"layers: {counts}"]
    for key, label in (("predicted", "predicted"), ("measured_calibration", "measured on calibration inputs")):
        vals = auto.get(key) or {}
        if vals:
            lines.append(f"  {label}: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in vals.items()))
    floor = auto.get("floor")
    if floor:  # files written before the floor was recorded have no such key: nothing to say
        lines.append("  " + _stored_floor_text(floor))
    kept = [n for n, f in (auto.get("layers") or {}).items() if f == "keep"]
    if kept:
        lines.append(f"  kept in high precision by the plan: {', '.join(kept)}")
    return lines


def _stored_floor_text(floor: Any) -> str:
    """The stored quality floor on one line (``result.floor_text``), or what is wrong with a malformed record."""
    missing = [k for k in FLOOR_KEYS if not isinstance(floor, dict) or not isinstance(floor.get(k), int | float)]
    if missing or not isinstance(floor.get("metric"), str):
        return f"floor: unreadable record in {AUTO_KEY} (missing or not numbers: {', '.join(missing) or 'metric'})"
    return floor_text(floor)


def _quant_text(r: InspectResult) -> str:
    formats = ", ".join(f"{k} x{v}" for k, v in Counter(x.format or "?" for x in r.layers).items())
    lines = [f"{r.path}: quantized checkpoint, {len(r.layers)} quantized layers ({formats or 'none'}), "
             f"{_mib(r.bytes_total)}"]
    lines.append(f"{'layer':<56} {'format':<16} {'storage':<14} {'shape':>12} {'scale':>10}  details")
    for x in r.layers:
        det = [f"metadata: {x.metadata}"]
        if x.convrot:
            det.append(f"convrot group {x.convrot_groupsize}")
        if x.group_size:
            det.append(f"group_size {x.group_size}")
        if x.input_scale:
            det.append("input_scale")
        if x.full_precision_matrix_mult:
            det.append("full_precision_matrix_mult")
        if not x.stock_comfy:
            det.append("NOT loadable by stock ComfyUI 0.30")
        shape = "x".join(map(str, x.shape)) if x.shape is not None else "-"
        scale = "x".join(map(str, x.scale_shape)) or "scalar" if x.scale_shape is not None else "-"
        lines.append(f"{x.name:<56} {x.format or '?':<16} {x.storage_dtype or '-':<14} {shape:>12} {scale:>10}  "
                     + ", ".join(det))
    verdict = "yes" if r.stock_comfy else "NO"
    what = "'s LoraLoader can use it" if r.lora else " can load it"
    lines.append(f"stock ComfyUI 0.30{what}: {verdict}")
    if r.auto is not None:
        lines += _auto_text(r.auto)
    lines += [f"problem: {p}" for p in r.problems]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
