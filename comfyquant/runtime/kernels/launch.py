"""Low-host-overhead Triton launches: after the first (compiling) launch, call the compiled kernel's C launcher.

``JITFunction.__getitem__(grid)(...)`` binds arguments, computes the specialization key, looks up the kernel
cache and checks globals on every call: ~40-50 µs of host time per launch on the H200 host we measured, more
than many of the GEMMs take on the GPU. :class:`FastKernel` keeps the ``CompiledKernel`` per specialization key
and calls ``CompiledKernel.run`` (the generated C launcher) directly with all arguments in signature order.

The key covers what Triton specializes on: every constexpr value, num_warps / num_stages, each tensor's dtype
and 16-byte alignment, and each int argument's ``== 1`` / ``% 16 == 0`` properties (arguments listed in
``do_not_specialize`` of the jit decorator are not specialized by Triton and may vary freely). Under
``TRITON_INTERPRET=1`` (CPU development) every call goes through the interpreter.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from comfyquant.runtime.kernels.backends import FP8_CC
from comfyquant.runtime.kernels.configs import HOPPER_SMEM, SMEM_BY_CC

logger = logging.getLogger("comfyquant.runtime")


def _spec(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0)
    if isinstance(a, float):
        return float
    base = getattr(a, "base", None)  # host TensorDescriptor
    if isinstance(base, torch.Tensor):
        return ("desc", base.dtype, tuple(a.block_shape), base.data_ptr() % 16 == 0)
    return a


@functools.lru_cache(maxsize=16)
def _device_facts(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


@functools.lru_cache(maxsize=16)
def _device_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    try:  # (a torch without the property) what Triton itself checks a launch against
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except (ImportError, AttributeError, KeyError, RuntimeError):
        return SMEM_BY_CC.get((props.major, props.minor), min(SMEM_BY_CC.values()))


def device_smem(device: torch.device) -> int:
    """Bytes of shared memory a block may take on ``device`` (opt-in: what Triton refuses launches beyond; 227 KB
    on an H100 / H200, 99 KB on RTX 30 / 40 / 50 series cards); off CUDA (the interpreter) an H100's."""
    if device.type != "cuda":
        return HOPPER_SMEM
    return _device_smem(device.index if device.index is not None else torch.cuda.current_device())


def hopper_class(device: torch.device) -> bool:
    """Whether ``device`` takes the tiles, persistent grids and TMA paths tuned on the H200: compute capability 9+
    with a Hopper's shared memory (not the 99 KB of consumer Blackwell, sm_120)."""
    return device_facts(device)[1] >= 9 and device_smem(device) >= HOPPER_SMEM


def describe_device(device: torch.device) -> str:
    """One line on what the kernels do on ``device`` (for logs and bug reports): its compute capability, SMs and
    shared memory, and which tile family runs there."""
    if device.type != "cuda":
        return f"{device.type}: reference kernels (no Triton launches)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    smem = device_smem(device)
    head = f"{props.name}: sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {smem // 1024} KB shared"
    if hopper_class(device):
        return f"{head} memory a block: Hopper tiles, persistent grid, TMA" + (", Gluon GEMM" if props.major == 9 else "")
    fp8 = "fp8 matrix units" if (props.major, props.minor) >= FP8_CC else "no fp8 (fp8 weights dequantize in torch)"
    return f"{head} memory a block: Ampere tiles with the stages that fit, {fp8}"


def device_facts(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, compute capability major) of ``device``; off CUDA (the interpreter on the CPU, for
    development) an H100/H200-sized grid."""
    if device.type != "cuda":
        return 132, 9
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else
                                              torch.cuda.current_device())


def stream_id(device: torch.device) -> int:
    """The current stream's raw handle on ``device`` (what launches are issued on); 0 off CUDA."""
    return _stream(device) if device.type == "cuda" else 0


def _param_kinds(fn: Any) -> tuple[frozenset[int], frozenset[int]]:
    """(constexpr positions, do_not_specialize positions) of a JITFunction; empty under the interpreter."""
    params = getattr(fn, "params", None) or ()
    const = frozenset(p.num for p in params if p.is_constexpr)
    free = frozenset(p.num for p in params if getattr(p, "do_not_specialize", False))
    return const, free


