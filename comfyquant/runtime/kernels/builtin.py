"""The built-in kernel kinds (``int8``, ``int8_block``, ``fp8``, ``int4_rot``): conventions, checks, backends.

Conventions (``scales`` tuple / ``opts`` tuple, what the runtime layouts pass):
  - ``int8``: w int8 [N,K]; scales=(weight_scale scalar or [N,1]/[N] fp32,); opts=(convrot_group or 0,)
  - ``int8_block``: w int8 [N,K]; scales=(weight_scale [ceil(N/b), ceil(K/b)],); opts=(b,)
  - ``fp8``: w float8_e4m3fn/e5m2 [N,K]; scales=(weight_scale, input_scale or None); opts=()
  - ``int4_rot``: w int8 [N,K/2] (two int4 per byte, comfy-kitchen order); scales=(weight_scale per row fp32,);
    opts=(convrot_group,)
Backends import the Triton / fp8 modules lazily, so the CPU path never imports triton.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from comfyquant.errors import UserError
from comfyquant.quant.hadamard import is_power_of_4
from comfyquant.runtime.kernels import int4, reference
from comfyquant.runtime.kernels.acts import MODULATED_MAX_K
from comfyquant.runtime.kernels.backends import FP8_CC, BackendChoice, device_capability, triton_available
from comfyquant.runtime.kernels.configs import rows_shape
from comfyquant.runtime.kernels.registry import KernelBackend, KernelKind, needs_cuda, register_kernel_kind

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_TRITON = needs_cuda((8, 0), triton=True)
_TRITON_FP8 = needs_cuda(FP8_CC, triton=True)  # fp8 x fp8 tl.dot: Ada / Hopper and later
_FP8_MM = needs_cuda(FP8_CC)


def _opt(opts: tuple, i: int) -> int:
    return int(opts[i]) if len(opts) > i else 0


# ---- int8 -----------------------------------------------------------------------------------------------------
def _int8_torch(x, w, scales, bias, opts, out_dtype):
    return reference.int8_linear_ref(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype)


def _fast_dequant(x: torch.Tensor, wdtype: torch.dtype) -> bool:
    """Whether the Triton dequantize kernel runs weights stored as ``wdtype`` for ``x``'s device: CUDA sm_80+, and for fp8 e4m3 storage
    sm_89+ (Triton 3.6 has no e4m3 type before Ada: "fp8e4nv not supported in this architecture", found by the
    offline compiles of ``tests/test_kernel_targets.py``); elsewhere torch dequantizes (any GPU converts fp8)."""
    if x.device.type != "cuda" or not triton_available():
        return False
    cap = device_capability(x.device)
    return cap is not None and cap >= (FP8_CC if wdtype == torch.float8_e4m3fn else (8, 0))


def _int8_dequant(x, w, scales, bias, opts, out_dtype):
    if _fast_dequant(x, w.dtype):  # one dequantize kernel + cuBLAS
        from comfyquant.runtime.kernels import triton_int8

        return triton_int8.dequant_linear(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype)
    return reference.dequant_linear(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype)


def _int8_fused(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, kblock=False, norm=None):
    """The one-launch W8A8 kernel; ``kblock`` (backend ``triton_fused_kblock``): activation scales per row and
    128 columns, no absmax pass first; pinned only until its speed is measured on a GPU (docs/KERNEL_NOTES.md)."""
    from comfyquant.runtime.kernels import triton_int8

    if _opt(opts, 0):
        name = "triton_fused_kblock" if kblock else "triton_fused"
        raise UserError(f"backend '{name}' has no rotation; rotated (convrot) int8 layers use 'triton'")
    return triton_int8.fused_linear(x, w, scales[0], bias, out_dtype, low_rank=low_rank, act=act, kblock=kblock,
                                    norm=norm)


def _int8_triton(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_int8

    return triton_int8.int8_linear(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype, low_rank=low_rank,
                                   act=act, norm=norm)


def _int8_w8a16(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_int8

    return triton_int8.w8a16_linear(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype,
                                    low_rank=low_rank, act=act, norm=norm)


def _plan_int8_triton(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    return triton_plans.plan_int8(x, w, scales[0], bias, _opt(opts, 0) or None, out_dtype, act, low_rank, norm)


def _plan_int8_fused(x, w, scales, bias, opts, out_dtype, act, low_rank=None, kblock=False, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    return None if _opt(opts, 0) else triton_plans.plan_fused(x, w, scales[0], bias, out_dtype, act, low_rank,
                                                              kblock=kblock, norm=norm)


def _resident_requires(device: torch.device) -> str | None:
    """The resident kernel runs on sm_90 (its wgmma code is Hopper's) with Triton's Gluon."""
    why = _TRITON(device)
    if why is not None:
        return why
    cap = device_capability(device)
    if cap[0] != 9:
        return f"needs an sm_90 GPU (Hopper wgmma), got {cap[0]}.{cap[1]}"
    return None if _ws_available() else "needs Triton's Gluon (triton >= 3.6)"


def resident_runs(x: torch.Tensor) -> bool:
    """Whether the resident kernel is a candidate for ``x``: 16-bit activations (its only inputs and outputs; a
    model run in float32 keeps the other paths) on a device it runs on."""
    return x.dtype in (torch.bfloat16, torch.float16) and _resident_requires(x.device) is None


def _resident_refusal(w, opts, x, out_dtype, name: str = "triton_resident", refusal=None) -> None:
    """One line for a call backend ``name`` (a resident kernel) cannot take: a rotated weight, or its kernel's
    ``refusal`` (16-bit activations, rows up to its width; None: ``gluon_resident``'s)."""
    if refusal is None:
        from comfyquant.runtime.kernels.gluon_resident import refusal
    if _opt(opts, 0):
        raise UserError(f"backend '{name}' has no rotation; rotated (convrot) int8 layers use 'triton'")
    why = refusal(x, w, out_dtype)
    if why is not None:
        raise UserError(f"backend '{name}' {why}")


def _int8_resident(x, w, scales, bias, opts, out_dtype):
    """The resident one-launch W8A8 kernel (``gluon_resident``: the row block's codes in shared memory, every
    column tile run against them; bit-equal to the two-launch path, H100 run 149)."""
    from comfyquant.runtime.kernels.gluon_resident import resident_w8a8

    _resident_refusal(w, opts, x, out_dtype)
    return resident_w8a8(x, w, scales[0], bias, out_dtype)


def _plan_int8_resident(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
    from comfyquant.runtime.kernels.gluon_resident import plan_resident

    if _opt(opts, 0) or act or low_rank is not None:
        return None
    return plan_resident(x, w, scales[0], bias, out_dtype)


def _int8_resident_ws(x, w, scales, bias, opts, out_dtype):
    """The warp-specialized resident kernel (``gluon_resident_ws``: 128-row blocks, the quantization overlapping
    the block's MMAs, K up to 1,280); pinned only until a GPU has checked and timed it."""
    from comfyquant.runtime.kernels.gluon_resident_ws import refusal, resident_ws_w8a8

    _resident_refusal(w, opts, x, out_dtype, "triton_resident_ws", refusal)
    return resident_ws_w8a8(x, w, scales[0], bias, out_dtype)


def _plan_int8_resident_ws(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
    from comfyquant.runtime.kernels.gluon_resident_ws import plan_resident_ws

    if _opt(opts, 0) or act or low_rank is not None:
        return None
    return plan_resident_ws(x, w, scales[0], bias, out_dtype)


def _unrotated(scales: tuple, opts: tuple) -> bool:
    """An int8 weight stored unrotated: its activation quantizer is the block kernel, which folds a norm."""
    return not _opt(opts, 0)


def _rotated(scales: tuple, opts: tuple) -> bool:
    """An int8 weight stored rotated: the weight-only path's rotation pass (the row kernel) folds a norm; an
    unrotated weight-only call reads x as given."""
    return bool(_opt(opts, 0))


def _any_int8(scales: tuple, opts: tuple) -> bool:
    """The W8A8 / W4A8 paths' quantizers fold a norm either way (the block kernel unrotated, the row kernel
    rotated), and int4_rot's weight-only path in its rotation pass."""
    return True


def _dynamic(scales: tuple, opts: tuple) -> bool:
    """An fp8 weight without a static input scale: per-row activation scales, which fold a norm."""
    return len(scales) < 2 or scales[1] is None


def _mod_any(scales: tuple, opts: tuple, m: int, n: int, k: int) -> bool:
    """The W8A8 / W4A8 paths fold a modulated LayerNorm into their quantizer (the block kernel unrotated, the row
    kernel before its rotation), and int4_rot's weight-only path into its rotation pass, on rows a kernel holds
    whole."""
    return k <= MODULATED_MAX_K


def _mod_rotated(scales: tuple, opts: tuple, m: int, n: int, k: int) -> bool:
    """int8's weight-only path on a rotated weight folds it into its rotation pass (an unrotated one reads x as
    given)."""
    return bool(_opt(opts, 0)) and k <= MODULATED_MAX_K


def _mod_rows(scales: tuple, opts: tuple, m: int, n: int, k: int) -> bool:
    """The one-launch int8 path (unrotated weights) folds it where the row-block kernel runs (its quantization
    share is the block kernel's), not the per-tile kernel of fewer rows."""
    return not _opt(opts, 0) and k <= MODULATED_MAX_K and rows_shape(m, n, k)


def _mod_dynamic(scales: tuple, opts: tuple, m: int, n: int, k: int) -> bool:
    """fp8 with per-row activation scales (the block kernel) on rows held in registers."""
    return _dynamic(scales, opts) and k <= MODULATED_MAX_K


def _plan_w8a16(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    group = _opt(opts, 0)
    if not group:
        if norm is not None:
            raise ValueError("an unrotated weight-only plan has no pass to fold a norm into")
        return triton_plans.plan_w8a16(x, w, scales[0], bias, out_dtype, act, low_rank)
    if low_rank is not None:
        return None
    # convrot: the rotation pass (with the input activation or norm), then the unrotated plan on its output
    return triton_plans.plan_rotated(x, group, act,
                                     lambda r: triton_plans.plan_w8a16(r, w, scales[0], bias, out_dtype, 0, None),
                                     norm)


def _plan_dequant(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
    from comfyquant.runtime.kernels import triton_plans

    if act or low_rank is not None or not _fast_dequant(x, w.dtype):
        return None
    if _opt(opts, 0):  # convrot: the rotation pass, then the unrotated plan on its output
        return triton_plans.plan_rotated(x, _opt(opts, 0), 0,
                                         lambda r: triton_plans.plan_dequant(r, w, scales[0], bias, out_dtype))
    return triton_plans.plan_dequant(x, w, scales[0], bias, out_dtype)


def _plan_fp8_triton(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    return triton_plans.plan_fp8(x, w, scales[0], bias, out_dtype, act, low_rank,
                                 scales[1] if len(scales) > 1 else None, norm)


def _plan_scaled_mm(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    if low_rank is not None or (len(scales) > 1 and scales[1] is not None):  # static input scale: general path
        return None
    return triton_plans.plan_scaled_mm(x, w, scales[0], bias, out_dtype, act, norm)


def check_row_scale(what: str, w_scale: torch.Tensor | None, n: int) -> None:
    """A weight scale must be a scalar, ``[n, 1]`` or ``[n]``."""
    if w_scale is None or w_scale.numel() not in (1, n) or (
            w_scale.numel() == n and w_scale.shape not in ((n, 1), (n,))):
        shape = None if w_scale is None else tuple(w_scale.shape)
        raise UserError(f"{what}: weight_scale shape {shape} must be a scalar, [{n}, 1] or [{n}]")


def _check_rot_group(what: str, group: int, k: int) -> None:
    if group and (not is_power_of_4(group) or group < 4 or k % group):
        raise UserError(f"{what}: convrot group size {group} must be a power of 4 dividing in_features {k}")


def _check_int8(x, w, scales, opts) -> None:
    if w.dtype != torch.int8:
        raise UserError(f"int8_linear: weight must be int8, got {w.dtype}")
    check_row_scale("int8_linear", scales[0] if scales else None, w.shape[0])
    _check_rot_group("int8_linear", _opt(opts, 0), w.shape[1])


def _m(x: torch.Tensor, k: int) -> int:
    return x.numel() // k if k else 0


def decide_paths(m: int, n: int, k: int, group: int, policy, costs, graph: bool,
                 paths: tuple[tuple[str, str], ...], rank: int = 0, fusing: tuple[str, ...] = ()) -> BackendChoice:
    """The cheapest of ``paths`` ((cost-model path, backend name) pairs) by the cost table ``costs`` (a
    ``costs.DeviceCosts``), among those ``policy`` allows; ``rank`` > 0: with a low-rank term, which the
    ``fusing`` cost-model paths add in their epilogue. Pure: the device facts come in as arguments."""
    from comfyquant.runtime.kernels.costs import decide, path_us

    allow = policy.allow if policy is not None else ()
    names = dict(paths)
    cands = tuple(p for p, b in paths if not allow or b in allow) or tuple(names)
    mode = "graph" if graph else "eager"
    best, reason = decide(cands, m, n, k, costs, mode, group, rank, fusing)
    return BackendChoice(names[best], reason, path_us(best, m, n, k, costs, mode, group, rank, best in fusing),
                         path_us("bf16", m, n, k, costs, mode, 0, rank),
                         path_us(best, m, n, k, costs, "graph", group, rank, best in fusing),
                         path_us("bf16", m, n, k, costs, "graph", 0, rank))


def _costs(x: torch.Tensor, policy):
    from comfyquant.runtime.kernels.calibrate import device_costs

    return policy.costs if policy is not None and policy.costs is not None else device_costs(x.device)


def _graph(policy) -> bool:
    return (policy is not None and policy.mode == "graph") or torch.cuda.is_current_stream_capturing()


def cost_choice(x: torch.Tensor, n: int, k: int, group: int, policy, paths: tuple[tuple[str, str], ...]
                ) -> BackendChoice:
    """The cheapest of ``paths`` ((cost-model path, backend name) pairs) by the device's cost model."""
    return decide_paths(_m(x, k), n, k, group, policy, _costs(x, policy), _graph(policy), paths)


_INT8_PATHS = (("triton", "triton"), ("triton_fused", "triton_fused"), ("triton_w8a16", "triton_w8a16"),
               ("dequant", "dequant"))
# the resident one-launch kernel (sm_90 with Gluon): a candidate where its backend runs, for unrotated layers
# without a low-rank term (it has neither); the cost model prices it on the narrow layers only
# (``costs.RESIDENT_PRICED_MAX_K``)
RESIDENT_PATH = ("resident", "triton_resident")


def int8_paths(group: int, rank: int = 0, resident: bool = False) -> tuple[tuple[str, str], ...]:
    """The int8 kind's candidate (cost-model path, backend) pairs: no one-launch W8A8 kernel for a rotated layer
    (it has no rotation); a rotated layer with a LoRA's low-rank term keeps to the W8A8 path, whose plan carries
    the term: the paths that rotate apart have no plan with one, so every call would run their general path.
    ``resident``: the device runs the resident kernel (:data:`RESIDENT_PATH`, unrotated layers without a term)."""
    if not group:
        return (*_INT8_PATHS, RESIDENT_PATH) if resident and not rank else _INT8_PATHS
    if rank:
        return (("triton", "triton"),)
    return tuple(p for p in _INT8_PATHS if p[1] != "triton_fused")


def _choose_int8(x, n, k, opts, policy, rank: int = 0) -> BackendChoice:
    cap = device_capability(x.device)
    if cap is None:
        return BackendChoice("torch", f"{x.device.type}: pure-torch reference path")
    if not triton_available() or cap < (8, 0):
        return BackendChoice("torch", f"sm_{cap[0]}{cap[1]}: no triton int8 path; torch._int_mm")
    group = _opt(opts, 0)
    return cost_choice(x, n, k, group, policy, int8_paths(group, rank, resident_runs(x)))


# ---- int8_block -----------------------------------------------------------------------------------------------
def _block_torch(x, w, scales, bias, opts, out_dtype):
    return reference.int8_block_linear_ref(x, w, scales[0], _opt(opts, 0), bias, out_dtype)


def _block_dequant(x, w, scales, bias, opts, out_dtype):
    block = _opt(opts, 0)
    if _fast_dequant(x, w.dtype):  # one dequantize kernel + cuBLAS
        from comfyquant.runtime.kernels import triton_int8

        return triton_int8.dequant_block_linear(x, w, scales[0], block, bias, out_dtype)
    n, k = w.shape
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    s = scales[0].to(dt).repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return torch.nn.functional.linear(x.to(dt), w.to(dt) * s, None if bias is None else bias.to(dt)).to(out_dtype)


def _plan_block_dequant(x, w, scales, bias, opts, out_dtype, act, low_rank=None):
    from comfyquant.runtime.kernels import triton_plans

    if act or low_rank is not None or not _fast_dequant(x, w.dtype):
        return None
    return triton_plans.plan_dequant(x, w, scales[0], bias, out_dtype, _opt(opts, 0))


def _check_block(x, w, scales, opts) -> None:
    what = "int8_block_linear"
    if w.dtype != torch.int8:
        raise UserError(f"{what}: weight must be int8, got {w.dtype}")
    block = _opt(opts, 0)
    if block < 1:
        raise UserError(f"{what}: block size must be positive, got {block}")
    n, k = w.shape
    want = (-(-n // block), -(-k // block))
    got = None if not scales or scales[0] is None else tuple(scales[0].shape)
    if got != want:
        raise UserError(f"{what}: weight_scale shape {got} != {want} for weight [{n}, {k}] with block {block}")


def _choose_block(x, n, k, opts, policy) -> BackendChoice:
    if device_capability(x.device) is None:
        return BackendChoice("torch", f"{x.device.type}: pure-torch reference path")
    if _fast_dequant(x, torch.int8):
        return BackendChoice("dequant", "int8 block-wise: dequantize kernel (a scale per tile) + cuBLAS; the "
                                        "reference runs one torch._int_mm per K block")
    return BackendChoice("torch", "int8 block-wise: per-K-block torch._int_mm")


# ---- fp8 ------------------------------------------------------------------------------------------------------
def _fp8_torch(x, w, scales, bias, opts, out_dtype):
    return reference.fp8_linear_ref(x, w, scales[0], bias, scales[1] if len(scales) > 1 else None, out_dtype)


def _fp8_dequant(x, w, scales, bias, opts, out_dtype):
    if _fast_dequant(x, w.dtype):
        from comfyquant.runtime.kernels import triton_int8

        return triton_int8.dequant_linear(x, w, scales[0], bias, None, out_dtype)
    return reference.dequant_linear(x, w, scales[0], bias, None, out_dtype)


def _fp8_scaled_mm(x, w, scales, bias, opts, out_dtype, act=0, norm=None):
    from comfyquant.runtime.kernels import fp8

    if w.shape[0] % 16 or w.shape[1] % 16:  # a pinned backend; the automatic choice never picks it then
        raise UserError(f"backend 'scaled_mm' needs in and out features that are multiples of 16 "
                        f"(torch._scaled_mm), got {w.shape[1]} -> {w.shape[0]}; use 'triton_w8a16' or 'dequant'")

    return fp8.fp8_linear_scaled_mm(x, w, scales[0], bias, scales[1] if len(scales) > 1 else None, out_dtype,
                                    act=act, norm=norm)


def _fp8_triton(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_int8

    return triton_int8.fp8_linear(x, w, scales[0], bias, scales[1] if len(scales) > 1 else None, out_dtype,
                                  low_rank=low_rank, act=act, norm=norm)


def _fp8_w8a16(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0):
    from comfyquant.runtime.kernels import triton_int8

    if not _fast_dequant(x, w.dtype):  # (measured dispatch skips a backend that refuses; a pinned one says why)
        cap = device_capability(x.device)
        raise UserError(f"backend 'triton_w8a16' cannot read fp8 e4m3 weights on this GPU (sm_{cap[0]}{cap[1]}: "
                        "Triton has no e4m3 type before sm_89); use 'dequant'" if cap else
                        "backend 'triton_w8a16' needs a CUDA GPU")

    return triton_int8.w8a16_linear(x, w, scales[0], bias, None, out_dtype, low_rank=low_rank, act=act)


def _check_fp8(x, w, scales, opts) -> None:
    what = "fp8_linear"
    if w.dtype not in FP8_DTYPES:
        raise UserError(f"{what}: weight must be float8_e4m3fn or float8_e5m2, got {w.dtype}")
    check_row_scale(what, scales[0] if scales else None, w.shape[0])
    input_scale = scales[1] if len(scales) > 1 else None
    if input_scale is not None and input_scale.numel() != 1:
        raise UserError(f"{what}: input_scale must be a scalar, got shape {tuple(input_scale.shape)}")


_FP8_PATHS = (("scaled_mm", "scaled_mm"), ("triton_w8a16", "triton_w8a16"), ("dequant", "dequant"))
_FP8_FUSING = ("triton_w8a16", "triton_fp8")  # cost-model paths whose backend adds a low-rank term itself


def fp8_choice(cap: tuple[int, int] | None, has_triton: bool, m: int, n: int, k: int, policy,
               costs: Callable[[], object], graph: bool, rank: int = 0, gluon: bool = False) -> BackendChoice:
    """The fp8 kind's automatic choice on a device of compute capability ``cap`` (None: not CUDA), for ``m``
    rows and a low-rank term of rank ``rank`` (0: none); ``costs()`` gives the cost table (called only when the
    cost model decides). With ``gluon`` (an sm_90 device whose Triton runs the Gluon kernel, 16-bit activations:
    its epilogue stores 16-bit tiles), on the shapes the
    Gluon kernel takes (``costs.gluon_path``) it replaces ``_scaled_mm``: the whole fp8 layer on it was faster than
    the same activation pass + cuBLAS fp8 on 66 of 68 such sweep rows of H200 run 51 (geometric mean 1.21x; the
    two others 0.993 / 0.998), before the warp-group lead made its GEMM 5% faster (run 52), while the cost model,
    fitted at one K per path, ranks the two within its ~5% error. Elsewhere the Triton fp8 GEMM is a candidate
    with a low-rank term only (it adds the term in its epilogue where ``_scaled_mm`` needs a second GEMM and a
    pass over the output; without one cuBLAS fp8 is faster, ~1350 vs ~1240 TFLOP/s on the H200). Pure: the device
    facts are arguments."""
    if cap is None:
        return BackendChoice("torch", "not CUDA: pure-torch reference path")
    gen = f"sm_{cap[0]}{cap[1]}"
    if cap < FP8_CC:
        return BackendChoice("dequant", f"{gen} has no fp8 matrix units")
    if k % 16 or n % 16:
        return BackendChoice("dequant", f"K={k}, N={n} not multiples of 16 (fp8 _scaled_mm needs them)")
    if not has_triton:
        return BackendChoice("scaled_mm", f"{gen}: fp8 _scaled_mm (no triton for the other paths)")
    from comfyquant.runtime.kernels.costs import gluon_path

    table = costs()
    allow = policy.allow if policy is not None else ()
    if gluon and gluon_path("triton_fp8", m, n, k, table.sms) and (not allow or "triton" in allow):
        paths = (("triton_fp8", "triton"), *(p for p in _FP8_PATHS if p[0] != "scaled_mm"))
    else:
        paths = _FP8_PATHS + ((("triton_fp8", "triton"),) if rank else ())
    return decide_paths(m, n, k, 0, policy, table, graph, paths, rank, _FP8_FUSING)


def _ws_available() -> bool:
    from comfyquant.runtime.kernels.triton_int8 import ws_available  # imports triton: GPU backends only

    return ws_available()


def _choose_fp8(x, n, k, opts, policy, rank: int = 0) -> BackendChoice:
    cap = device_capability(x.device)
    if cap is None:
        return BackendChoice("torch", f"{x.device.type}: pure-torch reference path")
    # the Gluon kernel stores 16-bit tiles: float32 activations (ComfyUI's T5) keep the choice without it
    gluon = cap[0] == 9 and x.dtype in (torch.bfloat16, torch.float16) and triton_available() and _ws_available()
    return fp8_choice(cap, triton_available(), _m(x, k), n, k, policy, lambda: _costs(x, policy), _graph(policy),
                      rank, gluon=gluon)


# ---- int4_rot -------------------------------------------------------------------------------------------------
def _int4_torch(x, w, scales, bias, opts, out_dtype):
    return int4.w4a8_linear_ref(x, w, scales[0], bias, _opt(opts, 0), out_dtype)


def _int4_dequant(x, w, scales, bias, opts, out_dtype):
    return int4.w4_dequant_linear(x, w, scales[0], bias, _opt(opts, 0), out_dtype)


def _int4_triton(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_int8

    return triton_int8.w4a8_linear(x, w, scales[0], bias, _opt(opts, 0), out_dtype, low_rank=low_rank,
                                   act=act, norm=norm)


def _plan_int4_triton(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    return triton_plans.plan_w4a8(x, w, scales[0], bias, _opt(opts, 0), out_dtype, act, low_rank, norm)


def _int4_unpacked(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_unpack

    return triton_unpack.w4_unpacked_linear(x, w, scales[0], bias, _opt(opts, 0), out_dtype, low_rank=low_rank,
                                            act=act, norm=norm)


def _plan_int4_unpacked(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_unpack

    return triton_unpack.plan_w4_unpacked(x, w, scales[0], bias, _opt(opts, 0), out_dtype, act, low_rank, norm)


def _int4_w4a16(x, w, scales, bias, opts, out_dtype, low_rank=None, act=0, norm=None):
    from comfyquant.runtime.kernels import triton_int8

    return triton_int8.w8a16_linear(x, w, scales[0], bias, _opt(opts, 0), out_dtype, low_rank=low_rank, act=act,
                                    packed=True, norm=norm)


def _plan_int4_w4a16(x, w, scales, bias, opts, out_dtype, act, low_rank=None, norm=None):
    from comfyquant.runtime.kernels import triton_plans

    if low_rank is not None:  # the side path reads the unrotated x: the general path
        return None
    return triton_plans.plan_rotated(x, _opt(opts, 0), act, lambda r: triton_plans.plan_w8a16(
        r, w, scales[0], bias, out_dtype, 0, None, packed=True), norm)


def _check_int4(x, w, scales, opts) -> None:
    what = "int4_rot linear"
    if w.dtype != torch.int8:
        raise UserError(f"{what}: packed weight must be int8 [N, K/2], got {w.dtype}")
    check_row_scale(what, scales[0] if scales else None, w.shape[0])
    group = _opt(opts, 0)
    if group < 4:
        raise UserError(f"{what}: needs a convrot group size (opts=(group,)), got {opts}")
    _check_rot_group(what, group, 2 * w.shape[1])


# from this many rows int4_rot runs as int8 codes unpacked per call + the W8A8 GEMM (``triton_unpack``): at 256
# rows the W4A8 kernel ran 0.42-0.97x bf16 on the H200 (runs 65-69), the W8A8 GEMM 1.24-1.58x with an unpack
# pass of ~1/3 of its weight read; below, the weight read dominates and the W4A8 kernel reads a third as much
W4_UNPACK_MIN_ROWS = 256
# up to this many rows of 16-bit activations, weight-only (``triton_w4a16``): the rows are weight-bound, and the
# weight-only kernel reads the packed bytes once without quantizing x (H200 run 73, GEMM alone: 0.90-1.31x bf16
# at 16 rows against W4A8's 0.53-0.99x on 6 layers). At one row only where its tiles split K (N < 8,192) over a
# long K: Flux proj / mlp2 1.00-1.01x against 0.51-0.72x; on the wide layers and SDXL's 1,280 it ran 0.02-0.07
# below W4A8 (the unpacking, not the bytes, bounds one row on 128-column tiles)
W4A16_MAX_ROWS = 16
W4A16_ONE_ROW = (3072, 8192)  # (least K, N below which) one row takes the weight-only kernel


def _choose_int4(x, n, k, opts, policy) -> BackendChoice:
    """By rows: weight-only up to 16 (one row on narrow long-K layers only), W4A8 to 255, unpacked + W8A8 from 256
    (and for any K the W4A8 kernel's 64-column step does not divide); the first of those ``policy.allow``s, then
    the other backends in that order (none allowed: the rule's pick, as the int8 kind does)."""
    cap = device_capability(x.device)
    if cap is None or cap < (8, 0) or not triton_available():
        return BackendChoice("torch", f"{x.device.type}: W4A8 reference (unpack, rotate, per-token int8, _int_mm)")
    rows = x.numel() // max(int(x.shape[-1]), 1)
    prefs: list[tuple[str, str]] = []
    one_row_ok = k >= W4A16_ONE_ROW[0] and n < W4A16_ONE_ROW[1]
    if rows <= W4A16_MAX_ROWS and (rows > 1 or one_row_ok) and x.dtype in (torch.float16, torch.bfloat16):
        prefs.append(("triton_w4a16", f"M={rows} <= {W4A16_MAX_ROWS}: weight-only (x rotated, int4 unpacked in "
                                      "registers; a quarter of bf16's weight bytes)"))
    if rows >= W4_UNPACK_MIN_ROWS:
        prefs.append(("triton_unpacked", f"M={rows} >= {W4_UNPACK_MIN_ROWS}: int4 unpacked to int8 codes (one "
                                         "pass), then the W8A8 GEMM (bit-equal to W4A8, faster)"))
    if k % 64 == 0:
        prefs.append(("triton", f"sm_{cap[0]}{cap[1]}: Triton W4A8 (int4 unpacked in the GEMM)"))
    prefs += [("triton_unpacked", f"K={k}: not a multiple of the W4A8 kernel's 64-column step; int4 unpacked to "
                                  "int8 codes, then the W8A8 GEMM (any K)"),
              ("triton_w4a16", "allowed by the policy: weight-only"),
              *((("triton", "allowed by the policy: W4A8"),) if k % 64 == 0 else ()),
              ("dequant", "allowed by the policy: dequantized weight + F.linear"),
              ("torch", "allowed by the policy: the reference")]
    allow = policy.allow if policy is not None else ()
    name, reason = next((p for p in prefs if p[0] in allow), prefs[0]) if allow else prefs[0]
    return BackendChoice(name, reason)


INT8 = register_kernel_kind(KernelKind(
    "int8",
    {"torch": _int8_torch,
     "dequant": KernelBackend(_int8_dequant, plan=_plan_dequant),
     "triton": KernelBackend(_int8_triton, _TRITON, True, True, _plan_int8_triton, fuses_gated_act=True,
                             fuses_norm=_any_int8, fuses_mod=_mod_any),
     "triton_fused": KernelBackend(_int8_fused, _TRITON, True, True, _plan_int8_fused, fuses_norm=_unrotated,
                                   fuses_mod=_mod_rows),
     "triton_fused_kblock": KernelBackend(partial(_int8_fused, kblock=True), _TRITON, True, True,
                                          partial(_plan_int8_fused, kblock=True)),
     "triton_resident": KernelBackend(_int8_resident, _resident_requires, plan=_plan_int8_resident),
     # pinned only (by name), never timed by measured dispatch, until a GPU has run it (docs/PERFORMANCE.md)
     "triton_resident_ws": KernelBackend(_int8_resident_ws, _resident_requires, plan=_plan_int8_resident_ws,
                                         timed=False),
     "triton_w8a16": KernelBackend(_int8_w8a16, _TRITON, True, True, _plan_w8a16, fuses_norm=_rotated,
                                   fuses_mod=_mod_rotated)},
    choose=_choose_int8, check=_check_int8, choose_low_rank=_choose_int8))
INT8_BLOCK = register_kernel_kind(KernelKind(
    "int8_block", {"torch": _block_torch, "dequant": KernelBackend(_block_dequant, plan=_plan_block_dequant)},
    choose=_choose_block, check=_check_block))
FP8 = register_kernel_kind(KernelKind(
    "fp8",
    {"torch": _fp8_torch,
     "dequant": KernelBackend(_fp8_dequant, plan=_plan_dequant),
     "scaled_mm": KernelBackend(_fp8_scaled_mm, _FP8_MM, fuses_input_act=True, plan=_plan_scaled_mm,
                                fuses_gated_act=True, fuses_norm=_dynamic, fuses_mod=_mod_dynamic),
     "triton_w8a16": KernelBackend(_fp8_w8a16, _TRITON, True, True, _plan_w8a16),
     "triton": KernelBackend(_fp8_triton, _TRITON_FP8, True, True, _plan_fp8_triton, fuses_gated_act=True,
                             fuses_norm=_dynamic, fuses_mod=_mod_dynamic)},
    choose=_choose_fp8, check=_check_fp8, choose_low_rank=_choose_fp8))
INT4_ROT = register_kernel_kind(KernelKind(
    "int4_rot",
    {"torch": _int4_torch, "dequant": _int4_dequant,
     "triton": KernelBackend(_int4_triton, _TRITON, True, True, _plan_int4_triton, fuses_gated_act=True,
                             fuses_norm=_any_int8, fuses_mod=_mod_any),
     "triton_unpacked": KernelBackend(_int4_unpacked, _TRITON, True, True, _plan_int4_unpacked,
                                      fuses_gated_act=True, fuses_norm=_any_int8, fuses_mod=_mod_any),
     "triton_w4a16": KernelBackend(_int4_w4a16, _TRITON, True, True, _plan_int4_w4a16, fuses_norm=_any_int8,
                                   fuses_mod=_mod_any)},
    choose=_choose_int4, in_features=lambda w, opts: 2 * int(w.shape[1]), check=_check_int4))

# the block-scaled kinds (nvfp4, mxfp8) register themselves next to their kernels
from comfyquant.runtime.kernels import blockscaled  # noqa: E402, F401
