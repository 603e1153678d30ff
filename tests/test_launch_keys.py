"""The launch builders' own specialization keys against Triton's: ``FastKernel`` caches one compiled kernel per
caller key, so a key that merges two launches Triton would compile apart reuses a kernel specialized for the
other (an int argument equal to 1 or a multiple of 16 is specialized unless the kernel lists it in
``do_not_specialize``). Run 64 found ``w4a8_swapped`` computing wrong rows at M = 16 with the kernel compiled at
M = 1, and faulting later: its M was specialized and its key did not say so. No GPU needed: the keys are host
tuples."""

from __future__ import annotations

import itertools

import pytest
import torch

from comfyquant.runtime.kernels import triton_int8 as ti
from comfyquant.runtime.kernels import triton_quant as tq
from comfyquant.runtime.kernels.configs import TileConfig

ROWS = (1, 2, 16, 17, 32, 300)  # == 1, % 16 == 0 and neither
N, K = 256, 512


def _w4a8(fk: object) -> object:
    def build(m: int) -> tuple:
        q, p = torch.empty(m, K, dtype=torch.int8), torch.empty(N, K // 2, dtype=torch.int8)
        out, sa, sb = torch.empty(m, N, dtype=torch.bfloat16), torch.empty(m, 1), torch.empty(N)
        _, args, key = ti._w4a8_launch(q, sa, p, sb, None, out, TileConfig(16, 64, 128, 4, 4, 8),
                                       ti._low_rank_args(None, q, sb))
        return fk, args, key
    return build


def _w8a8(m: int) -> tuple:
    q, w = torch.empty(m, K, dtype=torch.int8), torch.empty(N, K, dtype=torch.int8)
    out, sa, sb = torch.empty(m, N, dtype=torch.bfloat16), torch.empty(m, 1), torch.empty(N)
    fk, _, args, key = ti._w8a8_launch(q, sa, w, sb, None, out, TileConfig(64, 64, 128, 4, 3, 8), False, False,
                                       ti._low_rank_args(None, q, sb))
    return fk, args, key


def _fused(m: int) -> tuple:
    x, w = torch.empty(m, K, dtype=torch.bfloat16), torch.empty(N, K, dtype=torch.int8)
    out, sb = torch.empty(m, N, dtype=torch.bfloat16), torch.empty(N)
    _, args, key = ti._fused_launch(x, w, out, sb, None, TileConfig(16, 64, 128, 4, 3, 8),
                                    ti._low_rank_args(None, x, sb), 0)
    return ti._FUSED, args, key


def _w8a16(m: int) -> tuple:
    x, w = torch.empty(m, K, dtype=torch.bfloat16), torch.empty(N, K, dtype=torch.int8)
    out, sb = torch.empty(m, N, dtype=torch.bfloat16), torch.empty(N)
    _, args, key = ti._w8a16_launch(x, w, out, sb, None, TileConfig(16, 64, 128, 4, 3, 8),
                                    ti._low_rank_args(None, x, sb), 0)
    return ti._W8A16, args, key


def _blocks(m: int) -> tuple:
    x, out, scale = torch.empty(m, K, dtype=torch.bfloat16), torch.empty(m, K, dtype=torch.int8), torch.empty(m)
    _, args, key, _ = tq.block_launch(x, out, scale, None, tq.MODE_INT8, 127.0, 0, 0, rows=4)
    return tq._ACT_BLOCKS, args, key


def _act(m: int) -> tuple:
    x, out, scale = torch.empty(m, K, dtype=torch.bfloat16), torch.empty(m, K, dtype=torch.int8), torch.empty(m)
    _, args, key, _ = tq.act_launch(x, out, scale, None, None, tq.MODE_INT8, 127.0, 0, 0)
    return tq._ACT, args, key


BUILDERS = {"w4a8": _w4a8(ti._W4A8), "w4a8_swapped": _w4a8(ti._W4A8_SWAPPED), "w4a8_joined": _w4a8(ti._W4A8_JOINED),
            "w8a8": _w8a8, "fused": _fused, "w8a16": _w8a16, "act_blocks": _blocks,
            "act": _act}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_caller_key_separates_what_triton_compiles_apart(name: str) -> None:
    """For every two row counts: equal caller keys imply equal Triton specialization keys (the generic
    ``FastKernel.key``, which follows Triton's rules argument by argument)."""
    launches = {m: BUILDERS[name](m) for m in ROWS}
    fk = launches[ROWS[0]][0]
    keys = {m: (key, fk.key(args, 4, 3)) for m, (_, args, key) in launches.items()}
    merged = [(a, b) for a, b in itertools.combinations(ROWS, 2)
              if keys[a][0] == keys[b][0] and keys[a][1] != keys[b][1]]
    assert not merged, f"{name}: one cached kernel would serve rows {merged}, which Triton compiles apart"
