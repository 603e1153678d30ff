"""The kernel-kind table: every quantized-linear format's kernels, keyed by kind name, one generic call path.

A *kernel kind* (``"int8"``, ``"fp8"``, ``"int4_rot"``, ...) names a weight storage convention and the backends
that compute ``x @ dequant(w)^T + bias`` for it. Each backend is an ``impl(x, w, scales, bias, opts, out_dtype)``
where ``scales`` is a tuple of optional tensors and ``opts`` a tuple of ints (both static per layer, their
meaning fixed by the kind). A format registers its kind once (``register_kernel_kind``) and then runs through
``dispatch.quant_linear`` eagerly and through the one ``comfyquant::quant_linear`` custom op under
torch.compile, with no other edit. The first backend of a kind is its reference (runs anywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from comfyquant.runtime.kernels.backends import BackendChoice, device_capability


class Impl(Protocol):
    """One backend's implementation: returns a fresh ``[..., N]`` tensor of ``out_dtype``."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scales: tuple[torch.Tensor | None, ...],
                 bias: torch.Tensor | None, opts: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor: ...


def runs_anywhere(device: torch.device) -> str | None:
    """Availability predicate of a backend with no device requirement (the reference)."""
    return None


def needs_cuda(min_cc: tuple[int, int] = (8, 0), *, triton: bool = False) -> Callable[[torch.device], str | None]:
    """Availability predicate: a CUDA device of compute capability >= ``min_cc`` (and the triton package)."""

    def check(device: torch.device) -> str | None:
        from comfyquant.runtime.kernels.backends import triton_available

        cap = device_capability(device)
        if cap is None:
            return f"needs a CUDA device, got {device.type}"
        if triton and not triton_available():
            return "needs the triton package, which is not installed"
        if cap < min_cc:
            return f"needs compute capability >= {min_cc[0]}.{min_cc[1]}, got {cap[0]}.{cap[1]}"
        return None

    return check


@dataclass(frozen=True)
class KernelBackend:
    """A backend: its implementation and a predicate saying why it cannot run on a device (None: it can).

    ``fuses_low_rank``: ``impl`` also takes ``low_rank=(down [R, K], up [R, N], r)`` (x's dtype, R a multiple of
    16, rows past ``r`` zero) and adds ``(x @ down^T) @ up`` in its GEMM epilogue (dynamic LoRAs at the cost
    of one small extra GEMM, instead of a second pass over the output). ``fuses_input_act``: ``impl`` also takes
    ``act=CODE`` (``acts.INPUT_ACTS``) and applies that activation to x as it reads it (no separate pass);
    ``fuses_gated_act``: the gated ones too (``acts.GATED``: x holds 2K columns, both halves).
    ``plan(x, w, scales, bias, opts, out_dtype, act)``: an eager fast path ``x -> y`` for inputs of ``x``'s
    signature and layout, made after a first call compiled the kernels, or None (see ``triton_plans``).
    ``fuses_norm(scales, opts)``: whether ``impl`` and ``plan`` take ``norm=acts.RowNorm`` for this weight and
    apply that RMSNorm to x in their quantizer (None: never; the caller applies it first).
    ``fuses_mod(scales, opts, m, n, k)``: the same for ``norm=acts.ModulatedNorm`` on ``[m, k]`` rows of this
    ``[n, k]`` weight (a modulated LayerNorm needs a quantizer that holds whole rows).
    ``plan_takes_any``: its plans are plain torch ops that take any x of the planned signature, in any layout, on
    any stream and inside a capture, so a bound call replays them without checking x (the dense copy's).
    ``timed``: measured dispatch times it among the candidates; False: pinned only (by name), never timed, for a
    kernel no GPU has checked yet."""

    impl: Impl
    requires: Callable[[torch.device], str | None] = runs_anywhere
    fuses_low_rank: bool = False
    fuses_input_act: bool = False
    plan: Callable[..., Callable[[torch.Tensor], torch.Tensor] | None] | None = None
    fuses_gated_act: bool = False
    fuses_norm: Callable[[tuple, tuple], bool] | None = None
    fuses_mod: Callable[[tuple, tuple, int, int, int], bool] | None = None
    plan_takes_any: bool = False
    timed: bool = True


