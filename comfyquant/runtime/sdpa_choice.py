"""Exact attention on the faster of two kernels, chosen per call shape by timing both once per GPU.

ComfyUI 0.30 orders SDPA's backends FlashAttention-2 first. On Hopper cuDNN's fused attention ran every diffusion
call shape timed faster: 1.47-1.96x on an H100 (Flux, SDXL, SD3.5, Qwen-Image, Wan; docs/PERFORMANCE.md run 103);
others measured it slower on short head-64 calls (an H100 sweep in sglang's PR 30090). Both are exact attention:
their outputs differ by rounding (0.23% against float32 either way, GPU check ``attention_cudnn_first``). So
:class:`SdpaChooser` times the stock
kernel (SDPA as the caller runs it: under ComfyUI's backend order, or without its scope where that picks the same
kernel) and cuDNN's on the first call of each shape, checks that the two outputs agree, and keeps cuDNN only where
it is faster by :data:`MARGIN` and saves at least :data:`HOST_WEIGHT` times the host time it adds: the direct cuDNN op
costs 1-18 µs more host time a call than SDPA's FlashAttention call timed alone on an H100's host (runs 114 / 116),
and a host-bound model pays more than that: SDXL's step in ComfyUI's class ran 2.1 ms slower with its 70 long
attention calls on cuDNN than on FlashAttention (run 113, steady host: int8 1.06x stock bf16 against 1.11x), ~30 µs
a call, while its 60 calls of 1,024 tokens save 16-18 µs each on the GPU. Choices are kept in a file per GPU model
and torch / triton version, keyed with the cuDNN version (``measured.ChoiceCache``): later processes run the same
kernel on the same shape without timing, so the same inputs give the same outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from comfyquant.errors import UserError
from comfyquant.runtime.attention import ORDER_SUPPORTED
from comfyquant.runtime.kernels.backends import device_cache_file
from comfyquant.runtime.kernels.measured import Decision, drop_caches, open_cache

MIN_KEYS = 1024  # shorter calls: a few µs of GPU work, where timing could only pick by noise
MARGIN = 0.05  # cuDNN is kept where it takes at most 95% of the stock kernel's time (near-ties stay stock)
AGREE = 0.01  # relative L2 difference of the two outputs above which cuDNN's is not trusted (bf16 rounding: ~0.3%)
# the host time cuDNN adds a call, timed alone, counts this many times against the GPU time it saves: SDXL's step paid
# ~30 µs a cuDNN call (run 113) where the isolated loop timed 6-18 µs (runs 114 / 116)
HOST_WEIGHT = 4.0
ROUND_S = 0.02  # seconds of calls per timed round (at least one call)
ROUNDS = 3
CACHE_VERSION = 3  # 2: host time in the decision, the stock kernel timed as the caller runs it; 3: HOST_WEIGHT
CACHE_STEM = "attention"  # the choice file's name: attention-v<version>-<gpu>-<torch>-<triton>.json
STOCK, CUDNN = "stock", "cudnn"
RAISED = "cuDNN's kernel raised "  # how a decision's reason starts where the cuDNN call failed (logged as a warning)
logger = logging.getLogger("comfyquant.runtime")
# the op SDPA's cuDNN backend calls (torch 2.5+); calling it directly skips SDPA's selection and any backend scope
_CUDNN_OP = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """cuDNN's fused attention on ``[B, H, T, D]`` tensors (no mask, no dropout, not causal): SDPA's cuDNN path."""
    assert _CUDNN_OP is not None
    return _CUDNN_OP(q, k, v, None, False, 0.0, False, False, scale=scale)[0]


def stock_attention(order: Sequence[int] | None) -> Callable[..., torch.Tensor]:
    """SDPA as the caller runs it: inside ``sdpa_kernel(order, set_priority=True)`` where an order is given (what
    ComfyUI's wrapper sets), else SDPA's own choice."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        kw = {} if scale is None else {"scale": scale}
        if order is None or not ORDER_SUPPORTED:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        with sdpa_kernel([SDPBackend(b) for b in order], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return run


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` accumulated in float32 at least (inf where ``b`` is all zeros and ``a`` is not; NaN
    passes through), the difference taken one slice of dim 1 (a head of ``[B, H, T, D]``) at a time, so its
    temporary is a head's size, not the output's (Wan 480p: 8 MiB, not 335)."""
    num = den = 0.0
    acc = torch.promote_types(b.dtype, torch.float32)
    for i in range(a.shape[1] if a.dim() > 1 else 1):
        ai, bi = (a[:, i], b[:, i]) if a.dim() > 1 else (a, b)
        num += torch.linalg.vector_norm(ai - bi, dtype=acc).item() ** 2
        den += torch.linalg.vector_norm(bi, dtype=acc).item() ** 2
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def time_rounds(fns: dict[str, Callable[[], object]], clock: Callable[[], float] = time.perf_counter,
                sync: Callable[[], None] = torch.cuda.synchronize, rounds: int = ROUNDS,
                round_s: float = ROUND_S) -> tuple[dict[str, float], dict[str, float]]:
    """µs per call of each function: (synchronized wall time, what back-to-back calls pay when the GPU sets the pace;
    host time, the calls' issue before the synchronization, what they pay when the host does). One call each to
    size a round of about ``round_s``, then ``rounds`` rounds taking every function in turn, the best round each."""
    n: dict[str, int] = {}
    for name, fn in fns.items():
        sync()
        t = clock()
        fn()
        sync()
        n[name] = max(1, min(50, round(round_s / max(clock() - t, 1e-9))))
    wall = {name: math.inf for name in fns}
    host = dict(wall)
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = clock()
            for _ in range(n[name]):
                fn()
            issued = clock()
            sync()
            wall[name] = min(wall[name], (clock() - t) / n[name] * 1e6)
            host[name] = min(host[name], (issued - t) / n[name] * 1e6)
    return wall, host


def decide(stock: Callable[[], torch.Tensor], cudnn: Callable[[], torch.Tensor],
           clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = torch.cuda.synchronize,
           margin: float = MARGIN, agree: float = AGREE, host_weight: float = HOST_WEIGHT) -> Decision:
    """Compare the two kernels on one call: cuDNN where its output agrees with the stock kernel's within ``agree``,
    it is faster by ``margin`` and the time it saves a call is at least ``host_weight`` times the host time it adds
    (in a host-bound model the added host time is what a call costs more, and more than a loop of one call shows;
    in a GPU-bound one the saving is what it gains), else the stock kernel; the decision records both times, the
    host times and the agreement. A cuDNN call that raises (a cuDNN build that cannot run the shape after all)
    leaves the stock kernel, with why."""
    want = stock()
    try:
        got = cudnn()
    except RuntimeError as e:
        return Decision(backend=STOCK, skipped={CUDNN: f"{RAISED}{type(e).__name__}: {e}"[:300]})
    rel = relative_difference(got, want)
    del want, got
    d = Decision(backend=STOCK, notes={"relative_difference": f"{rel:.3e}"})
    if not rel <= agree:  # NaN too
        d.skipped[CUDNN] = f"output differs from the stock kernel's by {rel:.2%} (> {agree:.0%})"
        return d
    d.us, host = time_rounds({STOCK: stock, CUDNN: cudnn}, clock, sync)
    d.notes.update({f"host_us_{n}": f"{us:.1f}" for n, us in host.items()})
    saved, added = d.us[STOCK] - d.us[CUDNN], host[CUDNN] - host[STOCK]
    if d.us[CUDNN] > d.us[STOCK] * (1 - margin):
        return d
    if saved < host_weight * added:
        d.skipped[CUDNN] = (f"saves {saved:.0f} µs a call but adds {added:.0f} µs of host time (x{host_weight:g}): a "
                            "host-bound model would run slower")
        return d
    d.backend = CUDNN
    return d


def choice_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               order: Sequence[int] | None, scoped: bool = True) -> str:
    """What a choice depends on: shapes, strides (the kernels' layouts), dtype, scale, the stock backend order and
    whether the stock call runs in its scope (its host time), the cuDNN version (the cache file is per GPU model
    and torch / triton version already)."""
    dt = str(q.dtype).removeprefix("torch.")
    return (f"sdpa|q={list(q.shape)}:{list(q.stride())}|k={list(k.shape)}:{list(k.stride())}"
            f"|v={list(v.shape)}:{list(v.stride())}|{dt}|scale={scale}|order={None if order is None else list(order)}"
            f"{'' if scoped else ':unscoped'}|cudnn={torch.backends.cudnn.version()}")


def cache_path(device: torch.device, root: Path | None = None) -> Path:
    """Where ``device``'s attention choices are kept."""
    return device_cache_file(CACHE_STEM, CACHE_VERSION, device, root)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why a call cannot have a choice (None: it can): 4-D CUDA fp16 / bf16 tensors of one dtype, at least
    :data:`MIN_KEYS` keys, cuDNN attention enabled in SDPA's flags, inference (no autograd), eager (not traced), a
    torch with cuDNN attention."""
    if _CUDNN_OP is None:
        return "this torch has no cuDNN attention"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_cuda for t in (q, k, v)):
        return "not 4-D CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "not fp16 / bf16"
    if k.shape[2] < MIN_KEYS:
        return f"fewer than {MIN_KEYS} keys"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is disabled (torch.backends.cuda.enable_cudnn_sdp)"
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return "autograd or tracing"
    return None


def call_signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What a per-shape memo keys a call on: device, dtype, shapes and strides of q, k and v."""
    return q.device.index, q.dtype, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride()


def cudnn_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA's cuDNN backend can run this unmasked call (its own eligibility test)."""
    return bool(torch.backends.cuda.can_use_cudnn_attention(torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False,
                                                                                         False)))


# choices made or read in this process, by call signature: facts about this process's GPU and libraries (ComfyUI
# deep-copies model options, and the chooser with them, per sampling call)
_MEMO: dict[tuple, bool] = {}


class SdpaChooser:
    """Per call shape, cuDNN's attention where it is faster than the stock kernel (SDPA under ``order``): measured
    on the first call of a shape (:func:`decide`), kept in :func:`cache_path`'s file. ``unscoped(q, k, v)``: whether
    the caller runs this call's stock kernel as SDPA's plain call, without ``order``'s scope (``nodes.lean_attention``
    does where the scope would not change the kernel): the stock kernel is then timed so, its host time as paid.
    ``chosen`` counts the calls it ran on cuDNN, ``measured`` the shapes it timed."""

    def __init__(self, order: Sequence[int] | None, root: Path | None = None,
                 unscoped: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool] | None = None) -> None:
        self.order = None if order is None else tuple(int(b) for b in order)
        self.root = root
        self.unscoped = unscoped
        self.chosen = self.measured = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor | None:
        """cuDNN's output for this call where it is the choice; None where the stock kernel is (the caller runs it)."""
        if why_not(q, k, v) is not None:
            return None
        sig = (*call_signature(q, k, v), scale, self.order, self.root, self.unscoped is not None)
        use = _MEMO.get(sig)
        if use is None:
            use = self._choose(q, k, v, scale)
            if use is None:
                return None
            _MEMO[sig] = use
        if not use:
            return None
        self.chosen += 1
        return cudnn_attention(q, k, v, scale)

    def _choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> bool | None:
        """The cached or measured choice (True: cuDNN); None while a CUDA graph is being captured (no timing)."""
        cache = open_cache(cache_path(q.device, self.root), CACHE_VERSION)
        scoped = self.unscoped is None or not self.unscoped(q, k, v)
        key = choice_key(q, k, v, scale, self.order, scoped)
        known = cache.get(key)
        if known is not None:
            return known == CUDNN
        if torch.cuda.is_current_stream_capturing():
            return None
        if not cudnn_can_run(q, k, v):
            decision = Decision(backend=STOCK, skipped={CUDNN: "SDPA's cuDNN backend cannot run this call"})
        else:
            stock = stock_attention(self.order if scoped else None)
            decision = decide(lambda: stock(q, k, v, scale), lambda: cudnn_attention(q, k, v, scale))
            self.measured += 1
            _log(decision, q, k)
        try:
            cache.put(key, decision)
        except (OSError, UserError) as e:  # a read-only or full cache folder: the choice holds for this process
            logger.warning("comfyquant: attention choice not saved to %s (%s); kept for this process", cache.path, e)
        return decision.backend == CUDNN


class CudnnFirst:
    """The chooser of the ``cudnn`` attention mode: cuDNN's kernel on every call it can run (no timing), through the
    direct op (no backend-order scope); ``chosen`` counts those calls. Called as :class:`SdpaChooser` is."""

    def __init__(self) -> None:
        self.chosen = 0
        self._can: dict[tuple, bool] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor | None:
        """cuDNN's output for this call, or None where it cannot run it (the caller runs the stock kernel)."""
        if why_not(q, k, v) is not None:
            return None
        sig = call_signature(q, k, v)
        can = self._can.get(sig)
        if can is None:
            can = self._can[sig] = cudnn_can_run(q, k, v)
        if not can:
            return None
        self.chosen += 1
        return cudnn_attention(q, k, v, scale)


def _log(decision: Decision, q: torch.Tensor, k: torch.Tensor) -> None:
    """One line per measured shape (a cuDNN error as a warning): what ran and why."""
    why = []
    for n, us in decision.us.items():
        host = decision.notes.get(f"host_us_{n}")
        why.append(f"{n} {us:.0f} µs" + (f" (host {host})" if host is not None else ""))
    why += list(decision.skipped.values())
    failed = decision.skipped.get(CUDNN, "").startswith(RAISED)
    logger.log(logging.WARNING if failed else logging.INFO, "comfyquant: attention %s x %d keys x %d: %s (%s)",
               list(q.shape[:2]), k.shape[2], q.shape[-1], decision.backend, "; ".join(why))


def forget() -> None:
    """Drop this process's memo of choices and open cache files (tests; a cache file deleted to re-measure)."""
    _MEMO.clear()
    drop_caches(CACHE_STEM + "-")
