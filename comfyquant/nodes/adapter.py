"""Quantize a ComfyUI MODEL's linear layers on the fly, as object patches on a clone (the engine behind
"Enable INT8 on MODEL").

The input ModelPatcher is never changed: the original float layers stay in the shared model, and the clone
carries one object patch per converted layer (a :class:`~comfyquant.nodes.ops.ComfyQuantLinear`), which ComfyUI
swaps in when it loads the clone and out again when it unloads it. Which layers convert is decided by
``comfyquant.quantize_`` (model preset, size rules) run on a shell that mirrors the model and holds views of the
original weights; quantized weights are memoized (``nodes.cache``) so a re-run quantizes nothing.

``format = auto`` plans first (``runtime.quantize.plan_auto`` on the shell: a format per layer for the budget,
from weight error; preset keeps are candidates too) and then quantizes in the same single pass with the plan's
``layer_formats``; each layer gets the runtime backend of its own format's kernel kind.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from comfyquant.autoprec.candidates import KEEP
from comfyquant.formats.registry import gpu_generation
from comfyquant.nodes.attention import DESCRIPTIONS as ATTENTION_DESCRIPTIONS
from comfyquant.nodes.attention import enable_quantized_attention
from comfyquant.nodes.cache import CACHE, QuantCache
from comfyquant.nodes.dit_blocks import fold_dit_blocks
from comfyquant.nodes.graphs import enable_cuda_graphs
from comfyquant.nodes.ops import ComfyQuantLinear, is_plain_linear
from comfyquant.nodes.patching import register_patch_callback
from comfyquant.nodes.settings import AUTO, AdapterSettings
from comfyquant.nodes.smoothing import Smoothing, open_smoothing, resolve_calibration_path
from comfyquant.nodes.unet_blocks import fold_unet_blocks
from comfyquant.runtime.fold import foldable_pairs, foldable_projections
from comfyquant.runtime.gated import gated_group, gated_mlps, inputs_fuse
from comfyquant.runtime.kernels.backends import device_capability
from comfyquant.runtime.kernels.launch import describe_device
from comfyquant.runtime.nn import NormSource, QuantLinear
from comfyquant.runtime.norms import FoldedNorm, NormSpec, foldable_norms, weight_folds_norm
from comfyquant.runtime.quantize import QuantizeConfig, layout_for, plan_auto, quantize_
from comfyquant.runtime.siblings import ArmedForward, SiblingGroup, sibling_groups
from comfyquant.runtime.tensor import QuantizedTensor

logger = logging.getLogger("comfyquant.nodes")

MODEL_ROOT = "diffusion_model"  # a MODEL's converted tree; a CLIP's patcher converts its whole model ("")
PREFIX = f"{MODEL_ROOT}."  # a MODEL's keys: patches, object patches, LoRA keys
MSG_NO_DIFFUSION = "INT8 Model Adapter: model has no diffusion_model; returning unchanged model."
MSG_AUTO_FAILED = ("INT8 Model Adapter: auto model_type could not identify this model; using conservative "
                   "union exclusions.")
MSG_NOT_CONVERTED = ("INT8 Model Adapter: This MODEL output is not INT8-converted; later dtype/runtime errors are "
                     "likely outside the INT8 forward path.")
_CACHED_REASON = "from cache"


@dataclass
class AdapterReport:
    """What one adapter run did: converted layers (``cached`` of them reused), kept layers with reasons, bytes."""

    format: str
    preset: str | None = None
    converted: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    baked_loras: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)  # converted layers that apply the activation before them
    fused: list[str] = field(default_factory=list)  # sibling projection groups sharing one GEMM ("attn: q,k,v")
    modulated: list[str] = field(default_factory=list)  # DiT blocks whose modulated norms their layers apply
    bytes_before: int = 0
    bytes_after: int = 0
    messages: list[str] = field(default_factory=list)
    auto: Any = None  # format auto: the plan (autoprec.AutoPlan)
    formats: dict[str, int] = field(default_factory=dict)  # layout name -> converted layers
    smoothed: list[str] = field(default_factory=list)  # smoothquant: converted layers carrying a pre_quant_scale
    smoothing: Smoothing | None = None

    def lines(self) -> list[str]:
        """The node's text output: the messages, then (when converted) the summary and the auto plan."""
        if not self.converted:
            return list(self.messages)
        plan = self.auto.to_text().splitlines() if self.auto is not None else []
        return [*self.messages, self.summary(), *plan]

    def summary(self) -> str:
        """The one log line: layers converted, kept, bytes saved."""
        saved = self.bytes_before - self.bytes_after
        preset = f", preset {self.preset}" if self.preset else ""
        lora = f", {len(self.baked_loras)} LoRA-patched weights baked in" if self.baked_loras else ""
        mix = f" ({', '.join(f'{n} {f}' for f, n in sorted(self.formats.items()))})" if self.auto else ""
        smooth = ""
        if self.smoothing is not None:
            plain = len(self.converted) - len(self.smoothed)
            smooth = (f", smoothquant (alpha {self.smoothing.alpha:g}, {self.smoothing.path.name}) on "
                      f"{len(self.smoothed)} layers" + (f" ({plain} without statistics: unsmoothed)" if plain else ""))
        folded = f", {len(self.folded)} activations folded into their layer" if self.folded else ""
        fused = f", {len(self.fused)} projection groups fused into one GEMM each" if self.fused else ""
        if self.modulated:
            fused += f", {len(self.modulated)} blocks' modulated norms folded into their layers"
        return (f"comfyquant: {self.format}{mix}{preset}: {len(self.converted)} layers converted "
                f"({len(self.cached)} from cache), {len(self.kept)} kept, {saved / 2**20:.1f} MiB saved "
                f"({self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB){smooth}{lora}{folded}"
                f"{fused}")


