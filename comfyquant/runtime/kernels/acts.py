"""Input activations a quantized linear can apply to its input itself (``QuantLinear.input_act``).

A model's ``GELU(tanh) -> Linear`` or ``SiLU -> Linear`` pair costs a separate elementwise kernel that reads
and writes the whole activation; the W8A8 / W8A16 / FP8 kernels can apply it while they read x instead (the
GEMM's quantizer or A-tile load). Every backend that does not fuse it gets ``apply_input_act(x)`` first, in
x's dtype, exactly as the model computed it.

Gated activations (:data:`GATED`) halve the width: ``swiglu`` is ``silu(x[..., :K]) * x[..., K:]`` on a
``[..., 2K]`` input (Flux.2's MLP: ``Linear(d, 2h), SiLUActivation(), Linear(h, d)``; Llama-style MLPs,
``runtime.gated``), ``geglu`` is ``x[..., :K] * gelu(x[..., K:])`` (SD1.x / SDXL feed-forwards: ``GEGLU``
projects and gates in one module, :func:`projected_act_of_module`), ``gated_gelu_tanh`` is
``gelu_tanh(x[..., :K]) * x[..., K:]`` (T5 v1.1's ``T5DenseGatedActDense``, Gemma-style MLPs:
``runtime.gated``); only the activation quantizers fuse those (they read both halves of each row).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

# name -> the code the Triton kernels take as a constexpr (0: none)
INPUT_ACTS: dict[str, int] = {"gelu_tanh": 1, "gelu": 2, "silu": 3, "swiglu": 4, "geglu": 5, "gated_gelu_tanh": 6}
GATED = frozenset({"swiglu", "geglu", "gated_gelu_tanh"})  # input [..., 2K] -> [..., K]
SWIGLU, GEGLU, GATED_GELU_TANH = INPUT_ACTS["swiglu"], INPUT_ACTS["geglu"], INPUT_ACTS["gated_gelu_tanh"]
GATED_CODES = frozenset(INPUT_ACTS[n] for n in GATED)


def act_code(name: str | None) -> int:
    """The kernels' constexpr code of ``name`` (0 for None); ValueError for an unknown name."""
    if name is None:
        return 0
    code = INPUT_ACTS.get(name)
    if code is None:
        raise ValueError(f"unknown input activation {name!r}; expected one of {sorted(INPUT_ACTS)}")
    return code


def apply_input_act(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """``name``'s activation of ``x`` in x's dtype (as ``nn.GELU`` / ``nn.SiLU`` compute it); x for None."""
    if name is None:
        return x
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    if name == "geglu":
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)
    if name == "gated_gelu_tanh":
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown input activation {name!r}; expected one of {sorted(INPUT_ACTS)}")


class RowNorm(NamedTuple):
    """An RMSNorm ``x * rsqrt(mean(x²) + eps) * weight`` (``weight`` None: without one) that the unrotated
    int8 / fp8 activation quantizers apply as they read x (``act_kernels.quantize_rows``): per-row codes do not
    see the norm's per-row factor, so the codes are those of ``x * weight`` and the factor goes into the row
    scale. The weight is read as stored, in fp32 (a model's ``weight.to(x.dtype) * x`` rounds an fp32 weight to
    a 16-bit x's dtype first). ``rms`` False: the per-column scale ``x * weight`` alone (a SmoothQuant layer's
    ``pre_quant_scale``), no row factor."""

    weight: torch.Tensor | None
    eps: float
    rms: bool = True


# rows up to this (padded) length the quantizers hold in registers (one read of x; ``triton_quant`` launches so):
# the widest row a modulated or shared-row norm folds into them
SINGLE_PASS_MAX = 8192
MODULATED_MAX_K = SINGLE_PASS_MAX