Fire = Callable[..., None]  # fire(stream, *args): one prepared launch of a fixed grid


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1


def _scratchless_launch(run: Any) -> Any | None:
    """The launcher's ``launch`` (what ``CudaLauncher.__call__`` calls) when the kernel needs no per-launch
    scratch buffers, so calling it directly skips only Python; None otherwise."""
    launch = getattr(run, "launch", None)
    if launch is None or getattr(run, "global_scratch_size", 1) != 0 or getattr(run, "profile_scratch_size", 1) != 0:
        return None
    return launch


def _direct(ck: Any, grid: tuple[int, int, int]) -> Fire:
    """``fire(stream, *args)`` straight into the compiled kernel's C launcher, skipping the Python wrapper that
    allocates scratch buffers per call (ours need none; kernels that do keep that wrapper)."""
    g0, g1, g2 = grid
    run, fn, meta = ck.run, ck.function, ck.packed_metadata
    launch = _scratchless_launch(run)
    if launch is None:
        return lambda stream, *args: run(g0, g1, g2, stream, fn, meta, None, None, None, *args)
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    return lambda stream, *args: launch(g0, g1, g2, stream, fn, coop, pdl, None, None, meta, None, None, None,
                                        *args)


TmaFire = tuple[Callable[..., None], Callable[[Any, int], list]]


def _tma_direct(ck: Any, grid: tuple[int, int, int]) -> TmaFire | None:
    """For a kernel with host tensor-descriptor arguments: ``(fire(stream, *flat_args), expand(desc, i))``, where
    ``expand`` turns the i-th descriptor argument into the launcher's flat form (Triton's
    ``make_tensordesc_arg``: a ``CUtensorMap`` from ``fill_tma_descriptor`` plus shape and strides) and ``fire``
    takes the kernel's arguments with every descriptor already expanded. Triton's own wrapper expands every
    descriptor on every launch (the H200 profile: the larger part of a W8A8 layer's host time); a caller that
    keeps the weight's expansion, and the activation's per buffer address, skips that. None where Triton's
    launcher is not the shape this relies on (then the plain launch path is used)."""
    import inspect

    run = ck.run
    launch = _scratchless_launch(run)
    if launch is None:
        return None
    try:
        free = inspect.getclosurevars(launch).nonlocals
    except TypeError:  # a C function: no descriptor wrapper around it
        return None
    raw, meta, indices = free.get("launcher"), free.get("tensordesc_meta"), free.get("tensordesc_indices")
    if raw is None or indices is None or meta is None:
        return None
    try:
        from triton.backends.nvidia.driver import make_tensordesc_arg
    except ImportError:
        return None
    g0, g1, g2 = grid
    fn, pm, coop, pdl = ck.function, ck.packed_metadata, run.launch_cooperative_grid, run.launch_pdl
    order = sorted(indices)

    def fire(stream: int, *flat: Any) -> None:
        raw(g0, g1, g2, stream, fn, coop, pdl, None, None, pm, None, None, None, *flat)

    def expand(desc: Any, i: int) -> list:
        return make_tensordesc_arg(desc, meta[order.index(i)])

    return fire, expand