def _note(report: AdapterReport, message: str) -> None:
    report.messages.append(message)
    logger.warning(message)


class _Shell(nn.Module):
    """Mirrors the diffusion model's module names for ``quantize_``: holds ``nn.Linear`` views of the source
    weights and reports the whole model's parameter shapes (meta tensors) for preset detection."""

    def __init__(self, shapes: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._shapes = shapes

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._shapes)

    def insert(self, name: str, module: nn.Module) -> None:
        parent: nn.Module = self
        *path, leaf = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, module)


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _source_weight(patcher: Any, key: str, live: torch.Tensor) -> torch.Tensor:
    """The unpatched float weight: ComfyUI's backup when a LoRA is patched into the live tensor."""
    for table in (patcher.backup, patcher.hook_backup):
        entry = table.get(key)
        if entry is not None:
            w = entry[0]
            if type(w) in (torch.Tensor, nn.Parameter) and w.shape == live.shape:
                return w
    return live


def _already_quantized(mod: nn.Module) -> str | None:
    if isinstance(mod, QuantLinear):
        return f"already quantized ({mod.qweight.layout_name if mod.weight is not None else 'empty'})"
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter):
        fmt = getattr(mod, "quant_format", None) or type(w).__name__
        return f"already quantized by ComfyUI ({fmt})"
    return None


def _collect(patcher: Any, dm: nn.Module, report: AdapterReport, prefix: str,
             within: str = "") -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """(meta shapes of every parameter, eligible linear layers by name) with object patches respected; only
    under the submodule ``within`` when it is given."""
    shapes: dict[str, torch.Tensor] = {}
    linears: dict[str, nn.Module] = {}
    for name, live in dm.named_modules():
        if not name or live._modules or (within and not name.startswith(within + ".")):
            continue
        mod = patcher.get_model_object(prefix + name)
        for pname, p in mod.named_parameters(recurse=False):
            if p is not None:
                shapes[f"{name}.{pname}"] = torch.empty(p.shape, dtype=p.dtype, device="meta")
        if is_plain_linear(mod):
            linears[name] = mod
            continue
        why = _already_quantized(mod)
        if why is not None:
            report.kept.append((name, why))
    return shapes, linears


