"""Dense copies: a layer whose every quantized path loses to ``F.linear`` runs ``F.linear`` on a dense 16-bit copy of
its weight, made once and kept on the weight, within an explicit byte budget.

On narrow layers at the row counts models run them (SDXL's 640 / 1280-wide attention projections, CLIP-L's), no
int8 or fp8 path beats cuBLAS bf16 in eager mode: the bf16 GEMM takes 8-30 µs, host-bound or too small for int8
to pay for its activation pass (H100 sweep, run 93: 16 of 114 rows at 0.69-0.96x bf16). Dequantizing once and
keeping the copy is the only way to match bf16 there. The copy costs 2 bytes per weight on top of the stored
byte, so copies are opt-in (``DispatchPolicy(copies=CopyBudget(limit_bytes))``, the node's ``dense_copy_mb``),
bounded by the budget, decided by the cost model (:func:`wants_copy`) and shown by the dispatch report. The
per-call cost model is a lone layer's: SDXL's whole step in ComfyUI's class ran 4% slower with copies on an H100,
where every admitted copy ran and cut those layers' GPU time by a quarter but the host-bound step paid more host
time (docs/PERFORMANCE.md, runs 119-122), another reason they are not on by default.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from comfyquant.runtime.kernels.backends import BackendChoice
from comfyquant.runtime.kernels.costs import NEAR_TIE
from comfyquant.runtime.kernels.registry import KernelBackend, KernelKind

# Copy where the cost model puts the best quantized path more than this fraction over bf16: the issue-12 bar
# (every layer >= 0.97x bf16). Closer calls keep the quantized path and its memory saving.
COPY_MARGIN = 0.03
# ... or where it calls the two a near-tie in eager (within ``costs.NEAR_TIE``: both host-bound by the table) and
# the quantized path's GPU time is more than this fraction over bf16's: back-to-back calls overlap host and GPU
# only in part, so the path with more GPU time falls behind (the rule ``costs.decide`` applies between quantized
# paths). Replayed on the H100 sweeps with each run's own table (runs 120, 125: tests/test_dense_copy.py) it
# copies five more rows over the two runs, each measured 0.68-0.90x bf16 on its quantized path (SDXL ff2 at 256
# rows, attn 1,280 at 1,024, CLIP fc1 at 1,024, CLIP attn at 4,096), and none at or over 0.97x; at 3% instead
# of 10% it also took Flux proj at 256 rows, a measured tie (0.99x).
COPY_GPU_MARGIN = 0.10
# ... or where that near-tie is host-bound on the quantized side (its modeled GPU time under its eager time): the
# host table is measured once, in one phase of the host, and the phase moves the two sides apart. The H100 tables
# read bf16 at 13.2-24.4 µs a call by process (runs 120-136) while a sweep in the same process timed its floor rows
# at 14.5-16; on the rows the table calls a host-bound tie the two-launch path measured 0.87-0.98x bf16 in three of
# four sweeps (Flux proj and SDXL ff0 at 256 rows). Replayed on runs 120, 125, 131 and 133
# (tests/test_dense_copy.py) it copies six more rows: four measured 0.87-0.95x on their quantized path, the others
# 0.98x and 1.03x (a copy runs ~1.0x there: within the bar either way).
NAME = "dense_copy"  # the backend name the choice and the dispatch report show
_ATTR = "_comfyquant_dense_copy"  # {dtype: dense [N, K]} on the stored weight tensor: the copies die with it
_CHUNK_BYTES = 64 << 20  # identity rows per dequantizing pass in dense_weight (bounds its transient memory)


@dataclass(eq=False)
class CopyBudget:
    """How many bytes of dense copies one model (one ``RuntimeOptions`` / policy) may keep; ``used_bytes`` counts
    the admitted ones, released when their weight tensor is freed (a model moved to another device makes new
    weights). Compared and hashed by identity: each model's budget is its own object."""

    limit_bytes: int
    used_bytes: int = 0
    _admitted: dict = field(default_factory=dict, repr=False)  # (id(w), dtype) -> bytes, while w lives

    def __post_init__(self) -> None:
        if self.limit_bytes < 0:
            raise ValueError(f"CopyBudget.limit_bytes must be >= 0, got {self.limit_bytes}")

    @property
    def layers(self) -> int:
        """How many copies are admitted now."""
        return len(self._admitted)

    def admit(self, w: torch.Tensor, dtype: torch.dtype, nbytes: int) -> bool:
        """Whether ``w`` may keep a ``dtype`` copy of ``nbytes``: yes if it already has one (asking again charges
        nothing) or the budget has room (then charged until ``w`` is freed)."""
        key = (id(w), dtype)
        if key in self._admitted:
            return True
        if self.used_bytes + nbytes > self.limit_bytes:
            return False
        self._admitted[key] = nbytes
        self.used_bytes += nbytes
        weakref.finalize(w, self._release, key)
        return True

    def _release(self, key: tuple) -> None:
        self.used_bytes -= self._admitted.pop(key, 0)

    def summary(self) -> str:
        """``"3 layers, 9.4 of 256.0 MiB"``."""
        return f"{self.layers} layers, {self.used_bytes / 2**20:.1f} of {self.limit_bytes / 2**20:.1f} MiB"


