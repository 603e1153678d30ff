"""The runtime's Triton kernels on the CPU, under Triton's interpreter: every check group of
``triton_interp_checks`` in one subprocess (``triton_interp.run_interpreted``), one test per group.

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
from triton_interp import run_interpreted
from triton_interp_checks import GROUPS

TRITON_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"
BUILTIN_KINDS = {"int8": (0,), "int8_block": (64,), "fp8": (), "int4_rot": (16,), "nvfp4": (), "mxfp8": ()}


def _need_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        if TRITON_EXPECTED:
            pytest.fail("triton is not installed; `bash scripts/setup.sh` installs it (pyproject.toml, test extra)")
        pytest.skip(f"triton has no wheel in the test extra for {sys.platform}/{platform.machine()}")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    _need_triton()
    return run_interpreted("import triton_interp_checks as c; c.run_groups()")


def test_interpreted_run_completed(interpreted: dict[str, Any]) -> None:
    assert interpreted["error"] is None, interpreted["error"]
    assert interpreted["returncode"] == 0, interpreted["stderr_tail"]
    assert list(interpreted["group_seconds"]) == list(GROUPS)
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
