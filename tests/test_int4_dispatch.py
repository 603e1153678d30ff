"""Which ``int4_rot`` path a GPU call takes by its row count (the device facts patched: no GPU here; the paths
themselves are checked bit-equal under Triton's interpreter, ``triton_interp_unpack``)."""

from __future__ import annotations

import pytest
import torch

from comfyquant.runtime.kernels import builtin
from comfyquant.runtime.kernels.registry import kernel_kind

pytestmark = pytest.mark.cpu_int8


@pytest.fixture
def on_h200(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "device_capability", lambda dev: (9, 0))
    monkeypatch.setattr(builtin, "triton_available", lambda: True)


@pytest.mark.parametrize("rows,k,dtype,want", [
    (1, 3072, torch.bfloat16, "triton_w4a16"), (16, 3072, torch.float16, "triton_w4a16"),  # weight-bound
    (1, 1280, torch.bfloat16, "triton"), (2, 1280, torch.bfloat16, "triton_w4a16"),  # one row: long K only
    (1, 3072, torch.float32, "triton"),  # ComfyUI's fp32 text encoders: W4A8 (weight-only would round x to bf16)
    (17, 3072, torch.bfloat16, "triton"), (255, 3072, torch.bfloat16, "triton"),
    (256, 3072, torch.bfloat16, "triton_unpacked"), (4096, 12288, torch.bfloat16, "triton_unpacked"),
    (16384, 3072, torch.bfloat16, "triton_unpacked"),
    (1024, 320, torch.bfloat16, "triton_unpacked"),  # K a multiple of 64 only
    (1024, 1296, torch.bfloat16, "triton_unpacked"),  # K not a multiple of 64: the W8A8 GEMM takes any K
    (32, 1296, torch.bfloat16, "triton_unpacked"),  # ... W4A8 does not (the reference took these before)
])
def test_int4_rot_path_by_rows(on_h200: None, rows: int, k: int, dtype: torch.dtype, want: str) -> None:
    x = torch.empty(1, rows, k, dtype=dtype)
    got = builtin._choose_int4(x, 3072, k, (16,), None)
    assert got.name == want, got
    assert got.name in kernel_kind("int4_rot").backends


@pytest.mark.parametrize("n,want", [(3072, "triton_w4a16"), (8191, "triton_w4a16"), (8192, "triton"),
                                    (21504, "triton")])
def test_one_row_goes_weight_only_where_its_tiles_split_k(on_h200: None, n: int, want: str) -> None:
    """At one row the weight-only kernel beat W4A8 only on the narrow, long-K layers (run 73); wide ones keep
    W4A8, and from two rows every layer takes the weight-only kernel."""
    x = torch.empty(1, 12288, dtype=torch.bfloat16)
    assert builtin._choose_int4(x, n, 12288, (256,), None).name == want
    assert builtin._choose_int4(torch.empty(2, 12288, dtype=torch.bfloat16), n, 12288, (256,), None).name == \
        "triton_w4a16"


def test_the_unpacked_backend_fuses_what_the_w4a8_one_does() -> None:
    """The dispatcher hands input activations and low-rank terms to a backend by these flags: the two int4
    paths must take the same ones, or a model's layers would change behaviour at 256 rows."""
    backends = kernel_kind("int4_rot").backends
    a, b = backends["triton"], backends["triton_unpacked"]
    assert (a.fuses_low_rank, a.fuses_input_act, a.fuses_gated_act) == (b.fuses_low_rank, b.fuses_input_act,
                                                                         b.fuses_gated_act) == (True, True, True)
    assert b.plan is not None


@pytest.mark.parametrize("rows,allow,want", [
    (4096, ("triton",), "triton"), (4096, ("triton_w4a16", "torch"), "triton_w4a16"), (1, ("dequant",), "dequant"),
    (16, ("triton_unpacked", "triton"), "triton"), (4096, ("scaled_mm",), "triton_unpacked"),
])
def test_a_policy_allow_list_is_honoured(on_h200: None, rows: int, allow: tuple, want: str) -> None:
    """``DispatchPolicy.allow`` names the backends a choice may take (the node pack's backend option): the first
    allowed path in the rule's order; an allow list naming none of the kind's backends leaves the rule's pick."""
    from comfyquant.runtime.kernels.policy import DispatchPolicy

    x = torch.empty(rows, 3072, dtype=torch.bfloat16)
    assert builtin._choose_int4(x, 3072, 3072, (256,), DispatchPolicy(allow=allow)).name == want


def test_k_not_a_multiple_of_64_never_gets_the_w4a8_kernel(on_h200: None) -> None:
    from comfyquant.runtime.kernels.policy import DispatchPolicy

    x = torch.empty(32, 1296, dtype=torch.bfloat16)
    got = builtin._choose_int4(x, 3072, 1296, (16,), DispatchPolicy(allow=("triton", "torch")))
    assert got.name == "torch"