def wants_copy(choice: BackendChoice, margin: float = COPY_MARGIN, gpu_margin: float = COPY_GPU_MARGIN,
               host_ties: bool = True) -> bool:
    """Whether the cost model put ``choice`` (the best quantized path) more than ``margin`` over bf16 on its call,
    or called them a near-tie (within ``costs.NEAR_TIE``) with the quantized path's GPU time more than
    ``gpu_margin`` over bf16's (:data:`COPY_GPU_MARGIN`) or, with ``host_ties``, under its own eager time (a
    host-bound tie). False where no cost model decided (a pinned backend, a rule-based kind)."""
    if choice.us is None or choice.bf16_us is None:
        return False
    if choice.us > choice.bf16_us * (1.0 + margin):
        return True
    if choice.gpu_us is None or choice.bf16_gpu_us is None or choice.us < choice.bf16_us * (1.0 - NEAR_TIE):
        return False
    # a modeled eager near-tie with bf16: bf16's single launch takes a host-bound one, its lower GPU time the rest
    return (host_ties and choice.gpu_us < choice.us) or choice.gpu_us > choice.bf16_gpu_us * (1.0 + gpu_margin)


def copy_reason(choice: BackendChoice, budget: CopyBudget) -> str:
    """The dispatch report's line for a layer on its dense copy."""
    tie = ""
    if choice.us is not None and choice.bf16_us is not None and choice.us <= choice.bf16_us * (1.0 + COPY_MARGIN):
        tie = f" (a near-tie; GPU {choice.gpu_us:.0f} vs {choice.bf16_gpu_us:.0f} µs)"
    return (f"{NAME}: the cost model's best quantized path ({choice.name}) {choice.us:.0f} µs vs bf16 "
            f"{choice.bf16_us:.0f} µs a call{tie}; budget {budget.summary()}")


def has_copy(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``w`` keeps a ``dtype`` copy already."""
    return dtype in getattr(w, _ATTR, {})


def dense_weight(kk: KernelKind, w: torch.Tensor, scales: tuple, opts: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` in ``dtype`` with ``x @ dense^T`` the kind's weight-only path on x (its ``dequant`` backend, else
    its reference): computed by that path on identity rows, so a rotation, block scales or packing come out as
    the kind defines them, with no second copy of its dequantization rules."""
    b = kk.backends.get("dequant") or kk.backends[kk.reference]
    n, k = int(w.shape[0]), kk.in_features(w, opts)
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    step = max(1, min(k, _CHUNK_BYTES // max(1, k * out.element_size())))
    for k0 in range(0, k, step):
        rows = min(step, k - k0)
        eye = torch.zeros(rows, k, dtype=dtype, device=w.device)
        idx = torch.arange(rows, device=w.device)
        eye[idx, k0 + idx] = 1
        out[:, k0:k0 + rows] = b.impl(eye, w, scales, None, opts, dtype).t()
    return out


def copied_weight(kk: KernelKind, w: torch.Tensor, scales: tuple, opts: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``w``'s ``dtype`` copy, made on first use and kept on ``w``."""
    copies = getattr(w, _ATTR, None)
    if copies is None:
        copies = {}
        setattr(w, _ATTR, copies)
    dense = copies.get(dtype)
    if dense is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a dense copy cannot be made inside a CUDA graph capture (it would be recomputed at "
                               "every replay); the dispatcher uses only copies made before the capture")
        with torch.no_grad():
            dense = copies[dtype] = dense_weight(kk, w, scales, opts, dtype)
    return dense


def _bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def _impl(kk: KernelKind, x, w, scales, bias, opts, out_dtype):
    y = F.linear(x, copied_weight(kk, w, scales, opts, x.dtype), _bias(bias, x.dtype))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _plan(kk: KernelKind, x, w, scales, bias, opts, out_dtype, act, low_rank=None):
    if act or low_rank is not None or out_dtype != x.dtype:
        return None
    dense, b = copied_weight(kk, w, scales, opts, x.dtype), _bias(bias, x.dtype)
    if x.dim() == 2:  # F.linear's own 2-D case (addmm / mm on the weight's transpose, the same kernel and numbers)
        wt = dense.t()  # without its dispatch and transpose per call: ~0.5 µs of a host-bound 13.6 µs call
        if b is None:
            return lambda xx: torch.mm(xx, wt)
        return lambda xx: torch.addmm(b, xx, wt)
    return lambda xx: F.linear(xx, dense, b)


_BACKENDS: dict[str, KernelBackend] = {}  # kind name -> its dense-copy backend (made once: plan memos hold it)


def copy_backend(kk: KernelKind) -> KernelBackend:
    """The dense-copy backend of kind ``kk`` (not in the kind's own table: the dispatcher picks it only under a
    policy with a budget, and measured dispatch never times it)."""
    b = _BACKENDS.get(kk.name)
    if b is None or b.impl.args[0] is not kk:  # a kind registered again under the same name gets its own
        b = _BACKENDS[kk.name] = KernelBackend(functools.partial(_impl, kk), plan=functools.partial(_plan, kk),
                                               plan_takes_any=True)
    return b