class ModulatedNorm(NamedTuple):
    """A modulated LayerNorm ``layer_norm(x, eps) * (1 + scale[g]) + shift[g]`` (DiT blocks: Flux's ``apply_mod``
    of its affine-free norms), ``g`` the row's group of ``rows`` consecutive rows (a batch item's tokens).
    ``mod`` is ``[G, 2K]``, contiguous: each group's shift, then its scale. The shift makes it no row factor, so
    it folds only where a quantizer holds a whole row in registers (``act_kernels.quantize_rows`` in one pass:
    mean, variance, then the modulated values, before their absmax); a kernel reads ``mod`` by pointer, so
    callers keep it in one buffer they refill per call (``runtime.modulation``) and a plan stays valid.

    ``rows`` 0: one ``[1, 2K]`` row that every row reads, i.e. an affine LayerNorm (``layer_norm(x, weight, bias)``
    before CLIP's / SDXL's attention and MLP) as ``shift = bias``, ``scale = weight - 1``, kept in fp32 so that
    ``1 + scale`` is the weight again exactly (:func:`shared_layer_norm`).

    ``rms``: ``rms_norm(x, eps)`` in place of the LayerNorm (a modulated RMSNorm: Z-Image's / Lumina 2's
    ``rms_norm(x) * w * (1 + scale[g])`` is ``scale = w * (1 + scale[g]) - 1`` and no shift)."""

    mod: torch.Tensor
    eps: float
    rows: int
    rms: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The tensor a kernel reads beside x (:func:`norm_args`)."""
        return self.mod


Norm = RowNorm | ModulatedNorm  # what the quantizers' ``norm=`` takes

# The kernels' rows per group for a shared modulation (``ModulatedNorm.rows`` 0): every row index is below it, so
# every row reads group 0.
SHARED_ROWS = 1 << 30


def shared_layer_norm(weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float,
                      device: torch.device | None = None) -> ModulatedNorm:
    """An affine LayerNorm over ``k`` columns as the shared :class:`ModulatedNorm` the quantizers fold: one fp32
    ``[1, 2K]`` row ``[bias, weight - 1]`` (a missing weight is ones, a missing bias zeros)."""
    dev = weight.device if weight is not None else bias.device if bias is not None else device
    mod = torch.zeros((1, 2 * k), dtype=torch.float32, device=dev)
    if bias is not None:
        mod[0, :k] = bias.detach().float()
    if weight is not None:
        torch.sub(weight.detach().float(), 1.0, out=mod[0, k:])
    return ModulatedNorm(mod, float(eps), 0)


def norm_code(norm: Norm | None) -> int:
    """The kernels' ``NORM`` constexpr: 0 none, 1 an RMSNorm without a weight, 2 with one, 3 the column scale
    alone, 4 a modulated LayerNorm, 5 a modulated RMSNorm (:class:`ModulatedNorm`)."""
    if norm is None:
        return 0
    if isinstance(norm, ModulatedNorm):
        return 5 if norm.rms else 4
    if not norm.rms:
        if norm.weight is None:
            raise ValueError("a column scale without its vector")
        return 3
    return 1 if norm.weight is None else 2


def norm_args(norm: Norm | None, dummy: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(the weight pointer's tensor, eps, ``NORM``) a kernel launch takes; ``dummy`` where nothing is read."""
    if norm is None:
        return dummy, 0.0, 0
    return (dummy if norm.weight is None else norm.weight), float(norm.eps), norm_code(norm)


def norm_rows(norm: Norm | None) -> int:
    """Rows per modulation group a kernel launch takes beside :func:`norm_args` (1 where there is none)."""
    if isinstance(norm, ModulatedNorm):
        return norm.rows if norm.rows > 0 else SHARED_ROWS
    return 1


def norm_key(norm: Norm | None) -> tuple | None:
    """What identifies ``norm`` for a memo of kernel launches: the tensor a kernel reads by object and storage (a
    plan holds its pointer; a ``.data`` swap or a move makes another key), eps and the kind."""
    if norm is None:
        return None
    w = norm.weight
    head = (id(w), 0 if w is None else w.data_ptr(), norm.eps)
    if isinstance(norm, ModulatedNorm):
        return (*head, "mod", norm.rows, norm.mod.shape, norm.rms)
    return (*head, norm.rms)


