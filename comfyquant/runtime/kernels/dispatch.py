"""Public entry points for quantized linears: validate inputs, choose a backend, call the custom op.

``int8_linear`` / ``int8_block_linear`` / ``fp8_linear`` compute ``x @ dequant(W)^T + bias`` with dynamic
per-token activation quantization. ``backend`` is a name (see ``backends.BACKENDS``), a
:class:`BackendChoice`, or None for :func:`choose_backend`'s automatic choice; nothing here is global.
"""

from __future__ import annotations

import torch

from comfyquant.errors import UserError
from comfyquant.quant.hadamard import is_power_of_4
from comfyquant.runtime.kernels import custom_ops
from comfyquant.runtime.kernels.backends import AUTO, BACKENDS, BackendChoice, choose_backend

__all__ = ["BACKENDS", "BackendChoice", "choose_backend", "fp8_linear", "int8_block_linear", "int8_linear"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _op(traced, eager):
    # under torch.compile / export the custom op (with its fake impl) is what the tracer must see; in eager
    # mode the plain implementation skips ~10 µs of op-dispatch overhead per call (it matters at M=1).
    return traced if torch.compiler.is_compiling() else eager


def _resolve(x: torch.Tensor, kind: str, n: int, k: int, backend: str | BackendChoice | None) -> str:
    if isinstance(backend, BackendChoice):
        backend = backend.name
    if torch.compiler.is_compiling():
        # decided inside the op at run time: tracing torch.cuda / importlib queries would break the graph
        return AUTO if backend is None else backend
    return choose_backend(x, kind=kind, n=n, k=k, override=backend).name


def _check_common(x: torch.Tensor, w_q: torch.Tensor, bias: torch.Tensor | None, what: str) -> tuple[int, int]:
    if w_q.dim() != 2:
        raise UserError(f"{what}: weight must be 2-D [out, in], got shape {tuple(w_q.shape)}")
    n, k = w_q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise UserError(f"{what}: input last dim {tuple(x.shape)[-1:]} does not match weight in_features {k}")
    if not x.dtype.is_floating_point:
        raise UserError(f"{what}: input must be floating point, got {x.dtype}")
    if bias is not None and bias.shape != (n,):
        raise UserError(f"{what}: bias shape {tuple(bias.shape)} does not match out_features {n}")
    return n, k


def _check_row_scale(w_scale: torch.Tensor, n: int, what: str) -> None:
    if w_scale.numel() not in (1, n) or (w_scale.numel() == n and w_scale.shape not in ((n, 1), (n,))):
        raise UserError(f"{what}: weight_scale shape {tuple(w_scale.shape)} must be a scalar, [{n}, 1] or [{n}]")


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                convrot_group: int | None = None, out_dtype: torch.dtype | None = None,
                backend: str | BackendChoice | None = None) -> torch.Tensor:
    """W8A8 ``x [..., K] @ (w_q * w_scale)^T + bias``; activations quantized per token (row), int32 accumulate.

    ``convrot_group``: rotate x group-wise with the regular Hadamard first (the weight is stored rotated).
    """
    what = "int8_linear"
    if w_q.dtype != torch.int8:
        raise UserError(f"{what}: weight must be int8, got {w_q.dtype}")
    n, k = _check_common(x, w_q, bias, what)
    _check_row_scale(w_scale, n, what)
    if convrot_group is not None and (not is_power_of_4(convrot_group) or convrot_group < 4 or k % convrot_group):
        raise UserError(f"{what}: convrot group size {convrot_group} must be a power of 4 dividing in_features {k}")
    name = _resolve(x, "int8", n, k, backend)
    return _op(custom_ops.int8_linear_op, custom_ops.int8_linear_impl)(x, w_q, w_scale, bias, convrot_group or 0, out_dtype or x.dtype, name)


def int8_block_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      *, block: int, out_dtype: torch.dtype | None = None,
                      backend: str | BackendChoice | None = None) -> torch.Tensor:
    """W8A8 with one weight scale per ``block x block`` tile (``w_scale [ceil(N/b), ceil(K/b)]``)."""
    what = "int8_block_linear"
    if w_q.dtype != torch.int8:
        raise UserError(f"{what}: weight must be int8, got {w_q.dtype}")
    n, k = _check_common(x, w_q, bias, what)
    if block < 1:
        raise UserError(f"{what}: block size must be positive, got {block}")
    want = (-(-n // block), -(-k // block))
    if tuple(w_scale.shape) != want:
        raise UserError(f"{what}: weight_scale shape {tuple(w_scale.shape)} != {want} for weight [{n}, {k}] "
                        f"with block {block}")
    name = _resolve(x, "int8_block", n, k, backend)
    return _op(custom_ops.int8_block_linear_op, custom_ops.int8_block_linear_impl)(
        x, w_q, w_scale, bias, block, out_dtype or x.dtype, name)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               backend: str | BackendChoice | None = None) -> torch.Tensor:
    """FP8 ``x @ (w_q * w_scale)^T + bias``; activations per-row dynamic, or static ``input_scale`` (scalar)."""
    what = "fp8_linear"
    if w_q.dtype not in FP8_DTYPES:
        raise UserError(f"{what}: weight must be float8_e4m3fn or float8_e5m2, got {w_q.dtype}")
    n, k = _check_common(x, w_q, bias, what)
    _check_row_scale(w_scale, n, what)
    if input_scale is not None and input_scale.numel() != 1:
        raise UserError(f"{what}: input_scale must be a scalar, got shape {tuple(input_scale.shape)}")
    name = _resolve(x, "fp8", n, k, backend)
    return _op(custom_ops.fp8_linear_op, custom_ops.fp8_linear_impl)(x, w_q, w_scale, bias, input_scale, out_dtype or x.dtype, name)