# choose(x, n, k, opts, policy) -> BackendChoice, with the logical N and K; policy: a DispatchPolicy or None.
Chooser = Callable[[torch.Tensor, int, int, tuple, Any], BackendChoice]
# choose_low_rank(x, n, k, opts, policy, rank): the same for calls that add a rank-``rank`` low-rank term
LowRankChooser = Callable[[torch.Tensor, int, int, tuple, Any, int], BackendChoice]


@dataclass(frozen=True)
class KernelKind:
    """One kernel kind: its backends (first = reference), how to pick one, and how to read its weight shape.

    ``choose(x, n, k, opts, policy)`` returns the automatic choice for logical sizes ``n``, ``k`` (``policy``
    is the caller's ``DispatchPolicy`` or None); None means "the first backend that can run on x's device".
    ``in_features(w, opts)`` gives the logical K when the storage packs it (int4: two values per byte);
    ``check(x, w, scales, opts)`` may raise ``UserError`` for inputs the kind cannot take.
    ``choose_low_rank(x, n, k, opts, policy, rank)``: the choice for calls that add a rank-``rank`` low-rank
    term (dynamic LoRAs), where a backend that fuses it can beat ``choose``'s plus a separate pass over the
    output (``dispatch.add_low_rank``); None: ``choose``'s for those calls too.
    """

    name: str
    backends: Mapping[str, KernelBackend | Impl]
    choose: Chooser | None = None
    in_features: Callable[[torch.Tensor, tuple], int] = field(default=lambda w, opts: int(w.shape[1]))
    check: Callable[[torch.Tensor, torch.Tensor, tuple, tuple], None] | None = None
    choose_low_rank: LowRankChooser | None = None

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError(f"kernel kind {self.name!r} needs at least one (reference) backend")
        wrapped = {n: b if isinstance(b, KernelBackend) else KernelBackend(b) for n, b in self.backends.items()}
        object.__setattr__(self, "backends", MappingProxyType(wrapped))

    @property
    def reference(self) -> str:
        """The first backend: the definition the others must match."""
        return next(iter(self.backends))

    def why_not(self, name: str, device: torch.device) -> str | None:
        """None when backend ``name`` can run this kind on ``device``, else the reason."""
        b = self.backends.get(name)
        if b is None:
            return f"backend {name!r} does not implement {self.name} (choose from {', '.join(self.backends)})"
        reason = b.requires(device)
        return None if reason is None else f"backend {name!r} {reason}"

    def first_available(self, device: torch.device) -> BackendChoice:
        for name, b in self.backends.items():
            if b.requires(device) is None:
                return BackendChoice(name, f"{device.type}: first backend that runs here")
        raise RuntimeError(f"no backend of kernel kind {self.name!r} runs on {device}")  # reference always does


_KINDS: dict[str, KernelKind] = {}


def register_kernel_kind(kind: KernelKind, *, replace: bool = False) -> KernelKind:
    """Add ``kind`` to the table (``replace=True`` to redefine an existing name); returns it."""
    if kind.name in _KINDS and not replace and _KINDS[kind.name] is not kind:
        raise ValueError(f"kernel kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister_kernel_kind(name: str) -> None:
    """Remove a kind (tests that register a throwaway kind clean up with this)."""
    _KINDS.pop(name, None)


def kernel_kind(name: str) -> KernelKind:
    """The registered kind ``name`` (ValueError listing the known ones otherwise)."""
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown kernel kind {name!r}; expected one of {tuple(sorted(_KINDS))}")
    return kind


def kinds() -> tuple[str, ...]:
    """Names of every registered kind."""
    return tuple(_KINDS)


def backends_for(kind: str) -> tuple[str, ...]:
    """Backend names of ``kind`` (reference first); () for an unknown kind."""
    k = _KINDS.get(kind)
    return () if k is None else tuple(k.backends)