class _Selector:
    """``QuantizeConfig.filter_fn``: serves memo hits, bakes LoRA patches and moves one weight at a time to the
    compute device, moves each finished layer to the store device (so at most one float and one quantized
    layer sit on the compute device), and ticks the progress bar. With ``smoothing`` it hands ``quantize_`` the
    smoothed weight ``W diag(s)`` and keeps ``p = 1/s`` in ``pre`` for the quantized layer."""

    def __init__(self, shell: _Shell, sources: dict[str, torch.Tensor], cache_keys: dict[str, Any],
                 bake: dict[str, list], cache: QuantCache, device: torch.device, store: torch.device,
                 tick: Callable[[], None], smoothing: Smoothing | None, prefix: str) -> None:
        self.shell, self.sources, self.cache_keys, self.bake = shell, sources, cache_keys, bake
        self.prefix = prefix
        self.cache, self.device, self.store, self.tick = cache, device, store, tick
        self.smoothing = smoothing
        self.hits: dict[str, QuantizedTensor] = {}
        self.pre: dict[str, torch.Tensor] = {}
        self._last: str | None = None

    def flush(self) -> None:
        """Move the layer quantized last (now a QuantLinear in the shell) to the store device."""
        if self._last is not None:
            mod = self.shell.get_submodule(self._last)
            if isinstance(mod, QuantLinear) and mod.qweight.device != self.store:
                mod.weight = nn.Parameter(mod.qweight.to(self.store), requires_grad=False)
            self._last = None

    def __call__(self, name: str, linear: nn.Linear) -> bool:
        import comfy.lora

        self.flush()
        self.tick()
        key = self.cache_keys.get(name)
        if key is not None:
            hit = self.cache.get(self.sources[name], key)
            if hit is not None:
                self.hits[name] = hit
                return False
        w = linear.weight.detach()
        if name in self.bake:  # merge the LoRA in float32 on the compute device, then quantize once
            w = comfy.lora.calculate_weight(self.bake[name], w.to(self.device, torch.float32, copy=True),
                                            self.prefix + name + ".weight").to(w.dtype)
        if w.device != self.device:
            w = w.to(self.device)
        p = None if self.smoothing is None else self.smoothing.pre_quant_scale(name, w)
        if p is not None:
            w = (w.float() / p[None, :]).to(w.dtype)  # W diag(s), s = 1/p
            self.pre[name] = p
        linear.weight = nn.Parameter(w, requires_grad=False)
        self._last = name
        return True


def _lora_patches(patcher: Any, key: str) -> list | None:
    patches = patcher.patches.get(key)
    return list(patches) if patches else None


def _fold_gated(clone: Any, dm: nn.Module, new_layers: dict[str, QuantizedTensor], linears: dict[str, nn.Module],
                folds: dict[str, Any], prefix: str, report: AdapterReport) -> dict[str, tuple[SiblingGroup, int]]:
    """Gated MLPs whose three layers converted (``runtime.gated``): the module's forward, patched through
    ``folds`` (keyed by its down projection, which gets the gated activation), runs the input projections as one
    GEMM; returns ``layer name -> (group, index)`` for those. A module whose forward another node patched
    already, or that is itself replaced on the clone, is left alone."""
    def target(path: str, mod: nn.Module) -> bool:
        return path in new_layers and path not in folds

    members: dict[str, tuple[SiblingGroup, int]] = {}
    for path, names, act in gated_mlps(dm, target):
        if not path:  # (the converted tree's root itself is never a module to patch)
            continue
        parent = dm.get_submodule(path)
        if f"{prefix}{path}.forward" in clone.object_patches or clone.get_model_object(prefix + path) is not parent:
            continue
        first, second, down = (f"{path}.{n}" for n in names)
        if not inputs_fuse(new_layers[first], new_layers[second], new_layers[down],
                           (linears[first].bias is not None, linears[second].bias is not None)):  # type: ignore[union-attr]
            continue
        group, forward = gated_group(parent, names)
        members.update({first: (group, 0), second: (group, 1)})
        folds[down] = (f"{path}.forward", forward, act)
        report.fused.append(f"{path}: {names[0]},{names[1]}")
    return members


