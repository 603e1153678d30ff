"""Compile the Triton launches the runtime makes for a GPU we do not have, on the CPU, and read what they need
(needs the triton package; used by ``tests/test_kernel_targets.py`` and ``benchmarks/kernel_targets_report.py``).

The device sessions run on H100 / H200 only, while most ComfyUI users run RTX 30 / 40 / 50 series cards (99 KB of
shared memory a block against Hopper's 227 KB). Here the host functions of ``triton_int8`` run on CPU tensors
with the device's facts faked (multiprocessors, compute capability, shared memory) and every launch recorded
instead of run (:func:`recorded_launches`); each distinct launch is then compiled by Triton for that compute
capability, as its JIT would specialize it (dtypes, 16-byte alignment, ints equal to 1 or multiples of 16), with
the ptxas Triton ships (:func:`shared_bytes`), and its shared memory read from the compiled kernel's metadata,
which is what Triton checks a launch against. The int8 attention's kernels, launched through Triton's own JIT
call, are recorded the same way. Gluon and TMA-descriptor launches (Hopper only) are not covered.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from comfyquant.runtime.kernels import launch
from comfyquant.runtime.kernels import triton_attention as ta
from comfyquant.runtime.kernels import triton_int8 as ti
from comfyquant.runtime.kernels import triton_quant as tq
from comfyquant.runtime.kernels.backends import FP8_CC
from comfyquant.runtime.kernels.configs import SMEM_BY_CC
from comfyquant.runtime.kernels.launch import FastKernel


class Target(NamedTuple):
    """A GPU: compute capability, multiprocessors, shared memory a block may take (opt-in)."""

    cc: tuple[int, int]
    sms: int
    smem: int


TARGETS = {
    "A100 (sm_80)": Target((8, 0), 108, SMEM_BY_CC[(8, 0)]),
    "RTX 3090 (sm_86)": Target((8, 6), 82, SMEM_BY_CC[(8, 6)]),
    "RTX 4090 (sm_89)": Target((8, 9), 128, SMEM_BY_CC[(8, 9)]),
    "RTX 5090 (sm_120)": Target((12, 0), 170, SMEM_BY_CC[(12, 0)]),
    "RTX 4060 (sm_89, 24 SMs)": Target((8, 9), 24, SMEM_BY_CC[(8, 9)]),
    "B200 (sm_100)": Target((10, 0), 148, SMEM_BY_CC[(10, 0)]),
}


class Launch(NamedTuple):
    fn: Any  # the JITFunction
    args: tuple
    warps: int
    stages: int
    grid: tuple = ()


_TYPES = {torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.float32: "fp32",
          torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


class _JitRecorder:
    """Stands for a ``@triton.jit`` function called as ``kernel[grid](*args, **kwargs)``: records the launch."""

    def __init__(self, fn: Any, record: list[Launch]) -> None:
        self.fn, self.record = fn, record

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch_(*args: Any, num_warps: int = 4, num_stages: int = 3, **kwargs: Any) -> None:
            full = (*args, *(kwargs[n] for n in self.fn.arg_names[len(args):]))
            self.record.append(Launch(self.fn, full, num_warps, num_stages, tuple(grid)))
        return launch_


ATTENTION_KERNELS = ("_attn_int8", "_attn_quant_blocks", "_attn_quant_v")


@contextlib.contextmanager
def recorded_launches(target: Target) -> Iterator[list[Launch]]:
    """Within the block the runtime's kernel modules see ``target``'s facts and every ``FastKernel`` launch is
    appended to the yielded list instead of run (the host functions still allocate their outputs)."""
    facts = {"device_facts": lambda device: (target.sms, target.cc[0]), "device_smem": lambda device: target.smem}
    saved = [(mod, name, getattr(mod, name)) for mod in (launch, ti, tq) for name in facts if hasattr(mod, name)]
    record: list[Launch] = []
    call = FastKernel.__call__

    def recording(self: FastKernel, grid: Any, args: Any, device: Any, *, num_warps: int, num_stages: int,
                  key: Any = None) -> None:
        record.append(Launch(self.fn, tuple(args), num_warps, num_stages, tuple(grid)))

    for mod, name, _ in saved:
        setattr(mod, name, facts[name])
    jits = [(name, getattr(ta, name)) for name in ATTENTION_KERNELS]
    for name, fn in jits:
        setattr(ta, name, _JitRecorder(fn, record))
    FastKernel.__call__ = recording  # type: ignore[method-assign]
    ti.pick_w8a8.cache_clear()  # (keyed by device, not by its facts)
    try:
        yield record
    finally:
        FastKernel.__call__ = call  # type: ignore[method-assign]
        for mod, name, f in saved:
            setattr(mod, name, f)
        for name, fn in jits:
            setattr(ta, name, fn)
        ti.pick_w8a8.cache_clear()


def specialization(fn: Any, args: tuple) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """(signature, constexprs, attributes) Triton's JIT gives ``fn`` for ``args``: constexprs and None by value,
    ints equal to 1 (unless ``do_not_specialize``) as constants, pointers and ints divisible by 16 marked so."""
    const = {p.num for p in fn.params if p.is_constexpr}
    free = {p.num for p in fn.params if getattr(p, "do_not_specialize", False)}
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    for i, (name, a) in enumerate(zip(fn.arg_names, args, strict=True)):
        if i in const or a is None or (isinstance(a, int) and not isinstance(a, bool) and a == 1 and i not in free):
            sig[name], consts[name] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            sig[name] = "*" + _TYPES[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if i not in free and a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(a).__name__} is not handled here")
    return sig, consts, attrs


def _frozen(d: dict) -> tuple:
    return tuple((k, tuple(tuple(x) for x in v) if isinstance(v, list) else v) for k, v in d.items())


@functools.cache
def _compiled_shared(fn: Any, sig: tuple, consts: tuple, attrs: tuple, warps: int, stages: int, cc: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=dict(sig), constexprs=dict(consts),
                    attrs={k: [list(x) for x in v] for k, v in attrs})
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
    return int(kernel.metadata.shared)


def shared_bytes(launch_: Launch, cc: tuple[int, int]) -> int:
    """Shared memory the launch's kernel, compiled for compute capability ``cc``, takes a block."""
    sig, consts, attrs = specialization(launch_.fn, launch_.args)
    return _compiled_shared(launch_.fn, tuple(sig.items()), tuple(consts.items()), _frozen(attrs), launch_.warps,
                            launch_.stages, cc[0] * 10 + cc[1])


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per compiled kernel they would need."""
    out: dict[tuple, Launch] = {}
    for la in launches:
        sig, consts, attrs = specialization(la.fn, la.args)
        out.setdefault((la.fn, _frozen(sig), _frozen(consts), _frozen(attrs), la.warps, la.stages), la)
    return list(out.values())


def describe(la: Launch) -> str:
    """``w8a16 16x128x256, 4 warps, 2 stages``: the kernel and its tile."""
    _, consts, _ = specialization(la.fn, la.args)
    tile = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in consts)
    return f"{la.fn.__name__} {tile}, {la.warps} warps, {la.stages} stages"


def model_layers() -> list[tuple[int, int]]:
    """(N, K) of the linears of Flux, SDXL, Wan 14B, T5-XXL and CLIP-L (the per-layer sweep's shapes)."""
    return [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (1280, 1280), (640, 640), (10240, 1280),
            (1280, 5120), (15360, 5120), (5120, 13824), (10240, 4096), (4096, 10240), (768, 768), (3072, 768)]


ROWS = (1, 16, 64, 256, 1024, 4096)


def drive(target: Target, layers: list[tuple[int, int]] | None = None, rows: tuple[int, ...] = ROWS) -> None:
    """Call every W8A8 / weight-only / one-launch / rotated / W4A8 / fp8 host function on every layer and row count,
    and the int8 attention (head sizes 64 and 128, p v in bf16 and fp8), inside :func:`recorded_launches`: nothing
    runs."""
    dt = torch.bfloat16
    calls: list[Callable[..., Any]] = [
        lambda x, w, s, b: ti.int8_linear(x, w, s, b, None, dt),
        lambda x, w, s, b: ti.fused_linear(x, w, s, b, dt),
        lambda x, w, s, b: ti.w8a16_linear(x, w, s, b, None, dt),
        lambda x, w, s, b: ti.int8_linear(x, w, s, b, 256, dt),  # int8-rot's default rotation group
        lambda x, w, s, b: ti.int8_linear(x, w, s, b, 64, dt),
    ]
    if target.cc >= FP8_CC:
        calls.append(lambda x, w, s, b: ti.fp8_linear(x, w.to(torch.float8_e4m3fn), s, b, None, dt))
    calls.append(lambda x, w, s, b: ti.w4a8_linear(x, w[:, : w.shape[1] // 2].contiguous(), s, b, 256, dt))
    calls.append(lambda x, w, s, b: ti.dequantize_weight(w, s, dt))  # (the dequant backend's kernel)
    if target.cc >= FP8_CC:  # (before sm_89 fp8 e4m3 dequantizes in torch: Triton has no e4m3 type there)
        calls.append(lambda x, w, s, b: ti.dequantize_weight(w.to(torch.float8_e4m3fn), s, dt))
    for n, k in layers or model_layers():
        g = torch.Generator().manual_seed(n + k)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s, b = torch.rand(n, generator=g) + 1e-3, torch.randn(n, generator=g).to(dt)
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dt)
            for call in calls:
                call(x, w, s, b)
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, 2048, d).to(dt) for _ in range(3))
        for pv_fp8 in (False, True) if target.cc >= FP8_CC else (False,):
            ta.int8_attention(q, k, v, pv_fp8=pv_fp8)
