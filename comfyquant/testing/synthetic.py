"""Synthetic checkpoints of real architectures, streamed to disk tensor by tensor (for benchmarks and tests).

Values imitate trained weights' statistics, not their content: linear weights are Student-t (df=4, heavy
tails) scaled to std ~0.02 with a few input channels x20 (the outlier channels that make activation and
weight quantization hard), norm scales near 1, biases small. Nothing is held in memory beyond one chunk of
one tensor: the safetensors header (all offsets known from the shapes) is written first, then the data.

Drawing billions of exact Student-t samples is CPU-bound (~15M/s on a small machine), so large tensors are
cut from one pool of exact samples (``ValueModel.pool_size``) at random offsets per chunk: each tensor still
has the pool's heavy-tailed distribution, and writing runs near disk speed.

This module carries its own minimal header-first writer so it does not depend on the converter's writer.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyquant.errors import UserError
from comfyquant.io.writer import StreamingWriter, TensorSpec
from comfyquant.testing.architectures import arch_tensors

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class ValueModel:
    """How random values are drawn; ``chunk_elements`` bounds the memory used per generation step."""

    scale: float = 0.02
    outlier_channels: int = 4
    outlier_gain: float = 20.0
    norm_jitter: float = 0.05
    bias_scale: float = 0.005
    chunk_elements: int = 1 << 22
    pool_size: int = 1 << 23

    def __post_init__(self) -> None:
        if not 0 < self.chunk_elements <= self.pool_size // 2:
            raise ValueError("chunk_elements must be positive and at most pool_size // 2")


@dataclass(frozen=True)
class SyntheticInfo:
    """What was written: tensor count, parameter count, file size and the largest tensor's size in bytes."""

    path: str
    tensors: int
    parameters: int
    bytes: int
    largest_tensor_bytes: int


def student_t4(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` exact Student-t(df=4) samples: z / sqrt(chi2_4 / 4) with chi2_4 = -2 log(u1 u2), on the
    generator's device."""
    z = torch.randn(n, generator=gen, device=gen.device)
    u = 1.0 - torch.rand(2, n, generator=gen, device=gen.device)  # in (0, 1]
    chi2_over_4 = (-0.5 * torch.log(u[0] * u[1])).clamp_min(1e-12)
    return z * chi2_over_4.rsqrt()


def tensor_kind(name: str, shape: Sequence[int]) -> str:
    """``linear`` / ``norm`` / ``bias`` / ``scalar`` / ``other``: decides which distribution a tensor gets."""
    if len(shape) == 0:
        return "scalar"
    if name.endswith(("bias", "_bias")):
        return "bias"
    last = name.rsplit(".", 2)[-2] if "." in name else name
    if name.endswith((".scale", "dora_scale")) or (len(shape) == 1 and re.search(r"norm|ln_", last)):
        return "norm"
    if len(shape) == 2 and name.endswith(".weight") and not re.search(r"embed|shared", name):
        return "linear"
    return "other"


def sample_pool(seed: int, model: ValueModel, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shared pool of exact Student-t(4) samples scaled to std ``model.scale``, drawn in chunks (so the
    temporaries stay small) and stored in the output dtype (so cutting chunks from it is a plain copy)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(model.pool_size, dtype=dtype)
    for start in range(0, model.pool_size, 1 << 20):
        n = min(1 << 20, model.pool_size - start)
        pool[start:start + n] = (model.scale / math.sqrt(2.0)) * student_t4(n, gen)
    return pool


def generate_chunks(name: str, shape: Sequence[int], seed: int, model: ValueModel,
                    pool: torch.Tensor) -> Iterator[torch.Tensor]:
    """Chunks of one tensor along dim 0 (in ``pool``'s dtype for weights, float32 for norms/biases/scalars),
    concatenating to ``shape``; deterministic per (seed, name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    kind = tensor_kind(name, shape)
    if kind == "scalar":
        yield torch.tensor(16.0 if name.endswith("alpha") else 1.0)
        return
    rows, row_elems = shape[0], math.prod(shape[1:])
    cols: list[int] = []
    if kind == "linear":
        k = min(model.outlier_channels, max(1, shape[1] // 64))
        cols = torch.randperm(shape[1], generator=gen)[:k].tolist()
    step = max(1, model.chunk_elements // max(1, row_elems))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        count = n * row_elems
        if kind == "norm":
            values = 1.0 + model.norm_jitter * torch.randn(count, generator=gen)
        elif kind == "bias":
            values = model.bias_scale * torch.randn(count, generator=gen)
        elif count > pool.numel() // 2:  # one row longer than the pool allows: draw it exactly
            values = ((model.scale / math.sqrt(2.0)) * student_t4(count, gen)).to(pool.dtype)
        else:
            offset = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=gen))
            values = pool[offset:offset + count].clone()
        values = values.reshape(n, *shape[1:])
        for col in cols:  # basic indexing: a strided in-place multiply (advanced indexing is 100x slower)
            values[:, col] *= model.outlier_gain
        yield values


def write_synthetic_checkpoint(path: str | os.PathLike[str], arch: str, size: str = "tiny", *,
                               dtype: torch.dtype = torch.bfloat16, seed: int = 0, prefix: str = "",
                               model: ValueModel | None = None) -> SyntheticInfo:
    """Stream a random checkpoint of ``arch`` at ``size`` to ``path`` (atomically: temp file, then rename)."""
    if dtype not in _ST_DTYPE:
        raise UserError(f"unsupported dtype {dtype}; choose one of: {', '.join(DTYPES)}")
    specs = [(prefix + name, tuple(shape)) for name, shape in arch_tensors(arch, size)]
    meta = {"comfyquant.synthetic": json.dumps({"arch": arch, "size": size, "seed": seed}),
            "format": "pt"}
    return write_streamed(path, specs, dtype=dtype, seed=seed, metadata=meta, model=model or ValueModel())


def write_streamed(path: str | os.PathLike[str], specs: Sequence[tuple[str, tuple[int, ...]]], *,
                   dtype: torch.dtype, seed: int, metadata: dict[str, str], model: ValueModel) -> SyntheticInfo:
    """Stream the tensors through the converter's own writer, each as row chunks (memory: one chunk)."""
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the spec")
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"cannot write {target}: folder {target.parent} does not exist")
    planned = [TensorSpec(name, dtype, tuple(shape)) for name, shape in specs]
    pool = sample_pool(seed, model, dtype)
    with StreamingWriter(target, planned, metadata, overwrite=True) as w:
        for name, shape in specs:
            w.write_parts(name, (chunk.to(dtype) for chunk in generate_chunks(name, shape, seed, model, pool)))
    params = sum(math.prod(s) for _, s in specs)
    largest = max((p.nbytes for p in planned), default=0)
    return SyntheticInfo(str(target), len(specs), params, target.stat().st_size, largest)
