"""``int8-rot`` files follow exactly the convrot convention that ComfyUI 0.30 / comfy-kitchen 0.2.40 undo at run time.

Proved numerically against comfy-kitchen's own code: the same regular Hadamard matrix, the stored weight is
``W_g @ H`` per group of K columns, comfy-kitchen's dequantizer recovers our dequantized weight, and a layer
loaded by ComfyUI's ``mixed_precision_ops`` reproduces ``x @ W^T`` within the int8 bounds of
``comfyui_reference`` for group sizes 16, 64, 256 and 1024. A Sylvester-rotated weight fails the same check.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from comfyui_reference import check_layer, int8_original_expectation, run_layer

from comfyquant.formats import dequantize_weight, quantize_weight
from comfyquant.io.comfy_meta import encode_comfy_quant
from comfyquant.quant.hadamard import fast_hadamard, hadamard_matrix
from comfyquant.quant.int8 import quantize_rowwise

pytestmark = [pytest.mark.cpu_int8, pytest.mark.comfyui, pytest.mark.usefixtures("torch_single_thread")]

GROUPS = (16, 64, 256, 1024)


@pytest.fixture(scope="module")
def ck_int8(comfy: Any) -> Any:
    """comfy-kitchen's INT8 rotation helpers (imported from the fetched wheel)."""
    return importlib.import_module("comfy_kitchen.tensor.int8_utils")


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.02
    w[:, :: max(1, k // 5)] *= 20.0  # outlier input channels, the case rotation exists for
    return w


@pytest.mark.parametrize("group", GROUPS)
def test_hadamard_matches_comfy_kitchen(ck_int8: Any, group: int) -> None:
    for dtype in (torch.float64, torch.float32):
        theirs = ck_int8._build_hadamard(group, device="cpu", dtype=dtype)
        assert torch.equal(hadamard_matrix(group, dtype), theirs)
    h = hadamard_matrix(group)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(group, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_fast_transform_equals_dense(group: int) -> None:
    x = torch.randn(3, 5, 2 * group, dtype=torch.float64, generator=torch.Generator().manual_seed(group))
    dense = (x.reshape(3, 5, 2, group) @ hadamard_matrix(group)).reshape(x.shape)
    torch.testing.assert_close(fast_hadamard(x, group), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_hadamard(fast_hadamard(x, group), group), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_stored_weight_is_w_times_h_per_group(ck_int8: Any, group: int) -> None:
    k = 2 * max(group, 256)
    w = _weight(48, k, seed=group)
    qw = quantize_weight(w.float(), "int8-rot", convrot_groupsize=group)
    assert qw.comfy_quant == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
    q, scale = qw.tensors["weight"], qw.tensors["weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (48, 1) and scale.dtype == torch.float32

    # comfy-kitchen's offline rotation of W (its own code, float64): the stored int8 weight must be its
    # per-row round-to-nearest quantization, so every element is within half a step of it.
    h_ck = ck_int8._build_hadamard(group, device="cpu", dtype=torch.float64)
    w_rot = ck_int8._rotate_weight(w.float().double(), h_ck, group)
    stored = q.double() * scale.double()
    step = w_rot.abs().amax(-1, keepdim=True) / 127
    assert ((stored - w_rot).abs() <= step * (0.5 + 1e-4)).all()
    torch.testing.assert_close(scale.double(), step, rtol=1e-6, atol=0)
    # and per group, explicitly: W_rot[:, g] == W[:, g] @ H
    for g0 in range(0, k, group):
        torch.testing.assert_close(w_rot[:, g0:g0 + group], w.float().double()[:, g0:g0 + group] @ h_ck,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_comfy_kitchen_dequantizes_our_file_to_our_weight(ck_int8: Any, group: int) -> None:
    ck_eager = importlib.import_module("comfy_kitchen.backends.eager.quantization")
    w = _weight(40, 2048, seed=100 + group)
    qw = quantize_weight(w.float(), "int8-rot", convrot_groupsize=group)
    theirs = ck_eager.dequantize_int8_convrot_weight(qw.tensors["weight"], qw.tensors["weight_scale"], group)
    ours = dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64)
    torch.testing.assert_close(theirs.double(), ours, rtol=0, atol=1e-6 * float(ours.abs().max()))
    # the rotation pays off on outlier channels: per-row error of the rotated file is below the plain one
    plain = dequantize_weight(dict(zip(("weight", "weight_scale"), quantize_rowwise(w.float()), strict=True)),
                              {"format": "int8_tensorwise"}, torch.float64)
    assert (ours - w).square().sum() < (plain - w).square().sum()


def _layer(w: torch.Tensor, group: int, rotate: Any = None) -> dict[str, torch.Tensor]:
    qw = quantize_weight(w.float(), "int8-rot", convrot_groupsize=group)
    tensors = {"weight": qw.tensors["weight"], "weight_scale": qw.tensors["weight_scale"],
               "bias": torch.linspace(-0.1, 0.1, w.shape[0]), "comfy_quant": encode_comfy_quant(qw.comfy_quant)}
    if rotate is not None:  # same metadata, weight rotated by another matrix
        q, s = quantize_rowwise(rotate(w.float()))
        tensors["weight"], tensors["weight_scale"] = q, s
    return tensors


@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comfyui_layer_output_matches_float64_reference(comfy: Any, group: int, dtype: torch.dtype) -> None:
    w = _weight(64, 2048, seed=group)
    ratios = check_layer(comfy, _layer(w, group), dtype, f"convrot g={group} {dtype}")
    assert set(ratios) == ({"int8 act bound", "int8 emulated"} if dtype == torch.float32 else {"int8 act bound"})
    _, x, y = run_layer(comfy, _layer(w, group), dtype, seed=1)
    int8_original_expectation(_layer(w, group), x, w, dtype).check(y, f"convrot g={group} {dtype} vs W")
    # The reference is the original basis: x @ W_deq^T with W_deq un-rotated by our code; tie it to W itself.
    qw = quantize_weight(w.float(), "int8-rot", convrot_groupsize=group)
    w_deq = dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64)
    assert float((w_deq - w).abs().max()) <= float(qw.tensors["weight_scale"].max()) * 0.5 * math.sqrt(group)


def _sylvester(group: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < group:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(group)


@pytest.mark.stock_comfy_int8_cpu
@pytest.mark.parametrize("group", [64, 256])
def test_wrong_rotation_convention_is_caught(comfy: Any, group: int) -> None:
    w = _weight(64, 1024, seed=7)
    syl = _sylvester(group)

    def rotate(m: torch.Tensor) -> torch.Tensor:
        return (m.double().reshape(m.shape[0], -1, group) @ syl).reshape(m.shape).float()

    wrong = _layer(w, group, rotate)
    # Self-consistent: ComfyUI and our dequantizer both undo the regular H, so the file-level check passes ...
    check_layer(comfy, wrong, torch.float32, f"sylvester g={group}")
    # ... but the layer no longer computes x @ W^T, far outside the int8 bound that the right convention meets.
    _, x, y = run_layer(comfy, wrong, torch.float32)
    with pytest.raises(AssertionError, match="int8 vs original W"):
        int8_original_expectation(wrong, x, w, torch.float32).check(y, f"sylvester g={group}")
    _, x, y = run_layer(comfy, _layer(w, group), torch.float32)
    int8_original_expectation(_layer(w, group), x, w, torch.float32).check(y, f"regular g={group}")
