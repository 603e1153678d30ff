"""``load_quantized``: put a quantized checkpoint's weights into a plain PyTorch or diffusers model.

The file's key prefix (``model.diffusion_model.``, ``transformer.``, none, ...) is found by matching its keys
against the model's own parameter names. Layers with a ``comfy_quant`` entry (or listed in the legacy
``_quantization_metadata`` header, or scaled by an old ``scaled_fp8`` file) replace the model's ``nn.Linear``
with a ``QuantLinear``; every other tensor loads normally. Missing and unexpected keys are errors that name
the first few keys; nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import QUANT_SUFFIX, decode_comfy_quant, encode_comfy_quant
from comfyquant.io.legacy import read_quant_state
from comfyquant.io.reader import CheckpointReader
from comfyquant.runtime.fold import fold_input_activations
from comfyquant.runtime.kernels.registry import kernel_kind
from comfyquant.runtime.nn import QUANT_SUFFIXES, QuantLinear, check_backend
from comfyquant.runtime.tensor import REGISTRY

logger = logging.getLogger("comfyquant.runtime")

_SHOW = 5  # keys listed in an error message


@dataclass
class LoadReport:
    """What ``load_quantized`` did: the prefix it stripped, the layers it quantized (name -> format) and the
    file keys that belong to other components of a bundled checkpoint (outside the prefix)."""

    path: str
    prefix: str
    quantized: dict[str, str] = field(default_factory=dict)
    plain: int = 0
    other_components: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # only non-empty after strict=False
    unexpected: list[str] = field(default_factory=list)  # only non-empty after strict=False
    legacy: str | None = None  # "header" or "scaled_fp8" when the file used a legacy metadata form
    folded: list[str] = field(default_factory=list)  # activations folded into the layer they feed


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def detect_prefix(file_keys: Iterable[str], model_keys: set[str]) -> str:
    """The prefix ``p`` for which the most file keys are ``p + <a model key>`` (ties: the shortest)."""
    counts: Counter[str] = Counter()
    for fk in file_keys:
        for i in [0, *(j + 1 for j, ch in enumerate(fk) if ch == ".")]:
            if fk[i:] in model_keys:
                counts[fk[:i]] += 1
    if not counts:
        return ""
    best = max(counts.values())
    return min((p for p, c in counts.items() if c == best), key=len)


def read_for_model(path: str | Path, model_keys: set[str]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The file's tensors for this model, prefix stripped, with every quantized layer's ``comfy_quant`` tensor.

    Quantization metadata is read the way ComfyUI reads it (``io.legacy.read_quant_state``): legacy header
    configs and ``scaled_fp8`` scales become per-layer ``comfy_quant`` / ``weight_scale`` / ``input_scale``.
    """
    reader = CheckpointReader(path)
    st = read_quant_state(reader)
    names = {k: st.renames.get(k, k) for k in reader if k not in st.dropped}
    prefix = detect_prefix(names.values(), model_keys)
    report = LoadReport(str(path), prefix)
    state: dict[str, torch.Tensor] = {}
    for k, name in names.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = reader.get(k)
        else:
            report.other_components.append(k)
    if not any(k in model_keys for k in state):
        example = next(iter(sorted(model_keys)), "?")
        first = next(iter(names.values()), "nothing")
        raise UserError(f"{path}: no tensor matches the model's parameter names (the model has e.g. "
                        f"'{example}', the file has e.g. '{first}')")
    for layer, conf in st.layers.items():
        if st.source[layer] != "layer" and layer.startswith(prefix):  # header / scaled_fp8 configs
            state[layer[len(prefix):] + QUANT_SUFFIX] = encode_comfy_quant(conf)
    report.legacy = "header" if "header" in st.legacy else "scaled_fp8" if "scaled_fp8" in st.legacy else None
    return state, report


def _swap_in_quant_linears(model: nn.Module, confs: Mapping[str, dict[str, Any]], path: str) -> None:
    """Replace each quantized layer's ``nn.Linear`` by an empty ``QuantLinear`` of the same geometry."""
    for layer, conf in confs.items():
        try:
            mod = model.get_submodule(layer)
        except AttributeError:
            continue  # reported as unexpected keys by load_state_dict
        if isinstance(mod, QuantLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise UserError(f"{path}: layer {layer} is stored as {conf.get('format')} but the model's module "
                            f"there is {type(mod).__name__}; only nn.Linear layers can be quantized")
        w = mod.weight
        device = None if w.device.type == "meta" else w.device
        q = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None, device=device, dtype=w.dtype)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
        parent_name, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)


def _check_plain_shapes(model_sd: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str) -> None:
    for k, t in state.items():
        ref = model_sd.get(k)
        if ref is None:
            continue
        if ref.shape != t.shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(t.shape)} but the model's is {tuple(ref.shape)}")
        if ref.is_floating_point() and not t.is_floating_point():
            raise UserError(f"{path}: tensor {k} is stored as {t.dtype} with no quantization metadata "
                            f"(comfy_quant); it cannot be loaded into a {ref.dtype} parameter")


