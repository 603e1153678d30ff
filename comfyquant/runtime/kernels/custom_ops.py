"""The one ``torch.library`` custom op every kernel kind runs through under torch.compile.

``comfyquant::quant_linear(x, w, scales, bias, kind, opts, out_dtype, backend)`` looks the kind up in the
kernel-kind table and calls the named backend (``auto``: the kind's own choice, made here at run time so the
traced graph holds no device queries). Its fake implementation is generic: every format keeps N rows in ``w``
(packing is along K), so the output is ``[..., w.shape[0]]``. Eager callers use :func:`run` directly and skip
the op-dispatch overhead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from comfyquant.runtime.kernels.backends import AUTO
from comfyquant.runtime.kernels.registry import kernel_kind


def run(x: torch.Tensor, w: torch.Tensor, scales: tuple, bias: torch.Tensor | None, kind: str, opts: tuple,
        out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """Resolve ``backend`` (``auto`` or ``auto|<policy key>``: the kind's choice) and call its implementation."""
    k = kernel_kind(kind)
    if backend.startswith(AUTO):
        from comfyquant.runtime.kernels.policy import policy_from_key

        policy = policy_from_key(backend[len(AUTO) + 1:]) if len(backend) > len(AUTO) else None
        n, kk = int(w.shape[0]), k.in_features(w, opts)
        backend = (k.choose(x, n, kk, opts, policy) if k.choose is not None else k.first_available(x.device)).name
    b = k.backends.get(backend)
    if b is None:
        raise ValueError(f"unknown {kind} backend {backend!r}")
    return b.impl(x, w, scales, bias, opts, out_dtype)


@torch.library.custom_op("comfyquant::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, w: torch.Tensor, scales: Sequence[torch.Tensor | None],
                    bias: torch.Tensor | None, kind: str, opts: Sequence[int], out_dtype: torch.dtype,
                    backend: str) -> torch.Tensor:
    """``x @ dequant(w)^T + bias`` for kernel kind ``kind`` (see ``registry``)."""
    return run(x, w, tuple(scales), bias, kind, tuple(opts), out_dtype, backend)


@quant_linear_op.register_fake
def _quant_linear_fake(x, w, scales, bias, kind, opts, out_dtype, backend):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)
