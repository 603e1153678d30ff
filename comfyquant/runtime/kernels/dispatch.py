"""Public entry points for quantized linears: one generic ``quant_linear`` over the kernel-kind table.

``quant_linear(x, kind, w, scales, bias, opts=..., backend=...)`` computes ``x @ dequant(w)^T + bias`` for any
registered kind (``registry.register_kernel_kind``); ``int8_linear`` / ``int8_block_linear`` / ``fp8_linear``
are thin wrappers that spell the built-in kinds' conventions. ``backend`` is a name (see :func:`backends_for`),
a :class:`BackendChoice`, a :class:`DispatchPolicy` (automatic choice under that policy), or None (the kind's
automatic choice for this device); nothing here is global.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from comfyquant.errors import UserError
from comfyquant.runtime.kernels import builtin, custom_ops
from comfyquant.runtime.kernels.acts import (
    GATED,
    ModulatedNorm,
    Norm,
    act_code,
    apply_input_act,
    norm_fits,
    norm_key,
    rms_norm,
)
from comfyquant.runtime.kernels.backends import AUTO, BackendChoice
from comfyquant.runtime.kernels.dense_copy import NAME as DENSE_COPY
from comfyquant.runtime.kernels.dense_copy import copy_backend, copy_reason, has_copy, wants_copy
from comfyquant.runtime.kernels.policy import DispatchPolicy
from comfyquant.runtime.kernels.registry import (
    KernelBackend,
    backends_for,
    kernel_kind,
    kinds,
    register_kernel_kind,
)

logger = logging.getLogger("comfyquant.runtime")

__all__ = [
    "BackendChoice",
    "DispatchPolicy",
    "LowRank",
    "add_low_rank",
    "backends_for",
    "bind_linear",
    "choose_backend",
    "copy_choice",
    "fp8_linear",
    "int8_block_linear",
    "int8_linear",
    "kinds",
    "quant_linear",
    "register_kernel_kind",
]

FP8_DTYPES = builtin.FP8_DTYPES
Backend = str | BackendChoice | DispatchPolicy | None
BoundLinear = Callable[..., torch.Tensor]  # (x, low_rank=None) -> y, from bind_linear


def choose_backend(x: torch.Tensor, *, kind: str, n: int, k: int, override: str | None = None,
                   opts: Sequence[int] = (), policy: DispatchPolicy | None = None, low_rank: int = 0
                   ) -> BackendChoice:
    """Pick the backend for ``x [..., k] @ W[n, k]^T`` of ``kind``; ``override`` forces one (UserError if it cannot
    run on x's device); ``low_rank``: the (padded) rank of a low-rank term the call adds, 0 for none."""
    kk = kernel_kind(kind)
    if override is not None:
        why_not = kk.why_not(override, x.device)
        if why_not is not None:
            raise UserError(why_not)
        return BackendChoice(override, "requested")
    if low_rank and kk.choose_low_rank is not None:
        return kk.choose_low_rank(x, n, k, tuple(opts), policy, low_rank)
    if kk.choose is None:
        return kk.first_available(x.device)
    return kk.choose(x, n, k, tuple(opts), policy)


def _check(x: torch.Tensor, kind, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
           opts: tuple) -> tuple[int, int]:
    what = f"{kind.name} linear"
    if w.dim() != 2:
        raise UserError(f"{what}: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not x.dtype.is_floating_point:
        raise UserError(f"{what}: input must be floating point, got {x.dtype}")
    if kind.check is not None:
        kind.check(x, w, scales, opts)
    n, k = int(w.shape[0]), kind.in_features(w, opts)
    if x.dim() < 1 or x.shape[-1] != k:
        raise UserError(f"{what}: input last dim {tuple(x.shape)[-1:]} does not match weight in_features {k}")
    if bias is not None and bias.shape != (n,):
        raise UserError(f"{what}: bias shape {tuple(bias.shape)} does not match out_features {n}")
    return n, k


# Eager plan memo, kept on the weight tensor itself (it dies with it): call signature -> the implementation
# validated and chosen for it. ComfyUI calls each layer with the same few signatures every step; a hit skips the
# checks and the backend choice (~10-20 µs of host time per call on the H200 host). The signature holds
# everything either depends on: shapes, dtypes, device, options, requested backend/policy, and whether a CUDA
# graph is being captured.
_PLANS_ATTR = "_comfyquant_plans"


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # (CUDA builds; read only for CUDA tensors)
# a hot plan's device slot for plans that take any x (``KernelBackend.plan_takes_any``): replayed with no check of
# x's layout or stream (the dense copy's addmm: ~0.35 µs of checks a call off a host-bound 14-24 µs layer)
_ANY_INPUT = -2


def capturing(x: torch.Tensor) -> bool:
    """Whether the current CUDA stream of ``x``'s device is being captured into a CUDA graph (False off CUDA).
    CUDA refuses to capture the legacy default stream (handle 0), where eager ComfyUI and most code issue their
    work: there one read of the stream handle answers instead of the driver's capture query (1.8 µs a call on the
    H100 host under the profiler, 512 calls a SDXL step, run 90)."""
    if not x.is_cuda:
        return False
    return torch._C._cuda_getCurrentRawStream(x.get_device()) != 0 and torch.cuda.is_current_stream_capturing()


def _signature(x: torch.Tensor, kind: str, scales: Sequence, bias: torch.Tensor | None, opts: Sequence[int],
               out_dtype: torch.dtype | None, backend: Backend) -> tuple:
    return (kind, x.shape, x.dtype, x.device, tuple(None if s is None else (s.shape, s.dtype) for s in scales),
            None if bias is None else bias.shape, tuple(opts), out_dtype, backend,
            capturing(x))


def quant_linear(x: torch.Tensor, kind: str, w: torch.Tensor, scales: Sequence[torch.Tensor | None],
                 bias: torch.Tensor | None = None, *, opts: Sequence[int] = (), out_dtype: torch.dtype | None = None,
                 backend: Backend = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w)^T + bias`` for kernel kind ``kind``; eager calls the backend directly, traced
    code goes through the ``comfyquant::quant_linear`` custom op (backend resolved inside it at run time)."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        plans = getattr(w, _PLANS_ATTR, None)
        if plans is not None:
            sig = _signature(x, kind, scales, bias, opts, out_dtype, backend)
            plan = plans.get(sig)
            if plan is not None:
                return plan(x, w, tuple(scales), bias, tuple(opts), out_dtype or x.dtype)
    scales, opts = tuple(scales), tuple(int(o) for o in opts)
    if compiling:
        # decided inside the op at run time: tracing torch.cuda / importlib queries would break the graph
        _check(x, kernel_kind(kind), w, scales, bias, opts)
        policy = backend if isinstance(backend, DispatchPolicy) else None
        name = backend.name if isinstance(backend, BackendChoice) else None if policy is not None else backend
        if name is None:
            name = AUTO if policy is None else f"{AUTO}|{policy.key()}"
        return custom_ops.quant_linear_op(x, w, list(scales), bias, kind, list(opts), out_dtype or x.dtype, name)
    # eager: skip the op dispatch (~10 µs per call, it matters at small M) and call the implementation
    impl = _resolve(x, kind, w, scales, bias, opts, backend).impl
    plans = getattr(w, _PLANS_ATTR, None)
    if plans is None:
        plans = {}
        setattr(w, _PLANS_ATTR, plans)
    if len(plans) < 64:  # a layer sees a handful of signatures; past that, stop memoizing (no growth)
        plans[_signature(x, kind, scales, bias, opts, out_dtype, backend)] = impl
    return impl(x, w, scales, bias, opts, out_dtype or x.dtype)


def copy_choice(x: torch.Tensor, kind: str, w: torch.Tensor, opts: Sequence[int], policy: DispatchPolicy | None,
                low_rank: int = 0, folds: bool = False) -> BackendChoice | None:
    """The dense-copy choice (``dense_copy``) for an eager call of ``x`` on stored weight ``w``, or None: under a policy
    with a copy budget, for a call with no low-rank term and nothing folded into the quantizer (``folds``: an
    input activation or norm the quantized kernel would apply), where the cost model puts the kind's best path
    over bf16 (``dense_copy.wants_copy``) and the budget admits the copy; inside a CUDA-graph capture only a copy made
    before it."""
    if policy is None or policy.copies is None or low_rank or folds:
        return None
    kk = kernel_kind(kind)
    if kk.choose is None:
        return None
    k = kk.in_features(w, tuple(opts))
    n = int(w.shape[0])
    choice = kk.choose(x, n, k, tuple(opts), policy)
    if not wants_copy(choice) or (capturing(x) and not has_copy(w, x.dtype)):
        return None
    if not policy.copies.admit(w, x.dtype, n * k * x.element_size()):
        return None
    return BackendChoice(DENSE_COPY, copy_reason(choice, policy.copies), choice.bf16_us, choice.bf16_us)


def _resolve(x: torch.Tensor, kind: str, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None, opts: tuple,
             backend: Backend, low_rank: int = 0, folds: bool = False) -> KernelBackend:
    """The checked, chosen backend of ``kind`` for eager calls with ``x``'s shape, dtype and device (and a
    low-rank term of rank ``low_rank``, 0: none; ``folds``: an input activation or norm goes to the kernel)."""
    kk = kernel_kind(kind)
    n, k = _check(x, kk, w, scales, bias, opts)
    policy = backend if isinstance(backend, DispatchPolicy) else None
    if copy_choice(x, kind, w, opts, policy, low_rank, folds) is not None:
        return copy_backend(kk)
    if (policy is not None and policy.measure and policy.mode == "eager" and not low_rank
            and not capturing(x)):
        from comfyquant.runtime.kernels.measured import measured_backend

        root = None if policy.measure_cache is None else Path(policy.measure_cache)
        return kk.backends[measured_backend(kk, x, w, scales, bias, opts, n, k, policy.allow, root)]
    name = backend.name if isinstance(backend, BackendChoice) else None if policy is not None else backend
    return kk.backends[choose_backend(x, kind=kind, n=n, k=k, override=name, opts=opts, policy=policy,
                                      low_rank=low_rank).name]


LowRank = tuple[torch.Tensor, torch.Tensor, int]  # (down [R, K], up [R, N], r): x's dtype, R % 16 == 0, rows >= r zero


def add_low_rank(x: torch.Tensor, y: torch.Tensor, low_rank: LowRank) -> torch.Tensor:
    """``y + (x @ down[:r]^T) @ up[:r]`` by two GEMMs (backends that do not fuse the term)."""
    down, up, r = low_rank
    h = F.linear(x, down[:r])
    n = y.shape[-1]
    return torch.addmm(y.reshape(-1, n), h.reshape(-1, r), up[:r]).view(y.shape)


def plain_key(sig: tuple) -> tuple | None:
    """The hot table's key (``(x.shape, x.dtype, x.device, input_act)``) for a bound call's memo signature, or None
    where the signature is not a plain one (captured, with a norm or a low-rank term): the one place that knows
    how a memo signature maps to a hot key, for the call itself and for tools that fill the table (host_python)."""
    shape, dtype, device, capture, input_act, nkey, rank = sig
    return None if capture or nkey is not None or rank else (shape, dtype, device, input_act)


def bind_linear(kind: str, w: torch.Tensor, scales: Sequence[torch.Tensor | None], bias: torch.Tensor | None = None,
                *, opts: Sequence[int] = (), backend: Backend = None) -> BoundLinear:
    """``(x, low_rank=None, input_act=None) -> quant_linear(act(x), kind, w, scales, bias, ...)`` in ``x``'s
    dtype, everything but ``x`` fixed; ``low_rank`` (:data:`LowRank`) adds ``(act(x) @ down^T) @ up``, in the
    GEMM's epilogue where the chosen backend fuses it, else by :func:`add_low_rank`; ``input_act`` (a name of
    ``acts.INPUT_ACTS``) is applied by the kernel as it reads x where the backend fuses it, else first in torch;
    ``norm`` (an ``acts.RowNorm``, not with ``input_act``): an RMSNorm of x, folded into the activation quantizer
    where the backend does (``KernelBackend.fuses_norm``) and its weight is on x's device, else
    ``acts.rms_norm`` first (the low-rank term reads the normed x either way); an ``acts.ModulatedNorm`` (a DiT
    block's modulated LayerNorm) likewise, where ``KernelBackend.fuses_mod`` says so for the call's shape.

    For a layer's eager forward: checks and the backend choice run once per input shape, dtype, device,
    capture state, ``input_act``, ``norm`` and the low-rank term's rank (a term can change the best backend) (the
    memo is the returned function's own, ``call.memo``; its keys end with the rank); from the second
    call of a signature on, calls replay the backend's plan (``KernelBackend.plan``: the compiled kernels'
    launchers with every argument but x fixed) where it has one, with a LoRA's low-rank term too (the plan is
    remade when the side path hands over other operands). The tensors are held by reference: in-place
    updates (``copy_``) are seen, replaced tensors are not (bind again). Not for traced code: call
    :func:`quant_linear` there.
    """
    scales, opts = tuple(scales), tuple(int(o) for o in opts)
    # signature -> [backend, fast path, low-rank operands]: the fast path is None before the signature's first
    # call, False where there is none (backend without plans, CUDA graph capture), else a triton_plans plan; with
    # a low-rank term it is made for the side path's operands and remade when the side path hands over others
    memo: dict[tuple, list] = {}
    # (x.shape, x.dtype, x.device, input_act) -> (plan, CUDA device index, -1 on the CPU, or _ANY_INPUT for a plan
    # that takes any x) for the plain signatures (no low-rank term or norm, outside a capture) that have a plan:
    # what most calls of a model are, looked up with a third of the signature's reads (the host time above the
    # kernel is what host-bound layers lose)
    hot: dict[tuple, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {}

    def plain(x: torch.Tensor, input_act: str | None = None) -> torch.Tensor | None:
        """The output of a call with no low-rank term or norm by its signature's plan, or None where it has none
        yet (or, for a plan that checks x, ``x`` is not contiguous and 16-byte aligned or a CUDA graph may be
        capturing: the general path decides then)."""
        h = hot.get((x.shape, x.dtype, x.device, input_act))
        if h is None:
            return None
        if h[1] != _ANY_INPUT:
            if not x.is_contiguous() or x.data_ptr() % 16:
                return None
            if h[1] >= 0 and _raw_stream(h[1]) != 0:  # not the legacy default stream: maybe a capture
                return None
        return h[0](x)

    def call(x: torch.Tensor, low_rank: LowRank | None = None, input_act: str | None = None,
             norm: Norm | None = None) -> torch.Tensor:
        if low_rank is None and norm is None:  # plain()'s lookup, inline (a call's frame is a tenth of this path's host time)
            h = hot.get((x.shape, x.dtype, x.device, input_act))
            if h is not None and (h[1] == _ANY_INPUT or (x.is_contiguous() and not x.data_ptr() % 16
                                  and (h[1] < 0 or _raw_stream(h[1]) == 0))):
                return h[0](x)
        capture = capturing(x)
        rank = 0 if low_rank is None else low_rank[0].shape[0]
        # a norm's tensor by identity and storage: a plan holds its pointer (a ``.data`` swap or a move makes a new
        # entry; the object is held, so its id is not reused while the entry lives); the rank last (``call.memo``'s
        # readers take it from there)
        sig = (x.shape, x.dtype, x.device, capture, input_act, norm_key(norm), rank)
        e = memo.get(sig)
        if e is None:
            # the checks and the choice see the activated input's shape (half of x's width under a gated
            # activation; outside a capture contiguous, as measured dispatch times the candidates on it)
            xa = x if input_act not in GATED else x.narrow(-1, 0, x.shape[-1] // 2)
            xa = xa if capture or xa.is_contiguous() else xa.contiguous()
            e = [_resolve(xa, kind, w, scales, bias, opts, backend, rank, input_act is not None or norm is not None),
                 False if capture else None, None]
            if len(memo) < 64:  # a layer sees a handful of signatures; past that, stop memoizing
                memo[sig] = e
        b, fast = e[0], e[1]
        checked = None  # the first call's output, where its norm check computed it
        if norm is not None:
            if input_act is not None:
                raise ValueError("a folded RMSNorm and an input activation on one layer: fold one of them only")
            if low_rank is None and len(e) > 3:
                folds = e[3]  # (every call after a signature's first)
            elif low_rank is None:
                eager = memo.get((*sig[:3], False, *sig[4:])) if capture else e  # the eager call's entry
                folds, checked = _norm_verdict(e, eager, b, x, w, scales, bias, opts, norm, capture)
            else:
                folds = False
            if not folds:
                x = rms_norm(x, norm)  # the general path: the norm in torch, the rest as without one
                norm = None
        if low_rank is None:
            if fast and x.is_contiguous() and x.data_ptr() % 16 == 0:
                return fast(x)
            if norm is not None:
                y = checked if checked is not None else b.impl(x, w, scales, bias, opts, x.dtype, norm=norm)
                if fast is None:
                    e[1] = (b.plan is not None and b.plan(x, w, scales, bias, opts, x.dtype, 0, norm=norm)) or False
                return y
            # xk: what the kernel is given; act: the activation code it applies itself (-1: applied before it)
            if input_act is None:
                xk, act = x, 0
                y = b.impl(x, w, scales, bias, opts, x.dtype)
            elif b.fuses_input_act and (input_act not in GATED or b.fuses_gated_act):
                xk, act = x, act_code(input_act)
                y = b.impl(x, w, scales, bias, opts, x.dtype, act=act)
            else:
                xk, act = apply_input_act(x, input_act), -1
                y = b.impl(xk, w, scales, bias, opts, x.dtype)
            if fast is None:  # the first call compiled the kernels: later calls of this signature replay them
                e[1] = _plan(b, xk, w, scales, bias, opts, act, input_act) or False
                key = plain_key(sig) if e[1] else None  # (a plain signature: no norm, low-rank term or capture)
                if key is not None and len(hot) < 64:
                    hot[key] = (e[1], _ANY_INPUT if b.plan_takes_any else x.get_device() if x.is_cuda else -1)
            return y
        if input_act is not None:
            x = apply_input_act(x, input_act)  # the low-rank term reads the activated x too
        if not b.fuses_low_rank:
            return add_low_rank(x, b.impl(x, w, scales, bias, opts, x.dtype), low_rank)
        if e[2] is low_rank:  # the side path's cached operands: the plan (if any) was made for them
            if fast and x.is_contiguous() and x.data_ptr() % 16 == 0:
                return fast(x)
            return b.impl(x, w, scales, bias, opts, x.dtype, low_rank=low_rank)
        y = b.impl(x, w, scales, bias, opts, x.dtype, low_rank=low_rank)
        e[1] = (not capture and b.plan is not None and b.plan(x, w, scales, bias, opts, x.dtype, 0, low_rank)) or False
        e[2] = low_rank
        return y

    call.memo = memo  # type: ignore[attr-defined]  # inspectable: which backend and whether a plan, per signature
    call.plain = plain  # type: ignore[attr-defined]  # for layers that check their own plain-call conditions
    call.hot = hot  # type: ignore[attr-defined]  # inspectable: the plain signatures' plans
    return call


# How far a folded modulated norm's first output may sit from the same backend fed the norm in torch (relative L2):
# the two differ by the int8 / fp8 codes the torch path's rounding of the normed values to x's dtype moves (well
# under 1%); a kernel that computed something else would be off by ~1.
MOD_CHECK_TOL = 0.1
MOD_CHECK_ROWS = 1024  # the reference's rows in the check (see _mod_check)


def _norm_verdict(e: list, eager: list | None, b: KernelBackend, x: torch.Tensor, w: torch.Tensor, scales: tuple,
                  bias: torch.Tensor | None, opts: tuple, norm: Norm, capture: bool
                  ) -> tuple[bool, torch.Tensor | None]:
    """Whether ``norm`` runs in backend ``b``'s quantizer for memo entry ``e``, decided at the entry's first call and
    kept as ``e[3]`` (the signature fixes everything it depends on; later calls read it from the entry, eager host
    time being what small layers lose), and the call's output where deciding computed it (else None). The backend
    must fold it for this weight and shape with a tensor that fits x (:func:`folds_norm`); a modulated norm must
    also pass :func:`_mod_check` at its first eager call, whose kernel output is the call's. Under a CUDA-graph
    capture (no comparison can be read there) the eager entry ``eager`` of the same signature decides; without
    its verdict yet the norm runs in torch and nothing is kept."""
    if len(e) > 3:
        return e[3], None
    ok, y = folds_norm(b, scales, opts, x, w, norm), None
    if ok and isinstance(norm, ModulatedNorm):
        if capture:
            if eager is None or len(eager) <= 3:
                return False, None
            ok = eager[3] and eager[0] is b
        else:
            y = _mod_check(b, x, w, scales, bias, opts, norm)
            ok = y is not None
    e.append(ok)
    return ok, y


def _mod_check(b: KernelBackend, x: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
               opts: tuple, norm: ModulatedNorm) -> torch.Tensor | None:
    """The folded modulated norm's output (the call's), or None where it is off from the same backend fed the norm
    in torch by more than :data:`MOD_CHECK_TOL` or not finite: a kernel that disagrees is reported (one warning)
    and not used. The kernel runs on the whole call (its shape picks its launch); the reference on its first rows
    only, up to :data:`MOD_CHECK_ROWS` of the first modulation group (activations are quantized per row, so those
    rows of both agree): the check's extra memory is one output for those rows, not a second whole one and a
    normed copy of x (run 86: +0.4-0.5 GiB peak at a first SDXL / Z-Image / Qwen-Image step with the whole
    reference)."""
    out = b.impl(x, w, scales, bias, opts, x.dtype, norm=norm)
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    r = min(rows, MOD_CHECK_ROWS, norm.rows if norm.rows > 0 else rows)
    head = norm._replace(mod=norm.mod[:1]) if norm.rows > 0 else norm
    ref = b.impl(rms_norm(x.reshape(rows, k)[:r], head), w, scales, bias, opts, x.dtype)
    y = out.reshape(rows, -1)[:r]
    off = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    if bool(torch.isfinite(y).all()) and off <= MOD_CHECK_TOL:
        return out
    logger.warning("comfyquant: %s's folded modulated norm gave %.3g relative error against the norm in torch "
                   "for K=%d, N=%d; applying the norm in torch for this layer",
                   getattr(b.impl, "__name__", "the backend"), off, x.shape[-1], int(w.shape[0]))
    return None


def folds_norm(b: KernelBackend, scales: tuple, opts: tuple, x: torch.Tensor, w: torch.Tensor,
                norm: Norm) -> bool:
    """Whether backend ``b`` applies ``norm`` in its quantizer on this call: it folds norms of that kind for this
    weight (a modulated one: for this call's shape too), and the norm's tensor fits x (``acts.norm_fits``)."""
    if isinstance(norm, ModulatedNorm):
        k = x.shape[-1]
        if b.fuses_mod is None or not b.fuses_mod(scales, opts, x.numel() // max(k, 1), int(w.shape[0]), k):
            return False
    elif b.fuses_norm is None or not b.fuses_norm(scales, opts):
        return False
    return norm_fits(norm, x)


def _plan(b: KernelBackend, xk: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
          opts: tuple, act: int, input_act: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The backend's eager fast path for the signature of ``xk``, what the first call gave the kernel: its plan,
    taking ``act`` (>= 0) itself, or, where the backend does not fuse the input activation (``act`` -1, ``xk``
    the activated input), its plan for the activated input behind the torch activation."""
    if b.plan is None:
        return None
    if act >= 0:
        return b.plan(xk, w, scales, bias, opts, xk.dtype, act)
    p = b.plan(xk, w, scales, bias, opts, xk.dtype, 0)
    if p is None:
        return None
    return lambda x: p(apply_input_act(x, input_act))


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                convrot_group: int | None = None, out_dtype: torch.dtype | None = None,
                backend: Backend = None) -> torch.Tensor:
    """W8A8 ``x [..., K] @ (w_q * w_scale)^T + bias``; activations quantized per token (row), int32 accumulate.

    ``convrot_group``: rotate x group-wise with the regular Hadamard first (the weight is stored rotated).
    """
    return quant_linear(x, "int8", w_q, (w_scale,), bias, opts=(convrot_group or 0,), out_dtype=out_dtype,
                        backend=backend)


def int8_block_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      *, block: int, out_dtype: torch.dtype | None = None, backend: Backend = None) -> torch.Tensor:
    """W8A8 with one weight scale per ``block x block`` tile (``w_scale [ceil(N/b), ceil(K/b)]``)."""
    return quant_linear(x, "int8_block", w_q, (w_scale,), bias, opts=(block,), out_dtype=out_dtype, backend=backend)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               backend: Backend = None) -> torch.Tensor:
    """FP8 ``x @ (w_q * w_scale)^T + bias``; activations per-row dynamic, or static ``input_scale`` (scalar)."""
    return quant_linear(x, "fp8", w_q, (w_scale, input_scale), bias, out_dtype=out_dtype, backend=backend)


def int4_rot_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, *, convrot_group: int, out_dtype: torch.dtype | None = None,
                    backend: Backend = None) -> torch.Tensor:
    """W4A8 ``int4_rot``: ``w_packed`` int8 [N, K/2] (two int4 per byte), per-row scale, rotated weight."""
    return quant_linear(x, "int4_rot", w_packed, (w_scale,), bias, opts=(convrot_group,), out_dtype=out_dtype,
                        backend=backend)