def _cast_assigned(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """After ``assign=True`` loading, give each float plain tensor back the dtype the model declared."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            want = dtypes.get(f"{name}.{pname}" if name else pname)
            if want is not None and p.dtype != want and p.is_floating_point():
                new = p.detach().to(want)
                if isinstance(p, nn.Parameter):
                    setattr(mod, pname, nn.Parameter(new, requires_grad=p.requires_grad))
                else:
                    setattr(mod, pname, new)


def load_quantized_report(model: nn.Module, path: str | Path, *, device: torch.device | str | None = None,
                          compute_dtype: torch.dtype | None = None, backend: str | None = None,
                          strict: bool = True, fold_activations: bool = True) -> tuple[nn.Module, LoadReport]:
    """:func:`load_quantized`, also returning the :class:`LoadReport`."""
    if compute_dtype is not None:
        if not compute_dtype.is_floating_point:
            raise UserError(f"compute_dtype must be a floating-point dtype, got {compute_dtype}")
        model.to(compute_dtype)
    model_keys = set(model.state_dict().keys())
    state, report = read_for_model(path, model_keys)
    confs = {k[: -len(QUANT_SUFFIX)]: decode_comfy_quant(t) for k, t in state.items() if k.endswith(QUANT_SUFFIX)}
    if backend is not None:
        for conf in confs.values():
            layout = REGISTRY.layouts.get(str(conf.get("format")))
            if layout is not None:  # unknown formats are refused by QuantLinear, naming the layer
                check_backend(layout, backend)
    _swap_in_quant_linears(model, confs, str(path))
    model_sd = model.state_dict()
    quant_keys = {f"{layer}.{s}" for layer in confs for s in QUANT_SUFFIXES}
    _check_plain_shapes(model_sd, {k: v for k, v in state.items() if k not in quant_keys}, str(path))
    # A model built on the meta device (diffusers' init_empty_weights) has no storage to copy into: take the
    # file's tensors instead, then cast them to the model's dtypes.
    empty = [k for k, v in model_sd.items() if v.is_meta]
    dtypes = {k: v.dtype for k, v in model_sd.items()}
    model.load_state_dict(state, strict=False, assign=bool(empty))
    if empty:
        _cast_assigned(model, dtypes)
    loaded_keys = set(model.state_dict().keys())
    missing = sorted(loaded_keys - state.keys())
    unexpected = sorted(state.keys() - loaded_keys)
    if strict and missing:
        raise UserError(f"{path}: {len(missing)} of the model's tensors are missing from the file "
                        f"(prefix '{report.prefix}'): {_few(missing)}")
    if strict and unexpected:
        raise UserError(f"{path}: {len(unexpected)} tensors in the file have no place in the model "
                        f"(prefix '{report.prefix}'): {_few(unexpected)}")
    if missing or unexpected:
        report.missing, report.unexpected = missing, unexpected
        logger.warning("comfyquant: %s loaded with strict=False: %d missing (%s), %d unexpected (%s)", path,
                       len(missing), _few(missing), len(unexpected), _few(unexpected))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.weight is not None:
            report.quantized[name] = mod.qweight.layout_name
            if backend is not None:
                mod.set_backend(backend)
    report.plain = sum(1 for k in state if k not in quant_keys)
    if fold_activations:
        report.folded = fold_input_activations(model)
    if device is not None:
        model.to(device)
    _note_reference_only(model, str(path))
    logger.info("comfyquant: loaded %s: %d quantized layers, %d plain tensors, prefix '%s'%s", path,
                len(report.quantized), report.plain, report.prefix,
                f", {len(report.other_components)} tensors of other components left out"
                if report.other_components else "")
    return model, report


def _note_reference_only(model: nn.Module, path: str) -> None:
    """One log line for the layers whose kernel kind has accelerated backends of which none runs on their
    device (nvfp4 / mxfp8 off Blackwell): they load and run, through the reference (dequantize + matmul)."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for mod in model.modules():
        if not isinstance(mod, QuantLinear) or mod.weight is None:
            continue
        params = mod.qweight.params
        fmt = getattr(params, "format", None)
        if fmt is None or fmt.kernel_kind is None:
            continue
        kind = kernel_kind(fmt.kernel_kind)
        device = mod.qweight.qdata.device
        others = [name for name in kind.backends if name != kind.reference]
        reasons = [kind.why_not(name, device) for name in others]
        if others and all(reasons):
            entry = groups.setdefault((fmt.name, str(device)), [0, reasons[0], params.orig_dtype])
            entry[0] += 1
    if groups:
        logger.warning("comfyquant: %s: no accelerated kernel of these layers runs on their device, so they run "
                       "through their reference kernel (nvfp4 / mxfp8: the weight dequantized to the compute dtype; "
                       "correct, not faster): %s", path,
                       "; ".join(f"{n} {fmt} layer(s) on {dev}, compute {str(dt).removeprefix('torch.')} ({why})"
                                 for (fmt, dev), (n, why, dt) in groups.items()))


def load_quantized(model: nn.Module, path: str | Path, *, device: torch.device | str | None = None,
                   compute_dtype: torch.dtype | None = None, backend: str | None = None,
                   strict: bool = True, fold_activations: bool = True) -> nn.Module:
    """Load ``path`` into ``model`` in place (quantized layers become ``QuantLinear``) and return the model.

    ``compute_dtype`` casts the model's float tensors and is the logical dtype of quantized weights;
    ``backend`` pins every quantized layer's kernel backend; ``strict`` (default) refuses files with missing
    or extra tensors for this model (``strict=False`` loads what matches and logs the rest). A file refused
    for a layer's contents or for missing/extra tensors may leave the model partly loaded.
    ``fold_activations``: activation modules feeding a quantized layer are folded into it (``runtime.fold``).
    """
    return load_quantized_report(model, path, device=device, compute_dtype=compute_dtype, backend=backend,
                                 strict=strict, fold_activations=fold_activations)[0]
