"""The runtime's Triton kernels on the CPU, under Triton's interpreter: every check group of
``triton_interp_checks`` in two subprocesses at once (``triton_interp.run_groups_in_parallel``: CI's two cores),
one test per group.

The ``test`` extra installs triton on Linux x86_64 (CI and the GPU machine's platform): there a missing triton
fails these tests; on other platforms (no wheel) they skip.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from typing import Any

import pytest
import torch
from triton_interp import balanced_shares, run_groups_in_parallel
from triton_interp_checks import GROUPS

# the interpreted checks compare each kernel with CPU products (reference.int_mm, exact on any CPU, and
# torch._scaled_mm) in their child processes: references, not a runtime path, so the AVX2-capped pass leaves them out
pytestmark = pytest.mark.cpu_int8_reference

TRITON_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"
BUILTIN_KINDS = {"int8": (0,), "int8_block": (64,), "fp8": (), "int4_rot": (16,), "nvfp4": (), "mxfp8": ()}


def _need_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        if TRITON_EXPECTED:
            pytest.fail("triton is not installed; `bash scripts/setup.sh` installs it (pyproject.toml, test extra)")
        pytest.skip(f"triton has no wheel in the test extra for {sys.platform}/{platform.machine()}")


PROCESSES = 2  # CI's cores: pytest itself only waits while the interpreter runs
# Seconds per group on a CI-class CPU (2026-12-07, all groups in one process: 424 s), for balancing the shares
# only; a new group counts the median.
GROUP_SECONDS = {
    "cpu_dispatch": 1.2, "act_quant": 4.7, "act_blocks": 5.6, "rotate_rows": 2.1, "fp8_quant": 2.5,
    "int_mm": 17.8, "w8a8": 5.0, "fused": 1.8, "fused_rows": 35.5, "fused_kblock": 2.4, "w8a16": 4.6,
    "w8a16_split": 38.6, "tma_probe": 0.2, "dequant": 0.5, "w4a8": 10.7, "fp8_scaled_mm": 0.8,
    "fast_kernel": 0.1, "interpreter_limitations": 0.0, "fp8_w8a8": 5.6, "fp8_dot_exact": 0.1,
    "fp8_launch_keys": 0.2, "low_rank_epilogue": 12.2, "input_act": 15.7, "gated": 19.3, "plans": 39.9,
    "plans_inference_mode": 0.5, "low_rank_plans": 1.4, "fp8_w8a8_plan": 0.5, "scaled_mm_plan": 0.4,
    "rotated_and_w4a8_plans": 2.5, "block_dequant": 0.1, "descriptor_copies": 0.0,
    "plans_share_scratch": 0.6, "plans_keep_no_buffers": 0.0, "act_tiles": 6.8, "dot_rotation": 18.3,
    "held_rotation": 6.1, "group_rows": 4.6, "attention_quantizer": 0.2,
    "attention": 0.8, "attention_pv_fp8": 0.8, "norm_quantizer": 3.8, "norm_linear": 6.0, "norm_plans":
    9.0, "column_scale": 3.0, "norm_rotated": 2.0, "norm_rotated_linear": 16.3, "modulated_quantizer":
    0.4, "modulated_linear": 10.2, "modulated_plans": 7.5, "modulated_rotated": 35.4,
    "shared_layer_norm": 18.2, "modulated_rms": 34.4, "unpack_kernel": 0.1, "unpacked_linear": 1.5,
    "unpacked_plan": 0.8, "w4a16": 1.1, "norm_rope": 0.4, "norm_rope_single": 0.5, "norm_rope_parts":
    0.1, "join_act": 0.2}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    _need_triton()
    return run_groups_in_parallel(balanced_shares(list(GROUPS), GROUP_SECONDS, PROCESSES))


def test_interpreted_run_completed(interpreted: dict[str, Any]) -> None:
    assert interpreted["error"] is None, interpreted["error"]
    assert interpreted["returncode"] == 0, interpreted["stderr_tail"]
    assert sorted(interpreted["group_seconds"]) == sorted(GROUPS)
    assert interpreted["versions"]["triton"] == "3.6.0"  # the GPU machine's version (pyproject.toml pin)


@pytest.mark.parametrize("group", list(GROUPS))
def test_kernel_group(interpreted: dict[str, Any], group: str) -> None:
    checks = [c for c in interpreted["checks"] if c["group"] == group]
    assert checks, f"check group {group!r} recorded nothing"
    failed = [c for c in checks if not c["ok"]]
    assert not failed, f"{len(failed)}/{len(checks)} failed:\n" + json.dumps(failed[:8], indent=1)[:8000]


def test_cpu_choice_stays_torch_with_triton_importable() -> None:
    """Installing triton changes nothing on CPU tensors: every kind picks its reference backend and refuses the
    Triton ones (they need a CUDA device)."""
    _need_triton()
    from comfyquant.runtime.kernels.backends import triton_available
    from comfyquant.runtime.kernels.dispatch import choose_backend
    from comfyquant.runtime.kernels.registry import kernel_kind

    assert triton_available()
    x = torch.randn(4, 256)
    for kind, opts in BUILTIN_KINDS.items():
        kk = kernel_kind(kind)
        choice = choose_backend(x, kind=kind, n=64, k=256, opts=opts)
        assert choice.name == kk.reference == "torch", (kind, choice)
        for name in kk.backends:
            if name.startswith("triton") or name == "scaled_mm":
                assert "needs a CUDA device" in (kk.why_not(name, x.device) or ""), (kind, name)


def test_the_shares_split_every_group_once_and_near_evenly() -> None:
    """The two interpreted processes run every group exactly once, each share in ``GROUPS`` order, and their
    loads differ by at most one group's seconds (the greedy bound)."""
    shares = balanced_shares(list(GROUPS), GROUP_SECONDS, PROCESSES)
    assert sorted(g for s in shares for g in s) == sorted(GROUPS) and len(shares) == PROCESSES
    order = list(GROUPS)
    assert all(s == sorted(s, key=order.index) for s in shares)
    known = sorted(GROUP_SECONDS.values())
    default = known[len(known) // 2]
    loads = [sum(GROUP_SECONDS.get(g, default) for g in s) for s in shares]
    assert max(loads) - min(loads) <= max(GROUP_SECONDS.get(g, default) for g in GROUPS)
