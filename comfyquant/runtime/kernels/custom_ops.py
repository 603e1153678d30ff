"""``torch.library`` custom ops (``comfyquant::*``) with fake implementations, so torch.compile traces through.

Each op takes the backend name already chosen by :func:`backends.choose_backend`; the real implementation
routes to the torch reference, or imports the Triton / fp8 modules lazily (the CPU path never imports triton).
Eager callers may call the ``*_impl`` functions directly (same result, without the op-dispatch overhead that
matters at M=1); traced code must go through the ``*_op`` objects.
"""

from __future__ import annotations

import torch

from comfyquant.runtime.kernels import reference
from comfyquant.runtime.kernels.backends import AUTO, resolve_name


def _out_shape(x: torch.Tensor, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n)


def int8_linear_impl(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     convrot_group: int, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """W8A8 linear; ``convrot_group`` 0 means no rotation."""
    group = convrot_group or None
    if backend == AUTO:
        backend = resolve_name(x, "int8", w_q.shape[0], w_q.shape[1], backend)
    if backend == "torch":
        return reference.int8_linear_ref(x, w_q, w_scale, bias, group, out_dtype)
    if backend == "dequant":
        return reference.dequant_linear(x, w_q, w_scale, bias, group, out_dtype)
    from comfyquant.runtime.kernels import triton_int8

    if backend == "triton":
        return triton_int8.int8_linear(x, w_q, w_scale, bias, group, out_dtype)
    if backend == "triton_w8a16":
        return triton_int8.w8a16_linear(x, w_q, w_scale, bias, group, out_dtype)
    raise ValueError(f"unknown int8 backend {backend!r}")


int8_linear_op = torch.library.custom_op("comfyquant::int8_linear", int8_linear_impl, mutates_args=())


@int8_linear_op.register_fake
def _int8_linear_fake(x, w_q, w_scale, bias, convrot_group, out_dtype, backend):
    return x.new_empty(_out_shape(x, w_q.shape[0]), dtype=out_dtype)


def int8_block_linear_impl(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                           bias: torch.Tensor | None, block: int, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """W8A8 with block-wise weight scales."""
    if backend == AUTO:
        backend = resolve_name(x, "int8_block", w_q.shape[0], w_q.shape[1], backend)
    if backend == "torch":
        return reference.int8_block_linear_ref(x, w_q, w_scale, block, bias, out_dtype)
    if backend == "dequant":
        n, k = w_q.shape
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        s = w_scale.to(dt).repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
        return torch.nn.functional.linear(x.to(dt), w_q.to(dt) * s,
                                          None if bias is None else bias.to(dt)).to(out_dtype)
    raise ValueError(f"unknown int8_block backend {backend!r}")


int8_block_linear_op = torch.library.custom_op("comfyquant::int8_block_linear", int8_block_linear_impl,
                                               mutates_args=())


@int8_block_linear_op.register_fake
def _int8_block_linear_fake(x, w_q, w_scale, bias, block, out_dtype, backend):
    return x.new_empty(_out_shape(x, w_q.shape[0]), dtype=out_dtype)


def fp8_linear_impl(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    input_scale: torch.Tensor | None, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """FP8 linear: rowwise dynamic activation scales, or the static ``input_scale``."""
    if backend == AUTO:
        backend = resolve_name(x, "fp8", w_q.shape[0], w_q.shape[1], backend)
    if backend == "torch":
        return reference.fp8_linear_ref(x, w_q, w_scale, bias, input_scale, out_dtype)
    if backend == "dequant":
        return reference.dequant_linear(x, w_q, w_scale, bias, None, out_dtype)
    if backend == "scaled_mm":
        from comfyquant.runtime.kernels import fp8

        return fp8.fp8_linear_scaled_mm(x, w_q, w_scale, bias, input_scale, out_dtype)
    if backend == "triton_w8a16":
        from comfyquant.runtime.kernels import triton_int8

        return triton_int8.w8a16_linear(x, w_q, w_scale, bias, None, out_dtype)
    raise ValueError(f"unknown fp8 backend {backend!r}")


fp8_linear_op = torch.library.custom_op("comfyquant::fp8_linear", fp8_linear_impl, mutates_args=())


@fp8_linear_op.register_fake
def _fp8_linear_fake(x, w_q, w_scale, bias, input_scale, out_dtype, backend):
    return x.new_empty(_out_shape(x, w_q.shape[0]), dtype=out_dtype)