def _fuse_projections(clone: Any, dm: nn.Module, new_layers: dict[str, QuantizedTensor], folds: dict[str, Any],
                      prefix: str, max_bytes: int, report: AdapterReport,
                      taken: dict[str, Any]) -> dict[str, tuple[SiblingGroup, int]]:
    """Sibling projections among the converted layers (``runtime.siblings``) not ``taken`` by a gated fold: one
    group per set, the parent's ``forward`` object-patched to arm its groups; returns ``layer name -> (group,
    index)`` for the layers. A parent whose forward another node or a fold patched already, or that is itself
    replaced on the clone, is left alone."""
    def target(path: str, mod: nn.Module) -> bool:
        return path in new_layers and path not in folds and path not in taken  # a folded layer applies an act first

    by_parent: dict[str, list[tuple[str, ...]]] = {}
    for path, names in sibling_groups(dm, target, lambda path, mod: new_layers[path]):
        if path:  # (the converted tree's root itself is never a parent to patch)
            by_parent.setdefault(path, []).append(names)
    members: dict[str, tuple[SiblingGroup, int]] = {}
    patched = {patch_path for patch_path, _, _ in folds.values()}
    for path, groups in by_parent.items():
        parent = dm.get_submodule(path)
        key = f"{prefix}{path}.forward"
        if key in clone.object_patches or f"{path}.forward" in patched \
                or clone.get_model_object(prefix + path) is not parent:
            continue
        made = []
        for names in groups:
            group = SiblingGroup(parent, names, max_bytes)
            members.update({f"{path}.{name}": (group, i) for i, name in enumerate(names)})
            made.append(group)
            report.fused.append(f"{path}: {','.join(names)}")
        clone.add_object_patch(key, ArmedForward(parent, *made))
    return members