def _interpreted(fn: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(fn, InterpretedFunction)


class FastKernel:
    """Launch ``fn`` (a ``@triton.jit`` function) with every argument positional, constexprs included."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        # constexprs are keyed by value; do_not_specialize ints (M) not at all; the rest by what Triton
        # specializes on (dtype, 16-byte alignment, == 1, % 16)
        self.const, self.varying = _param_kinds(fn)
        self._compiled: dict[tuple, Any] = {}
        # launch key -> whether the descriptor-expanding direct launch (:meth:`prepared_tma`) was checked
        # bit-equal to Triton's own launch of that compiled kernel (checked once per key, not per layer)
        self.direct_checked: dict[tuple, bool] = {}

    def direct_agrees(self, key: tuple, direct: Callable[[], Any], general: Callable[[], Any], what: str) -> bool:
        """Whether a plan's direct launch (:meth:`prepared_tma`) gives what Triton's own launch gives (``direct()``
        against ``general()``, the same kernel on the same inputs: bit-equal), checked once per compiled kernel
        (``key``), not per layer; a disagreement (a Triton whose launcher differs) keeps Triton's launch and is
        said once, naming ``what`` ("W8A8 plan for N=3072 K=3072")."""
        ok = self.direct_checked.get(key)
        if ok is None:
            ok = self.direct_checked[key] = bool(torch.equal(direct(), general()))
            if not ok:
                logger.warning("%s: the direct launch disagreed with Triton's launch; using Triton's (slower host "
                               "path)", what)
        return ok

    def key(self, args: Sequence[Any], num_warps: int, num_stages: int) -> tuple:
        const, varying = self.const, self.varying
        return (num_warps, num_stages, *(a if i in const else None if i in varying else _spec(a)
                                         for i, a in enumerate(args)))

    def prepared(self, grid: tuple[int, ...], args: Sequence[Any], *, num_warps: int, num_stages: int,
                 key: tuple) -> Fire | None:
        """``fire(stream, *args)`` for later launches with this grid and arguments that specialize as ``args``
        do (same ``key``, as :meth:`__call__` takes it), or None until a launch compiled it. Under Triton's
        interpreter (CPU development) ``fire`` runs the interpreter, so the callers' argument handling is
        tested on the CPU too."""
        g = _grid3(grid)
        ck = self._compiled.get((num_warps, num_stages, key))
        if ck is not None:
            return _direct(ck, g)
        if _interpreted(self.fn):
            fn = self.fn
            return lambda stream, *a: fn[g](*a, num_warps=num_warps, num_stages=num_stages)
        return None

    def prepared_tma(self, grid: tuple[int, ...], *, num_warps: int, num_stages: int, key: tuple) -> TmaFire | None:
        """:func:`_tma_direct` of the compiled kernel for ``key`` (None until a launch compiled it, and under
        the interpreter)."""
        ck = self._compiled.get((num_warps, num_stages, key))
        if ck is None:
            return None
        return _tma_direct(ck, _grid3(grid))

    def _first_launch(self, grid: tuple[int, ...], args: Sequence[Any], num_warps: int, num_stages: int) -> Any:
        """Compile and launch through Triton; where the device's shared memory cannot hold ``num_stages`` stages
        of the tile (Triton's ``OutOfResources``: a GPU whose limit the tile tables did not foresee), the same
        tile with fewer stages, said once per kernel and tile. The compiled kernel is kept under the requested
        stages (the callers' keys), so later launches and plans take it."""
        from triton.runtime.errors import OutOfResources

        stages, refused = num_stages, None
        while True:
            try:
                ck = self.fn[grid](*args, num_warps=num_warps, num_stages=stages)
            except OutOfResources as e:
                if stages <= 1:
                    raise
                stages, refused = stages - 1, e
                continue
            if refused is not None:
                logger.warning("comfyquant: %s runs with %d pipeline stages, not its tile table's %d, on this GPU "
                               "(%s); perhaps slower than a tile made for it",
                               getattr(self.fn, "__name__", "a kernel"), stages, num_stages, refused)
            return ck

    def __call__(self, grid: tuple[int, ...], args: Sequence[Any], device: torch.device, *,
                 num_warps: int, num_stages: int, key: tuple | None = None) -> None:
        """Launch; ``key``: the caller's own tuple of everything Triton specializes these args on (cheaper than
        the generic :meth:`key`, ~30 µs for 20 arguments on a slow host); None computes the generic one."""
        g0, g1, g2 = _grid3(grid)
        if g0 * g1 * g2 == 0:
            return
        key = self.key(args, num_warps, num_stages) if key is None else (num_warps, num_stages, key)
        ck = self._compiled.get(key)
        if ck is None:
            ck = self._first_launch(grid, args, num_warps, num_stages)
            if ck is not None and hasattr(ck, "run") and hasattr(ck, "packed_metadata"):
                self._compiled[key] = ck  # interpreter mode returns None: stays on the slow path
            return
        # launch_metadata and the profiler's enter/exit hooks: None (profiling hooks see the slow path only)
        ck.run(g0, g1, g2, _stream(device), ck.function, ck.packed_metadata, None, None, None, *args)
