"""One quantized GEMM for sibling projections: the q/k/v (or k/v, or a gated MLP's two halves) of one module,
called one after another on the same input.

T5, CLIP, SD1.x/SDXL ``CrossAttention``, Wan, Llama-style encoders and Qwen-Image compute ``q = self.q(x)``,
``k = self.k(x)``, ``v = self.v(x)`` as separate linears: three activation quantizations, three launches and
three reads of ``x``. With per-row (or per-tensor) scales the members' int8 / fp8 / int4 weights concatenate by
rows exactly, so one GEMM over ``[sum N, K]`` gives every member's output bit for bit on the CPU reference.

How a call runs, without changing the model's code:

* :class:`ArmedForward` replaces the parent module's ``forward`` and arms its :class:`SiblingGroup` for the
  duration of the call (the stash never outlives it).
* The first member called while armed (the leader) runs the fused GEMM and stashes the other members' column
  views of the output, keyed by the identity of ``x``; each member called next with that same ``x`` object takes
  its view. Any other call (another ``x``, an unarmed call) computes alone as before.
* Which members share ``x`` is learned from one unfused round (self-attention: q, k, v; cross-attention: k, v;
  none: the group stays off); a call pattern that stops matching resets the plan a few times, then turns the group
  off for good.
* The members' weights are consolidated into one storage lazily, on the compute device, at the first fused call
  (each member's weight becomes a row view of it, so no memory is duplicated); moves and weight replacements drop
  the consolidation, and the next fused call builds it again.
* A call whose fused output would exceed ``max_bytes`` computes alone: large calls are GPU-bound (fusion measured
  0.99-1.06x at Wan's 32K tokens) and the fused output keeps every member's output alive until its last view dies.

:func:`fuse_sibling_projections` sets this up on a model with ``QuantLinear`` children; the node pack does the
same with object patches on a ComfyUI clone (``nodes.adapter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from comfyquant.runtime.kernels.acts import rms_norm
from comfyquant.runtime.kernels.dispatch import capturing
from comfyquant.runtime.layouts.generic import FormatParams
from comfyquant.runtime.nn import QuantLinear, bound_linear, run_linear
from comfyquant.runtime.tensor import QuantizedTensor
from comfyquant.runtime.versions import version

# Child names of sibling projections, longest first (a parent may hold several groups: Qwen-Image's to_q/k/v and
# add_q/k/v_proj, Wan I2V's k/v and k_img/v_img).
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q", "k", "v"),
    ("to_q", "to_k", "to_v"),
    ("q_proj", "k_proj", "v_proj"),
    ("add_q_proj", "add_k_proj", "add_v_proj"),
    ("k_img", "v_img"),
    ("wi_0", "wi_1"),
    ("gate_proj", "up_proj"),
)
FUSED_KINDS = ("int8", "fp8", "int4_rot")  # kernel kinds with scalar or per-row weight scales
DEFAULT_MAX_BYTES = 256 << 20  # the largest fused output (M x sum N x element size) a call fuses
# the largest stacked LoRA rank given to the fused GEMM: the Gluon kernel's epilogue holds 64 (``gluon_gemm.LR_MAX``).
# Past it the members compute alone, each with its own term in its own kernel's epilogue: adding the terms on
# the fused output's slices with torch ran Wan's q / k / v at 4,096 tokens 10% slower than unfused (H200, run 40,
# bench_lora: one rank-32 LoRA on each, eager 1.62 ms fused vs 1.46 unfused; rank 16 stacked to 48: 1.36 vs 1.46)
MAX_STACKED_RANK = 64
MAX_RESETS = 3  # plans that stopped matching before a group is turned off for good
_FUSED_ATTR = "_comfyquant_fused"  # on each member's weight tensor: its group's consolidated weight


# ---- the weights ---------------------------------------------------------------------------------------------
def fusion_blocker(weights: Sequence[torch.Tensor]) -> str | None:
    """Why ``weights`` cannot be concatenated by rows into one quantized weight, or None when they can: the
    same layout, format, format options, dtype, backend and device, scalar or per-row scales, no SmoothQuant
    ``pre_quant_scale`` and equal static ``input_scale``."""
    if len(weights) < 2:
        return "fewer than two weights"
    if not all(isinstance(w, QuantizedTensor) and isinstance(w.params, FormatParams) for w in weights):
        return "not all are quantized weights of a registered format"
    qts: list[QuantizedTensor] = list(weights)  # type: ignore[arg-type]
    first, p0 = qts[0], qts[0].params
    assert isinstance(p0, FormatParams)
    if p0.format.kernel_kind not in FUSED_KINDS:
        return f"format {p0.fmt} has block scales or no kernel (fusable: int8, int8-tensor, int8-rot, fp8, int4-rot)"
    for w in qts:
        p = w.params
        assert isinstance(p, FormatParams)
        if w.layout_cls is not first.layout_cls or p.fmt != p0.fmt or p.fmt_params != p0.fmt_params:
            return "different formats or format options"
        if w.dtype != first.dtype or p.backend != p0.backend or w.device != first.device:
            return "different dtypes, backends or devices"
        if p.transposed or p.full_precision or p.weight_scale_2 is not None:
            return "a transposed, full-precision or two-level-scaled weight"
        if p.pre_quant_scale is not None:
            return "a pre_quant_scale (SmoothQuant's smoothing is per layer)"
        if w.dim() != 2 or w.shape[1] != first.shape[1] or w.qdata.dim() != 2 \
                or w.qdata.shape[0] != w.shape[0] or w.qdata.shape[1] != first.qdata.shape[1]:
            return "different in_features or storage layouts"
        s = p.weight_scale
        if s is None or s.numel() not in (1, w.shape[0]) or s.dtype != p0.weight_scale.dtype:  # type: ignore[union-attr]
            return "scales that are neither one per tensor nor one per row"
        if not _same_input_scale(p.input_scale, p0.input_scale):
            return "different static input scales"
    return None


def _same_input_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def fusable(weights: Sequence[torch.Tensor]) -> bool:
    """True when :func:`concat_rows` can fuse ``weights`` (see :func:`fusion_blocker`)."""
    return fusion_blocker(weights) is None


def _row_scales(s: torch.Tensor, rows: int) -> torch.Tensor:
    """``s`` as ``[rows, 1]``: a per-row scale reshaped, a per-tensor one expanded (exact: the same value)."""
    return s.reshape(1, 1).expand(rows, 1) if s.numel() == 1 else s.reshape(rows, 1)


def concat_rows(qts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """One quantized weight whose rows are ``qts``' rows in order (new storage): its linear equals the members'
    linears concatenated along the output. Per-tensor scales become per-row. ValueError when not fusable."""
    why = fusion_blocker(qts)
    if why is not None:
        raise ValueError(f"cannot concatenate these weights by rows: {why}")
    p0 = qts[0].params
    assert isinstance(p0, FormatParams)
    rows = sum(int(q.shape[0]) for q in qts)
    scales = [q.params.weight_scale for q in qts]  # type: ignore[attr-defined]
    scale = torch.cat([_row_scales(s, int(q.shape[0])) for s, q in zip(scales, qts, strict=True)])
    if all(s.dim() == 1 and s.numel() == q.shape[0] for s, q in zip(scales, qts, strict=True)):
        scale = scale.reshape(rows)  # int4-rot keeps its [N] layout
    params = p0.replace(orig_shape=(rows, int(qts[0].shape[1])), weight_scale=scale)
    return QuantizedTensor(torch.cat([q.qdata for q in qts]), qts[0].layout_cls, params)


def row_view(fused: QuantizedTensor, start: int, stop: int, like: QuantizedTensor) -> QuantizedTensor:
    """Rows ``start:stop`` of ``fused`` as a weight with ``like``'s params (the member it was made from): the
    storage is shared, and so are per-row scales (views of ``fused``'s); a per-tensor scale stays ``like``'s."""
    if tuple(like.shape) != (stop - start, fused.shape[1]):
        raise ValueError(f"rows {start}:{stop} of a {tuple(fused.shape)} weight cannot stand for a "
                         f"{tuple(like.shape)} one")
    params = like.params
    own = getattr(params, "weight_scale", None)
    if own is not None and own.numel() > 1:
        params = params.replace(weight_scale=fused.params.weight_scale[start:stop].reshape(own.shape))  # type: ignore[attr-defined]
    return QuantizedTensor(fused.qdata[start:stop], fused.layout_cls, params)


_UNSET = object()  # (``_members``: no member read yet)


class _Fused:
    """A consolidated group (kept on each member's weight tensor, so it dies with the weights): the fused weight
    and bias, the member widths, and what the next call checks to trust it."""

    __slots__ = ("bias", "bias_ptrs", "cast", "plan", "rows", "sizes", "versioned", "versions", "weight")

    def __init__(self, plan: tuple[int, ...], weight: QuantizedTensor, bias: torch.Tensor | None,
                 sizes: list[int], members: Sequence[nn.Module]) -> None:
        self.plan, self.weight, self.bias, self.sizes, self.rows = plan, weight, bias, sizes, sum(sizes)
        params = [(m._parameters["weight"], m._parameters["bias"]) for m in members]
        self.bias_ptrs = tuple(None if b is None else b.data_ptr() for _, b in params)
        # an in-place write into a member's weight (copy_, a float load_state_dict) bumps its wrapper's version
        # (not its storage's): the fused scales would be stale. Inference tensors have none (ComfyUI replaces
        # weights instead of writing them)
        self.versions = tuple(version(w) for w, _ in params)  # type: ignore[arg-type]
        # whether any member has a counter to watch: an inference tensor's reads -1 for as long as it lives (the
        # tag check stands for its identity), so a group of them skips the reads on every call
        self.versioned = any(v != -1 for v in self.versions)
        self.cast: tuple[torch.dtype, int, torch.Tensor] | None = None

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused bias in ``dtype``, cast once while its values stay the same (a stable object for the
        bound call's memo)."""
        b = self.bias
        if b is None or b.dtype == dtype:
            return b
        c = self.cast
        if c is not None and c[0] == dtype and c[1] == version(b):
            return c[2]
        cast = b.to(dtype)
        self.cast = (dtype, version(b), cast)
        return cast


def _consolidate(plan: tuple[int, ...], members: Sequence[nn.Module]) -> _Fused | None:
    """Concatenate the members' weights (and biases) into one storage, point each member's parameters at its
    rows, and tag the weights; None when they cannot be fused as they are now (the round computes alone)."""
    qts = [m._parameters["weight"] for m in members]
    biases = [m._parameters["bias"] for m in members]
    if fusion_blocker(qts) is not None:  # type: ignore[arg-type]
        return None
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    if biases[0] is not None and len({b.dtype for b in biases}) != 1:  # type: ignore[union-attr]
        return None
    fused = concat_rows(qts)  # type: ignore[arg-type]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
    sizes = [int(q.shape[0]) for q in qts]  # type: ignore[union-attr]
    start = 0
    for m, qt, n in zip(members, qts, sizes, strict=True):
        m.weight = nn.Parameter(row_view(fused, start, start + n, qt), requires_grad=False)  # type: ignore[arg-type]
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    f = _Fused(plan, fused, bias, sizes, members)
    for m in members:
        setattr(m._parameters["weight"], _FUSED_ATTR, f)
    return f


# ---- the members' LoRAs --------------------------------------------------------------------------------------
def _side_of(m: nn.Module, x: torch.Tensor) -> Any:
    """A member's side path (dynamic LoRAs) for a call on ``x``: the node layer's, its tensors on ``x``'s device
    (``_side_for``), or a plain layer's ``adapter``."""
    side = m.__dict__.get("adapter")
    if side is None:  # (most calls: no LoRA on the member)
        return None
    side_for = getattr(type(m), "_side_for", None)
    return side_for(m, x) if side_for is not None else side


def _low_rank_of(side: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A side path's low-rank operands for ``x`` (``LoRASidePath.fused_operands``: cached per dtype, so the same
    objects call after call), or None (no side path, or none with a low-rank part)."""
    operands = None if side is None else getattr(side, "fused_operands", None)
    return None if operands is None else operands(x)


def _stack_low_rank(parts: Sequence[tuple[torch.Tensor, torch.Tensor, int] | None], sizes: Sequence[int],
                    x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(down [R, K], up [R, sum N], r)`` of several members' terms: their ``down`` rows stacked (R rounded up to
    16, zero rows past r) and each ``up`` in its member's columns, zeros elsewhere, so ``(x @ down^T) @ up`` is each
    member's term in its own columns."""
    starts = accumulate(sizes[:-1], initial=0)
    live = [(p, start, n) for p, start, n in zip(parts, starts, sizes, strict=True) if p is not None]
    r = sum(p[2] for p, _, _ in live)
    rows = r + (-r % 16)
    down = torch.zeros(rows, live[0][0][0].shape[1], dtype=x.dtype, device=x.device)
    up = torch.zeros(rows, sum(sizes), dtype=x.dtype, device=x.device)
    at = 0
    for (d, u, k), start, n in live:
        down[at:at + k] = d[:k]
        up[at:at + k, start:start + n] = u[:k]
        at += k
    return down, up, r


class _GroupTerm:
    """The side path the fused GEMM is given (``run_linear``'s adapter protocol): the stacked low-rank term for
    its epilogue, nothing else (each member adds its own dense / bias diffs on its slice)."""

    __slots__ = ("operands",)

    def __init__(self, operands: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        self.operands = operands

    def fused_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.operands

    def rest(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # only where the bound call is not used
        from comfyquant.runtime.kernels.dispatch import add_low_rank

        return add_low_rank(x, y, self.operands)


# ---- the group -----------------------------------------------------------------------------------------------
class SiblingGroup:
    """The Python state of one group of sibling projections of ``parent`` (children ``names``): armed depth,
    this round's stash, the learned plan and its misses. Members are read from ``parent`` at call time, so a
    LoRA node's replacement layer (in another ComfyUI clone) is the one that runs."""

    def __init__(self, parent: nn.Module, names: Sequence[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if len(names) < 2:
            raise ValueError(f"a sibling group needs two or more members, got {list(names)}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.parent = parent
        self.names = tuple(names)
        self.max_bytes = int(max_bytes)
        self.armed = 0
        self.plan: tuple[int, ...] | None = None  # member indexes that share x; None: observing; (): off
        self.resets = 0
        self.fused_calls = 0  # fused GEMMs run (diagnostics)
        self._x: torch.Tensor | None = None  # the stash: the input of the last fused call ...
        self._slots: dict[int, torch.Tensor | None] = {}  # ... and the views not yet taken (None: compute alone)
        self._seen: list[tuple[int, torch.Tensor]] = []  # an observed round's calls (the inputs kept alive)
        self._skip = False  # a miss this round: the rest of it computes alone
        # the members' LoRA term for the fused GEMM and what it was made from (fused weight, dtype, operands)
        self._term: tuple[_Fused, torch.dtype, list, _GroupTerm] | None = None
        # ``(group, plan, fused weight, bias, x, low-rank term, norm) -> None`` called after each fused GEMM
        # (``dispatch_report.describe_dispatch`` sets it for one forward and clears it); None: nothing is told
        self.observer: Callable[..., None] | None = None

    def __repr__(self) -> str:
        plan = "observing" if self.plan is None else ",".join(self.names[i] for i in self.plan) or "off"
        return f"SiblingGroup({','.join(self.names)}; plan {plan}; {self.fused_calls} fused calls)"

    def product(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``i``'s output ``x @ W_i^T + b_i`` plus its side path (dynamic LoRAs) from this round's fused
        GEMM, or None: the member computes alone."""
        if self._skip:  # (never traced: ArmedForward does not arm while compiling, and only armed calls get here)
            return None
        plan = self.plan
        if plan is None:
            self._seen.append((i, x))
            return None
        if i not in plan:
            if x is self._x:
                self._miss()  # a member outside the plan on the fused input: the plan is too small
            return None
        if x is self._x:
            return self._slots.pop(i, None)  # not there: this member ran on this input already; alone
        if self._slots:
            self._miss()  # a plan member on another input while views wait for theirs
            return None
        return self._lead(i, x, plan)

    def waiting(self, i: int, x: torch.Tensor) -> bool:
        """Whether member ``i``'s output on ``x`` waits in this round's stash: a fused GEMM computed it already."""
        return x is self._x and self._slots.get(i) is not None

    def _lead(self, i: int, x: torch.Tensor, plan: tuple[int, ...]) -> torch.Tensor | None:
        ran = self._fused_run(plan, x)
        if ran is None:  # this x's members compute alone
            self._x, self._slots = x, {j: None for j in plan if j != i}
            return None
        views = ran[2]
        self._x, self._slots = x, {j: v for j, v in zip(plan, views, strict=True) if j != i}
        return views[plan.index(i)]

    def fused_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every member's output (plus its side path) side by side, ``[..., sum N]`` in member order, from one
        GEMM on ``x``; None where they cannot fuse now (traced, a member that must compute alone, above
        ``max_bytes``): the caller computes them alone. Needs no arming or plan (``runtime.gated``'s fold)."""
        if torch.compiler.is_compiling():
            return None
        ran = self._fused_run(tuple(range(len(self.names))), x)
        if ran is None:
            return None
        f, y, views = ran
        for view, out in zip(y.split_with_sizes(f.sizes, -1), views, strict=True):
            if out.data_ptr() != view.data_ptr():  # a side path's dense / bias diff (or its whole term) added
                view.copy_(out)
        return y

    def _fused_run(self, plan: tuple[int, ...],
                   x: torch.Tensor) -> tuple[_Fused, torch.Tensor, list[torch.Tensor]] | None:
        """(consolidated weight, fused output, each member's output) of ``plan``'s members on ``x``, or None
        where they compute alone (:meth:`_members`, :meth:`_fused` and :meth:`_run` decline)."""
        # the checks read the members' weights' devices, shapes and versions: with the subclass's
        # __torch_function__ off, each read is a plain attribute (through it, ~20 reads a round cost more host
        # time than the two launches fusion saves: run 33's T5 bench model ran 0.65x fused vs 0.82x unfused)
        with torch._C.DisableTorchFunctionSubclass():
            scanned = self._members(plan, x)
        if scanned is None:
            return None
        members, f, rows, lora = scanned
        f = self._fused(plan, members, x, f, rows)
        if f is None:
            return None
        ran = self._run(f, members, x, lora)
        return None if ran is None else (f, *ran)

    def _run(self, f: _Fused, members: list[nn.Module], x: torch.Tensor,
             lora: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The fused GEMM on ``x`` (the members' LoRA low-rank terms in its epilogue) and each member's output:
        its column view of it, plus what its side path adds that the kernel did not; None where the members'
        LoRA ranks sum past :data:`MAX_STACKED_RANK` (they compute alone). ``lora`` False: no member has a side
        path (``adapter``), so none of the LoRA bookkeeping runs."""
        lead = members[0].__dict__  # a norm handed over for this call, else the folded one (the same for every member)
        norm = lead.get("call_norm")
        if norm is None:
            src = lead.get("input_norm")
            norm = None if src is None else src.for_call()
        sides = [_side_of(m, x) for m in members] if lora else []
        lora = any(side is not None for side in sides)
        if norm is not None and lora:
            x, norm = rms_norm(x, norm), None  # side paths read the normed x
        parts = [_low_rank_of(side, x) for side in sides] if lora else []
        if lora and sum(p[2] for p in parts if p is not None) > MAX_STACKED_RANK:
            return None
        bias = f.bias_as(x.dtype) if getattr(members[0], "bias_in_input_dtype", False) else f.bias
        term = self._low_rank(f, parts, x) if lora else None
        y = run_linear(bound_linear(f.weight, bias), x, f.weight, bias, term, norm=norm)
        if self.observer is not None:
            self.observer(self, f.plan, f.weight, bias, x, term, norm)
        views = list(y.split_with_sizes(f.sizes, -1))  # (Tensor.split's Python wrapper costs a µs a call)
        if lora:  # what the kernel did not add: a member's dense / bias diffs, or all of it
            for k, side in enumerate(sides):
                if side is not None:
                    views[k] = side.rest(x, views[k]) if term is not None and parts[k] else side(x, views[k])
        self.fused_calls += 1
        return y, views

    def _low_rank(self, f: _Fused, parts: list[tuple[torch.Tensor, torch.Tensor, int] | None],
                  x: torch.Tensor) -> _GroupTerm | None:
        """The members' LoRA low-rank parts (``parts``, :func:`_low_rank_of` of each) as one term of the fused GEMM (``dispatch.LowRank``: their ``down``
        rows stacked, ``up`` block-diagonal over the members' columns), so the kernel adds all of them in its
        epilogue; remade when a member's operands change. None when no member has one (``_run`` does not fuse
        past :data:`MAX_STACKED_RANK`)."""
        if not any(p is not None for p in parts):
            return None
        cached = self._term
        if cached is not None and cached[0] is f and cached[1] == x.dtype and len(cached[2]) == len(parts) \
                and all(a is b for a, b in zip(cached[2], parts, strict=True)):
            return cached[3]
        term = _GroupTerm(_stack_low_rank(parts, f.sizes, x))
        self._term = (f, x.dtype, parts, term)
        return term

    def _fused(self, plan: tuple[int, ...], members: list[nn.Module], x: torch.Tensor, f: _Fused | None,
               rows: int) -> _Fused | None:
        """The members' consolidated weight for a call on ``x``: ``f`` (the valid tagged one), else a new one;
        None above the size cap, and while a CUDA graph is being captured (warm-up steps consolidate first)."""
        if x.numel() // max(1, x.shape[-1]) * rows * x.element_size() > self.max_bytes:
            return None
        if f is not None:
            return f
        if capturing(x):
            return None
        return _consolidate(plan, members)

    def _members(self, plan: tuple[int, ...], x: torch.Tensor
                 ) -> tuple[list[nn.Module], _Fused | None, int, bool] | None:
        """(the live plan members, their consolidated weight while it is valid else None, their rows, whether one
        has a side path), or None when one of them must compute alone (not this group's member, a ComfyUI weight /
        bias function, a folded input activation, a folded norm or a norm handed over for the call
        (``QuantLinear.call_norm``) not the others', a weight or bias on another device). Every call of the group
        runs this, in one pass over the members: instance attributes are read from ``__dict__``
        (``nn.Module.__getattr__`` raises, slowly, for missing ones). The consolidated weight is valid while every
        member's weight holds its tag (a move replaces the weight's contents, tag included), unchanged in place,
        and its bias view; then its device and rows stand for the members' (a moved bias has another address), and
        only a call that consolidates reads each member's."""
        out = []
        mods, names = self.parent._modules, self.names
        norm: Any = _UNSET
        call = None
        f: Any = _UNSET  # the first member's tag, then None once a member does not match it
        lora = False
        for k, j in enumerate(plan):
            m = mods.get(names[j])
            if m is None:
                return None
            own = m.__dict__
            sib = own.get("sibling")
            if sib is None or sib[0] is not self or sib[1] != j:
                return None
            if own.get("weight_function") or own.get("bias_function") or own.get("input_act") is not None:
                return None
            src = own.get("input_norm")
            if norm is _UNSET:
                norm, call = src, own.get("call_norm")  # the first member's: every member must have the same
            elif (src is not norm and (src is None or norm is None or src.holder is not norm.holder)) \
                    or own.get("call_norm") is not call:
                return None
            if own.get("adapter") is not None:
                lora = True
            params = m._parameters
            w, b = params.get("weight"), params.get("bias")
            if f is _UNSET:
                f = getattr(w, _FUSED_ATTR, None)
                if f is not None and f.plan != plan:
                    f = None
            if f is not None and (getattr(w, _FUSED_ATTR, None) is not f
                                  or (f.versioned and version(w) != f.versions[k])
                                  or (None if b is None else b.data_ptr()) != f.bias_ptrs[k]):
                f = None
            out.append(m)
        dev = x.device
        if f is not None and f is not _UNSET:
            return (out, f, f.rows, lora) if f.weight.device == dev else None
        rows = 0
        for m in out:  # (no valid consolidation: each member's weight is checked as it is)
            params = m._parameters
            w, b = params.get("weight"), params.get("bias")
            if not isinstance(w, QuantizedTensor) or w.device != dev or (b is not None and b.device != dev):
                return None
            rows += int(w.shape[0])
        return out, None, rows, lora

    def _miss(self) -> None:
        """The plan did not match a call: observe again from the next round (off for good after MAX_RESETS)."""
        self._x, self._slots = None, {}
        self.resets += 1
        self.plan = () if self.resets >= MAX_RESETS else None
        self._skip = True

    def disarm(self) -> None:
        """Leave one armed call; the outermost one ends the round."""
        self.armed -= 1
        if not self.armed:
            self.end_round()

    def end_round(self) -> None:
        """Drop the stash (views left untaken count as a miss) and, after an observed round, learn the plan."""
        if self._slots:
            self._miss()
        elif self.plan is None and not self._skip and self._seen:
            self.plan = _learn(self._seen)
        self._seen, self._slots, self._x, self._skip = [], {}, None, False


def _learn(seen: Sequence[tuple[int, torch.Tensor]]) -> tuple[int, ...]:
    """The largest set of (two or more) members an observed round called on one input object; () for none."""
    by_input: dict[int, set[int]] = {}
    for i, x in seen:  # the inputs are alive (``seen`` holds them), so their ids are distinct
        by_input.setdefault(id(x), set()).add(i)
    best = max(by_input.values(), key=len)
    return tuple(sorted(best)) if len(best) >= 2 else ()


class ArmedForward:
    """A parent module's ``forward`` (set on the instance, or as a ComfyUI object patch) that arms its sibling
    groups for the call: its class's ``forward`` runs with the groups armed, and the round ends with the call."""

    def __init__(self, parent: nn.Module, *groups: SiblingGroup) -> None:
        self.parent = parent
        self.groups = groups

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(type(self.parent).forward, self.parent, *args, **kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the groups armed (a forward that calls the parent's members itself, as
        ``nodes.qwen_rope`` does, keeps them fused); traced code computes each member alone."""
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        for g in self.groups:
            g.armed += 1
        try:
            return fn(*args, **kwargs)
        finally:
            for g in self.groups:
                g.disarm()


# ---- detection and the library API ---------------------------------------------------------------------------
def sibling_groups(model: nn.Module, is_target: Callable[[str, nn.Module], bool],
                   weight_of: Callable[[str, nn.Module], torch.Tensor] | None = None,
                   ) -> list[tuple[str, tuple[str, ...]]]:
    """``(parent path, member names)`` for every module of ``model`` whose children match a name tuple of
    :data:`SIBLING_NAMES` (two or more of them): the members ``is_target(path, module)`` accepts, with equal
    in_features and bias presence (the largest such set) and weights (``weight_of(path, module)``, default the
    module's ``weight``) that :func:`fusable` accepts. Nothing is changed."""
    out = []
    for path, parent in model.named_modules():
        children = parent._modules
        taken: set[str] = set()
        for names in SIBLING_NAMES:
            weights: dict[str, torch.Tensor] = {}
            classes: dict[tuple[int, bool], list[str]] = {}
            for name in names:
                mod = children.get(name)
                full = f"{path}.{name}" if path else name
                if name in taken or mod is None or not is_target(full, mod):
                    continue
                w = weight_of(full, mod) if weight_of is not None else getattr(mod, "weight", None)
                if not isinstance(w, torch.Tensor) or w.dim() != 2:
                    continue
                weights[name] = w
                classes.setdefault((int(w.shape[1]), getattr(mod, "bias", None) is not None), []).append(name)
            best = max(classes.values(), key=len, default=[])
            if len(best) >= 2 and fusable([weights[n] for n in best]):
                out.append((path, tuple(best)))
                taken.update(best)
    return out


def _free_quant_linear(path: str, mod: nn.Module) -> bool:
    return (isinstance(mod, QuantLinear) and mod.weight is not None and getattr(mod, "input_act", None) is None
            and getattr(mod, "sibling", None) is None)


def fuse_sibling_projections(model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """Let the sibling ``QuantLinear`` projections of ``model`` (:func:`sibling_groups`) run as one GEMM per call
    of their parent, for calls whose fused output is at most ``max_bytes``: sets ``layer.sibling`` and the
    parent's ``forward`` (an :class:`ArmedForward` on the instance). A parent whose ``forward`` is already set
    on the instance by something else is left alone. Returns the groups (``"blocks.0.attn: q,k,v"``)."""
    by_parent: dict[str, list[tuple[str, ...]]] = {}
    for path, names in sibling_groups(model, _free_quant_linear):
        by_parent.setdefault(path, []).append(names)
    done = []
    for path, groups in by_parent.items():
        parent = model.get_submodule(path) if path else model
        before = parent.__dict__.get("forward")
        if before is not None and not isinstance(before, ArmedForward):
            continue
        made = []
        for names in groups:
            group = SiblingGroup(parent, names, max_bytes)
            for i, name in enumerate(names):
                parent._modules[name].sibling = (group, i)  # type: ignore[union-attr]
            made.append(group)
            done.append(f"{path}: {','.join(names)}")
        parent.forward = ArmedForward(parent, *(before.groups if before is not None else ()), *made)
    return done