def norm_fits(norm: Norm, x: torch.Tensor) -> bool:
    """Whether a quantizer may read ``norm``'s tensor for ``x [..., K]``: on x's device, floating point,
    contiguous, and a ``[K]`` vector (RMSNorm weight, column scale) or ``[M / rows, 2K]`` (a modulation)."""
    w = norm.weight
    if w is None:
        return True
    if w.device != x.device or not w.is_contiguous() or not w.is_floating_point():
        return False
    k = x.shape[-1]
    if isinstance(norm, ModulatedNorm):
        if norm.rows == 0:  # one row for all
            return tuple(w.shape) == (1, 2 * k)
        m = x.numel() // k if k else 0
        return norm.rows > 0 and m % norm.rows == 0 and tuple(w.shape) == (m // norm.rows, 2 * k)
    return w.dim() == 1 and w.numel() == k


def layer_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` as a DiT block computes it in torch, in x's dtype (ComfyUI's Flux:
    ``apply_mod(norm(x), 1 + scale, shift)``, i.e. ``addcmul``): shift and scale broadcast against x."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def rms_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``norm`` applied to ``x`` in torch, in x's dtype (what the paths that do not fold it compute): the RMSNorm,
    or (``rms`` False) ``x * weight``, or the modulated LayerNorm / RMSNorm."""
    if isinstance(norm, ModulatedNorm):
        k = x.shape[-1]
        if norm.rows == 0:  # an affine LayerNorm: the module's own call (its weight is 1 + scale exactly)
            mod = norm.mod.to(device=x.device)
            return F.layer_norm(x, (k,), (1 + mod[0, k:]).to(x.dtype), mod[0, :k].to(x.dtype), norm.eps)
        x3 = x.reshape(norm.mod.shape[0], -1, k)
        if norm.rms:  # (1 + scale) from the buffer's own precision: an fp32 one holds w * (1 + scale) - 1 exactly
            mod = norm.mod.to(device=x.device)
            return torch.addcmul(mod[:, None, :k].to(x.dtype), F.rms_norm(x3, (k,), eps=norm.eps),
                                 (1 + mod[:, None, k:]).to(x.dtype)).view(x.shape)
        mod = norm.mod.to(device=x.device, dtype=x.dtype)
        return layer_mod(x3, mod[:, None, :k], mod[:, None, k:], norm.eps).view(x.shape)
    w = None if norm.weight is None else norm.weight.to(device=x.device, dtype=x.dtype)
    if not norm.rms:
        return x * w
    return F.rms_norm(x, (x.shape[-1],), w, norm.eps)


# classes of parameterless SwiGLU modules (ComfyUI's comfy.ldm.flux.layers.SiLUActivation: Flux.2's MLP)
SWIGLU_CLASS_NAMES = frozenset({"SiLUActivation"})


def act_of_module(mod: torch.nn.Module) -> str | None:
    """The input activation name of an activation module (``nn.GELU`` either approximation, ``nn.SiLU``, a
    SwiGLU module of :data:`SWIGLU_CLASS_NAMES` whose output on a probe is ``silu(first half) * second half``),
    or None for any other module (including subclasses of the torch ones, whose forward may differ)."""
    if type(mod) is torch.nn.GELU:
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    if type(mod) is torch.nn.SiLU:
        return "silu"
    if type(mod).__name__ in SWIGLU_CLASS_NAMES and _computes_swiglu(mod):
        return "swiglu"
    return None


def _computes_swiglu(mod: torch.nn.Module) -> bool:
    """Whether a module without parameters or buffers maps the probe exactly as ``apply_input_act(x, "swiglu")``."""
    if _has_state(mod, recurse=True):
        return False
    y = _probe(mod)
    return y is not None and torch.equal(y, apply_input_act(_PROBE, "swiglu"))


# classes of projections whose forward is ``act(self.proj(x))``: ComfyUI's GEGLU (SD1.x / SDXL), GELU_approx
# (LTXV) and GELU (Qwen-Image, Hunyuan3D: ``approximate`` an attribute)
PROJECTION_CLASS_NAMES = frozenset({"GEGLU", "GELU_approx", "GELU"})
_PROJECTED = ("geglu", "gelu_tanh", "gelu", "silu")


def projected_act_of_module(mod: torch.nn.Module) -> str | None:
    """The activation a projection module applies after its ``proj`` child (``"geglu"``, ``"gelu_tanh"``, ...),
    or None: a module of :data:`PROJECTION_CLASS_NAMES` with ``proj`` as its only child and no parameters of its
    own, whose forward, run on the probe with ``proj`` standing for the identity (on a stand-in holding the
    module's plain attributes: the module itself is not touched), returns exactly one of those activations."""
    if type(mod).__name__ not in PROJECTION_CLASS_NAMES or [n for n, _ in mod.named_children()] != ["proj"]:
        return None
    if _has_state(mod, recurse=False):
        return None
    plain = {k: v for k, v in vars(mod).items() if not k.startswith("_")}
    y = _probe(partial(type(mod).forward, SimpleNamespace(**plain, proj=torch.nn.Identity())))
    if y is None:
        return None
    return next((a for a in _PROJECTED if y.shape == apply_input_act(_PROBE, a).shape
                 and torch.equal(y, apply_input_act(_PROBE, a))), None)


_PROBE = torch.linspace(-4.0, 4.0, 24).reshape(3, 8)  # what a candidate module is run on (never modified)


def _has_state(mod: torch.nn.Module, recurse: bool) -> bool:
    return any(True for _ in mod.named_parameters(recurse=recurse)) or any(
        True for _ in mod.named_buffers(recurse=recurse))


def _probe(fn: Callable[[torch.Tensor], object]) -> torch.Tensor | None:
    """``fn(probe)`` when it returns a tensor; None when it raises an error an unsuitable module raises (it needs
    other inputs or attributes: not foldable) or returns something else."""
    with torch.no_grad():
        try:
            y = fn(_PROBE)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return None
    return y if isinstance(y, torch.Tensor) else None