def _projection_only(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A projection module's forward without its activation: ``mod.proj`` read at call time (the converted layer
    while the clone's patches are applied, the float one otherwise)."""
    return lambda x: mod._modules["proj"](x)  # (by key: nn.Module.__getattr__ costs a lookup chain per call)


def adapt_model(patcher: Any, settings: AdapterSettings, *, progress: Any = None,
                cache: QuantCache = CACHE, root: str = MODEL_ROOT, within: str = "") -> tuple[Any, AdapterReport]:
    """Return (patched clone or the unchanged input, report). ``progress`` is a ComfyUI ``ProgressBar``-like
    object (``update_absolute(value, total)``) or None. ``root``: the attribute of ``patcher.model`` whose
    linears convert (a MODEL's ``diffusion_model``; ``""`` for a CLIP's patcher, whose model is the text
    encoder stack itself, keys like ``t5xxl.transformer.encoder...``); ``within``: only the layers under this
    submodule of it (one text encoder of a CLIP's stack: the preset is detected from its layers alone)."""
    import comfy.model_management

    fmt = settings.quant_format()
    report = AdapterReport(fmt)
    prefix = f"{root}." if root else ""
    dm = getattr(patcher.model, root, None) if root else patcher.model
    if not isinstance(dm, nn.Module):
        _note(report, MSG_NO_DIFFUSION if root == MODEL_ROOT else f"INT8 adapter: model has no {root}; "
              "returning it unchanged.")
        return patcher, report
    auto = fmt == AUTO
    load_dev = torch.device(patcher.load_device)
    backend = None if auto else settings.runtime.backend_for(layout_for(QuantizeConfig(format=fmt))[0].kernel_kind)
    # Put the shared model back to its unpatched state (other clones may have LoRAs or our layers patched in).
    comfy.model_management.unload_model_and_clones(patcher)
    shapes, linears = _collect(patcher, dm, report, prefix, within)
    smoothing = None
    if settings.outlier_method == "smoothquant":  # read (and check) the statistics before anything is built
        smoothing = open_smoothing(resolve_calibration_path(settings.calibration_file),
                                   {n: tuple(m.weight.shape) for n, m in linears.items()}, settings.alpha)
        report.smoothing = smoothing
    sources: dict[str, torch.Tensor] = {}
    cache_keys: dict[str, Any] = {}
    bake: dict[str, list] = {}
    shell = _Shell(shapes)
    for name, mod in linears.items():
        key = f"{prefix}{name}.weight"
        w = _source_weight(patcher, key, mod.weight)
        patches = _lora_patches(patcher, key) if settings.bake_loaded_loras else None
        if patches:
            bake[name] = patches
            report.baked_loras.append(key)
        else:
            sources[name] = w
            cache_keys[name] = (fmt, settings.model_type)
            if smoothing is not None and name in smoothing.act_absmax:
                cache_keys[name] += smoothing.cache_key()
        shell.insert(name, _view_linear(w.detach(), None))
    total = max(1, len(linears))
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress.update_absolute(min(done[0], total), total)

    device = load_dev if load_dev.type == "cuda" else torch.device("cpu")
    store = torch.device(patcher.offload_device)
    selector = _Selector(shell, sources, cache_keys, bake, cache, device, store, tick, smoothing, prefix)
    if auto:
        config = _auto_config(shell, settings, cache_keys, selector, report,
                              plan_target_gpu(settings.target_gpu, load_dev))
    else:
        config = QuantizeConfig(format=fmt, model=settings.model_type, backend=backend, filter_fn=selector)
    summary = quantize_(shell, config)
    selector.flush()
    if progress is not None:
        progress.update_absolute(total, total)
    report.preset = summary.preset
    if settings.model_type == "auto" and summary.preset == "generic":
        _note(report, MSG_AUTO_FAILED)
    new_layers: dict[str, QuantizedTensor] = {}
    for d in summary.layers:
        if d.action == "quantized":
            qt = shell.get_submodule(d.name).qweight.to(store)
            if d.name in selector.pre:  # the stored weight is W diag(s); the layer scales its input by 1/s
                qt = qt.with_parts(params=qt.params.replace(pre_quant_scale=selector.pre[d.name].to(store)))
            if d.name in cache_keys:
                cache.put(sources[d.name], cache_keys[d.name], qt.with_parts(params=qt.params.replace(backend=None)))
            new_layers[d.name] = _with_backend(qt, settings) if auto else qt
        elif d.name in selector.hits:
            qt = selector.hits[d.name]
            new_layers[d.name] = _with_backend(qt, settings) if auto else qt.with_parts(
                params=qt.params.replace(backend=backend))
            report.cached.append(d.name)
        else:
            report.kept.append((d.name, d.reason))
            if settings.log_progress:
                logger.info("comfyquant: kept %s %s: %s", d.name, list(d.shape), d.reason)
    if not new_layers:
        _note(report, MSG_NOT_CONVERTED)
        return patcher, report
    clone = patcher.clone()
    folds: dict[str, tuple[str, Any, str]] = {}
    if settings.runtime.fold_activations:  # activation modules before a converted layer: applied by its kernel
        def targets(path: str, mod: nn.Module) -> bool:
            return path in new_layers

        folds = {layer: (path, nn.Identity(), act) for path, layer, act in foldable_pairs(dm, targets)}
        # a projection module (GEGLU, GELU_approx) keeps itself and its converted proj; only its forward is patched,
        # to the projection alone (patching the module itself and its proj child both would restore them out of order)
        folds.update({layer: (f"{path}.forward", _projection_only(dm.get_submodule(path)), act)
                      for path, layer, act in foldable_projections(dm, targets)})
    norms: dict[str, NormSource] = {}
    if settings.runtime.fold_activations and settings.runtime.fold_norms:  # norms before converted layers
        # (runtime.norms): applied in their quantizer
        def norm_fits(path: str, mod: nn.Module | None, spec: NormSpec) -> bool:
            return (path in new_layers and path not in folds and (settings.runtime.fold_layer_norms or not spec.layer)
                    and weight_folds_norm(new_layers[path], spec.layer))

        for path, norm_name, consumer_name, names, spec in foldable_norms(dm, norm_fits):
            norm_path = f"{path}.{norm_name}" if path else norm_name
            holder = FoldedNorm(dm.get_submodule(norm_path), spec)  # the norm's own Parameters, same keys
            clone.add_object_patch(prefix + norm_path, holder)
            base = f"{path}.{consumer_name}" if path else consumer_name
            source = holder.source()  # one per norm: a sibling group fuses members that share it
            norms.update({f"{base}.{n}": source for n in names})
            report.folded.append(f"{norm_path} -> {consumer_name}.{','.join(names)}")
        if root == MODEL_ROOT and settings.runtime.fold_layer_norms:  # SD1.x / SDXL blocks' LayerNorms (their
            # forward unfolds under patches)
            lines, sources = fold_unet_blocks(dm, lambda path, spec: norm_fits(path, None, spec),
                                              lambda path, obj: clone.add_object_patch(prefix + path, obj),
                                              lambda path: prefix + path in clone.object_patches)
            report.folded += lines
            norms.update(sources)
    siblings: dict[str, tuple[SiblingGroup, int]] = {}
    if settings.runtime.fold_activations and settings.runtime.fuse_projections:  # gated MLPs: act(first) * second
        siblings = _fold_gated(clone, dm, new_layers, linears, folds, prefix, report)  # applied by the down proj
    if settings.runtime.fuse_projections:  # q/k/v-style siblings on one input: one GEMM per call
        siblings.update(_fuse_projections(clone, dm, new_layers, folds, prefix, settings.runtime.fuse_max_bytes,
                                          report, siblings))
    for name, qt in new_layers.items():
        src = linears[name]
        layer = ComfyQuantLinear.wrap(qt, src.bias)
        layer.sibling = siblings.get(name)
        layer.input_norm = norms.get(name)
        if name in folds:
            patch_path, patch, layer.input_act = folds[name]
            clone.add_object_patch(prefix + patch_path, patch)
            report.folded.append(f"{name}: {layer.input_act}")
        clone.add_object_patch(prefix + name, layer)
        report.converted.append(name)
        report.bytes_before += src.weight.nbytes
        report.bytes_after += qt.nbytes
        report.formats[qt.layout_name] = report.formats.get(qt.layout_name, 0) + 1
        if getattr(qt.params, "pre_quant_scale", None) is not None:
            report.smoothed.append(name)
        if settings.log_progress:
            logger.info("comfyquant: converted %s %s -> %s", name, list(qt.shape), qt.layout_name)
        key = f"{prefix}{name}.weight"
        if key in report.baked_loras:
            clone.patches.pop(key, None)
    report.baked_loras = [k for k in report.baked_loras if k[len(prefix):-len(".weight")] in new_layers]
    if root == MODEL_ROOT and settings.runtime.fold_activations and settings.runtime.fold_norms:
        # DiT blocks' modulated LayerNorms: applied by the quantized layers they feed (block replacements, clone)
        report.modulated = fold_dit_blocks(clone, dm, new_layers.__contains__,
                                           lambda path, obj: clone.add_object_patch(prefix + path, obj),
                                           lambda path: prefix + path in clone.object_patches,
                                           settings.runtime.fuse_rope)
    clone.patches_uuid = uuid.uuid4()  # the clone's weights differ from its parent's
    clone.size = max(0, patcher.model_size() - (report.bytes_before - report.bytes_after))
    clone.model_options.setdefault("transformer_options", {})["comfyquant"] = settings
    register_patch_callback(clone)
    if settings.runtime.cuda_graphs and root == MODEL_ROOT:  # graphs wrap a diffusion model's apply_model
        enable_cuda_graphs(clone)
    mode = settings.runtime.attention
    if root == MODEL_ROOT and enable_quantized_attention(clone, mode) is not None:
        logger.info("comfyquant: attention %s: %s", mode, ATTENTION_DESCRIPTIONS[mode])
    logger.info(report.summary())
    if load_dev.type == "cuda" and report.converted:
        logger.info("comfyquant: kernels on %s", describe_device(load_dev))
    if report.auto is not None:
        logger.info(report.auto.to_text())
    return clone, report


def plan_target_gpu(setting: str, device: torch.device) -> str | None:
    """The GPU generation format auto plans for: the setting, or for ``auto`` the load device's generation
    (None on the CPU: formats that need a particular GPU, nvfp4 / mxfp8 on Blackwell, are then left out)."""
    if setting != AUTO:
        return setting
    cap = device_capability(device)
    return None if cap is None else gpu_generation(cap)


def _auto_config(shell: _Shell, settings: AdapterSettings, cache_keys: dict[str, Any], selector: _Selector,
                 report: AdapterReport, target_gpu: str | None) -> QuantizeConfig:
    """Plan the formats for the budget (reads each source weight once), point the memo at each layer's chosen
    format, and return the single-pass ``quantize_`` config with the plan's ``layer_formats``."""
    plan = plan_auto(shell, QuantizeConfig(format=AUTO, budget=settings.budget, target_gpu=target_gpu))
    report.auto = plan
    formats = plan.formats()
    for name in list(cache_keys):
        chosen = formats.get(name)
        if chosen is None or chosen == KEEP:
            del cache_keys[name]
        else:
            cache_keys[name] = (chosen, AUTO)  # one memo entry per source weight and chosen format
    return QuantizeConfig(format=AUTO, layer_formats=formats, filter_fn=selector)


def _with_backend(qt: QuantizedTensor, settings: AdapterSettings) -> QuantizedTensor:
    """``qt`` with the backend the runtime options choose for its own format's kernel kind (format auto mixes
    kinds in one model)."""
    return qt.with_parts(params=qt.params.replace(backend=settings.runtime.backend_for(qt.layout_cls.kernel_kind)))
