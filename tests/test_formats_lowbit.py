"""``int4-rot``, ``nvfp4`` and ``mxfp8``: byte layouts against comfy-kitchen 0.2.40's own code, round trips against
stated float64 bounds, the registry entries, and shapes the formats refuse.

comfy-kitchen's eager quantizers run on the CPU: with the same inputs our bytes must equal theirs (E2M1 rounding,
nibble order, cuBLAS scale swizzle, E8M0 exponents), their dequantizers must read our bytes as our dequantizer
does, and our default scale search must never lose to their absmax quantizer.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from comfyui_reference import check_layer, run_layer

from comfyquant import formats
from comfyquant.formats import FormatShapeError, get_format, quantize_weight
from comfyquant.io.comfy_meta import encode_comfy_quant
from comfyquant.quant import fp4, int4, mx, swizzle
from comfyquant.quant.hadamard import rotate_weight
from comfyquant.testing.synthetic import student_t4

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("torch_single_thread")]

SHAPES = [(48, 256), (200, 1024), (130, 64)]  # N not a multiple of 128 / 16 exercises the scale padding


@pytest.fixture(scope="module")
def ck(comfy: Any) -> Any:
    """comfy-kitchen's eager quantization backend and float utilities (from the fetched wheel)."""
    ns = {name: importlib.import_module(f"comfy_kitchen.{name}") for name in (
        "float_utils", "backends.eager.quantization", "backends.eager.convrot_w4a4", "backends.eager.svdquant")}
    return type("CK", (), {"fu": ns["float_utils"], "q": ns["backends.eager.quantization"],
                           "w4a4": ns["backends.eager.convrot_w4a4"], "svd": ns["backends.eager.svdquant"]})


def heavy(n: int, k: int, seed: int) -> torch.Tensor:
    """Student-t weights with outlier input channels (comfyquant.testing.synthetic's statistics)."""
    w = student_t4(n * k, torch.Generator().manual_seed(seed)).reshape(n, k) * 0.02
    w[:, :: max(1, k // 4)] *= 20.0
    return w


# ---- element codecs and layouts ---------------------------------------------------------------------------
def test_e2m1_rounds_to_nearest_even_and_matches_kitchen(ck: Any) -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, -0.0, -0.25, -5.0, -1e-9])
    assert fp4.encode_e2m1(ties).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 7, 8, 8, 14, 8]
    y = torch.cat([torch.linspace(-7, 7, 20001), ties])
    theirs = ck.fu._f32_to_floatx_unpacked(y.clamp(-6, 6).contiguous(), 2, 1)
    assert torch.equal(fp4.encode_e2m1(y), theirs)
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fp4.decode_e2m1(codes), ck.fu._floatx_unpacked_to_f32(codes, 2, 1))
    assert torch.equal(fp4.encode_e2m1(fp4.decode_e2m1(codes)), torch.where(codes == 8, 8, codes).to(torch.uint8))


def test_nibble_packing_matches_kitchen(ck: Any) -> None:
    g = torch.Generator().manual_seed(0)
    c4 = torch.randint(0, 16, (7, 34), generator=g, dtype=torch.uint8)
    assert torch.equal(fp4.pack_fp4(c4), ck.fu.pack_uint4(c4))  # nvfp4: even element in the high nibble
    assert torch.equal(fp4.unpack_fp4(fp4.pack_fp4(c4)), c4)
    i4 = torch.randint(-8, 8, (7, 34), generator=g, dtype=torch.int8)
    packed = int4.pack_int4(i4)
    assert packed.dtype == torch.int8 and torch.equal(packed, ck.svd._pack_int4_row_major(i4))  # low nibble first
    assert torch.equal(int4.unpack_int4(packed), i4)


@pytest.mark.parametrize("shape", [(5, 3), (128, 4), (200, 9), (300, 64)])
def test_scale_swizzle_matches_kitchen(ck: Any, shape: tuple[int, int]) -> None:
    s = torch.randint(0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = swizzle.swizzle(s)
    assert ours.shape == swizzle.swizzled_shape(*shape)
    assert torch.equal(ours, ck.fu.to_blocked(s, flatten=False))
    assert torch.equal(swizzle.unswizzle(ours.flatten(), *shape), s)


def test_e8m0_exponents_are_exact() -> None:
    amax = torch.tensor([448.0, 448.0 * 2**-3, 449.0, 448.0 * (1 - 2**-20), 1e-45, 0.0, 3e38])
    scale = mx.e8m0_to_float(mx.e8m0_from_amax(amax))
    assert scale.tolist()[:6] == [1.0, 2.0**-3, 2.0, 1.0, 2.0**-126, 0.0]  # tiny blocks: the smallest scale
    normal = torch.tensor([0, 1, 2, 3, 6])
    assert bool((amax[normal] / scale[normal] <= 448).all())  # no block clips ...
    assert bool((amax[normal] / scale[normal] > 224).all())  # ... with the smallest such power of two


# ---- formats against comfy-kitchen ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_bytes_and_dequantization_match_kitchen(ck: Any, shape: tuple[int, int]) -> None:
    w = heavy(*shape, seed=shape[0])
    plain = quantize_weight(w, "nvfp4", scale_search=False)
    q, bs = ck.q.quantize_nvfp4(w, plain.tensors["weight_scale_2"])
    assert torch.equal(plain.tensors["weight"], q)
    assert plain.tensors["weight_scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(plain.tensors["weight_scale"].view(torch.uint8), bs.view(torch.uint8))
    assert plain.tensors["weight_scale_2"] == w.abs().max() / (448 * 6)
    theirs = ck.q.dequantize_nvfp4(q, plain.tensors["weight_scale_2"], bs, torch.float32)
    assert torch.equal(formats.dequantize_weight(plain.tensors, plain.comfy_quant), theirs)
    searched = quantize_weight(w, "nvfp4")  # default: per-block e4m3 scale search
    err = {name: (formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64) - w.double()).square()
           for name, qw in (("rtn", plain), ("search", searched))}
    block_err = {k: v.reshape(shape[0], -1, 16).sum(-1) for k, v in err.items()}
    assert bool((block_err["search"] <= block_err["rtn"]).all())  # never worse, block by block
    assert float(err["search"].sum()) < float(err["rtn"].sum())
    # the gain where no outlier channel dominates every block (Student-t, measured ~13% at 1024 x 1024)
    t4 = student_t4(shape[0] * shape[1], torch.Generator().manual_seed(4)).reshape(shape).double()
    rel = [float((formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64) - t4).square().sum())
           for qw in (quantize_weight(t4, "nvfp4", scale_search=False), quantize_weight(t4, "nvfp4"))]
    assert rel[1] < 0.92 * rel[0]
    theirs = ck.q.dequantize_nvfp4(searched.tensors["weight"], searched.tensors["weight_scale_2"],
                                   searched.tensors["weight_scale"], torch.float32)
    assert torch.equal(formats.dequantize_weight(searched.tensors, searched.comfy_quant), theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp8_bytes_and_dequantization_match_kitchen(ck: Any, shape: tuple[int, int]) -> None:
    w = heavy(*shape, seed=shape[1])
    ours = quantize_weight(w, "mxfp8")
    q, bs = ck.q.quantize_mxfp8(w)
    assert ours.tensors["weight"].dtype == torch.float8_e4m3fn and torch.equal(ours.tensors["weight"].view(torch.uint8),
                                                                                q.view(torch.uint8))
    assert ours.tensors["weight_scale"].dtype == torch.uint8  # safetensors cannot read F8_E8M0 back
    assert torch.equal(ours.tensors["weight_scale"], bs.view(torch.uint8))
    theirs = ck.q.dequantize_mxfp8(q, ours.tensors["weight_scale"].view(torch.float8_e8m0fnu), torch.float32)
    assert torch.equal(formats.dequantize_weight(ours.tensors, ours.comfy_quant), theirs)


@pytest.mark.parametrize("group", [64, 256])
def test_int4_rot_layout_matches_kitchen_and_error_is_no_worse(ck: Any, group: int) -> None:
    w = heavy(96, 1024, seed=group)
    q, s = ck.w4a4.quantize_convrot_w4a4_weight(w, convrot_groupsize=group)
    conf = {"format": "convrot_w4a4", "convrot_groupsize": group}
    # our dequantizer reads their bytes as they do (rotation undone; the two rotations round differently in fp32:
    # a few sqrt(group) units in the last place of the largest value; an AMX Xeon read 1.4e-6 of it at 256, which
    # the former 1e-6 bound refused)
    theirs = ck.w4a4.dequantize_convrot_w4a4_weight(q, s, convrot_groupsize=group)
    torch.testing.assert_close(formats.dequantize_weight({"weight": q, "weight_scale": s}, conf), theirs,
                               rtol=0, atol=4 * group ** 0.5 * 2.0 ** -24 * float(theirs.abs().max()))
    plain = quantize_weight(w, "int4-rot", convrot_groupsize=group, scale_search=False)
    assert plain.comfy_quant == conf and plain.tensors["weight_scale"].shape == s.shape == (96,)
    torch.testing.assert_close(plain.tensors["weight_scale"], s, rtol=1e-6, atol=0)
    ours_codes, their_codes = int4.unpack_int4(plain.tensors["weight"]), int4.unpack_int4(q)
    differ = ours_codes != their_codes  # only where fp32 rotations round a tie to different sides
    assert int(differ.sum()) <= 2 and int((ours_codes - their_codes).abs().max()) <= 1
    best = quantize_weight(w, "int4-rot", convrot_groupsize=group)
    w64 = w.double()
    row_err = {name: (formats.dequantize_weight(t, conf, torch.float64) - w64).square().sum(-1)
               for name, t in (("ck", {"weight": q, "weight_scale": s}), ("ours", best.tensors))}
    assert bool((row_err["ours"] <= row_err["ck"] * (1 + 1e-9)).all())
    assert float(row_err["ours"].sum()) < 0.8 * float(row_err["ck"].sum())


def test_comfyui_reads_our_convrot_w4a4_group_and_linear_dtype(comfy: Any) -> None:
    """ComfyUI takes our ``convrot_groupsize`` and (optional) ``linear_dtype`` into its layout parameters."""
    w = heavy(64, 1024, seed=0)
    for options, group, linear_dtype in (({"convrot_groupsize": 64}, 64, "int4"),
                                         ({"linear_dtype": "int8"}, 256, "int8")):
        qw = quantize_weight(w, "int4-rot", **options)
        tensors = {**qw.tensors, "comfy_quant": encode_comfy_quant(qw.comfy_quant)}
        lin, _, _ = run_layer(comfy, tensors, torch.float32)
        params = lin.weight._params
        assert (params.convrot_groupsize, params.quant_group_size, params.linear_dtype) == (group, 64, linear_dtype)
        check_layer(comfy, tensors, torch.float32, f"int4-rot {options}")


# ---- round trips against float64 bounds -------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_bounds(shape: tuple[int, int]) -> None:
    w = heavy(*shape, seed=3).double()
    # int4-rot: in the rotated basis every element is within half a step of the grid or clipped at 7 steps
    qw = quantize_weight(w, "int4-rot")
    g = qw.params["convrot_groupsize"]
    s = qw.tensors["weight_scale"].double().reshape(-1, 1)
    w_rot = rotate_weight(w, g)
    back = rotate_weight(formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64), g)
    bound = torch.maximum(s / 2, w_rot.abs() - 7 * s) * (1 + 1e-6)
    assert bool(((back - w_rot).abs() <= bound).all())
    # nvfp4: half an E2M1 step (<= 1 scale unit) unless clipped at 6 units
    qw = quantize_weight(w, "nvfp4")
    unit = formats.get_format("nvfp4").element_scale(qw.tensors, qw.params, shape).double()
    err = (formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64) - w).abs()
    assert bool((err <= torch.maximum(unit, w.abs() - 6 * unit) * (1 + 1e-6)).all())
    # mxfp8: e4m3 rounding (relative 2^-4, half a subnormal step 2^-10 scale units), never clipped
    qw = quantize_weight(w, "mxfp8")
    unit = formats.get_format("mxfp8").element_scale(qw.tensors, qw.params, shape).double()
    err = (formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64) - w).abs()
    assert bool((err <= 2.0**-4 * w.abs() + 2.0**-10 * unit + 1e-300).all())


@pytest.mark.parametrize("name", ["int4-rot", "nvfp4", "mxfp8"])
def test_zero_weights_and_blocks_dequantize_to_zero(name: str) -> None:
    w = heavy(130, 256, seed=5)
    w[3] = 0.0
    w[:, 32:64] = 0.0
    w[7, :128] = 1e-30  # underflows nvfp4's e4m3 block scale: the block is stored as zeros, never NaN
    for weight in (w, torch.zeros(130, 256)):
        qw = quantize_weight(weight, name)
        back = formats.dequantize_weight(qw.tensors, qw.comfy_quant, torch.float64)
        assert bool(torch.isfinite(back).all())
        zero = weight == 0 if name != "int4-rot" else weight.abs().sum(-1, keepdim=True).expand_as(weight) == 0
        assert bool((back[zero] == 0).all())  # zero elements (int4-rot: zero rows, rotation mixes a row)
        assert float((back - weight.double()).abs().max()) <= 0.2 * float(weight.abs().max())


def test_row_chunks() -> None:
    """int4-rot rows quantize independently; the block-scaled formats are quantized whole (nvfp4's global scale
    couples all rows, and both pad their swizzled scales to 128-row tiles)."""
    assert get_format("int4-rot").row_chunk({}) == 1
    assert get_format("nvfp4").row_chunk({}) is None and get_format("mxfp8").row_chunk({}) is None


def test_take_rows_matches_dequantized_rows() -> None:
    w = heavy(200, 512, seed=9)
    rows = torch.tensor([0, 5, 130, 199])
    for name in ("int4-rot", "nvfp4", "mxfp8"):
        qw = quantize_weight(w, name)
        sub = qw.fmt.take_rows(qw.tensors, qw.params, rows)
        assert sub is not None
        full = formats.dequantize_weight(qw.tensors, qw.comfy_quant)
        assert torch.equal(formats.dequantize_weight(sub, qw.comfy_quant), full[rows]), name


# ---- registry entries, metadata, bad shapes ---------------------------------------------------------------
def test_registry_entries_and_metadata_round_trip() -> None:
    expect = {"int4-rot": ("convrot_w4a4", "int4_rot", 4.0), "nvfp4": ("nvfp4", "nvfp4", 4.5),
              "mxfp8": ("mxfp8", "mxfp8", 8.25)}
    for name, (comfy_format, kind, bits) in expect.items():
        fmt = get_format(name)
        assert (fmt.comfy_format, fmt.kernel_kind, fmt.bits, fmt.stock_comfy) == (comfy_format, kind, bits, True)
        assert comfy_format in formats.STOCK_COMFY_0_30 and get_format(comfy_format) is fmt
        qw = quantize_weight(heavy(64, 512, seed=1), name, full_precision_matrix_mult=True)
        assert qw.comfy_quant["full_precision_matrix_mult"] is True
        tensors = {k: v for k, v in qw.tensors.items()}
        assert formats.identify(qw.comfy_quant, tensors) is fmt
        back = fmt.params_from_conf(qw.comfy_quant)
        assert fmt.comfy_quant(back) == qw.comfy_quant
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        assert fmt.validate("L", qw.comfy_quant, shapes, (64, 512)) == []
        slots = {s.suffix: (s.dtype, s.shape) for s in fmt.slots((64, 512), qw.params)}
        assert slots == shapes
    assert get_format("int4-rot").resolve((8, 1024))["convrot_groupsize"] == 256
    conf = get_format("int4-rot").comfy_quant(get_format("int4-rot").resolve((8, 1024), {"linear_dtype": "int8"}))
    assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 256, "linear_dtype": "int8"}
    assert get_format("int4-rot").params_from_conf({"format": "convrot_w4a4"})["convrot_groupsize"] == 256


def test_validate_reports_wrong_scales() -> None:
    for name, bad, why in (
        ("nvfp4", {"weight_scale": (torch.float8_e4m3fn, (64, 32))}, "weight_scale shape"),
        ("nvfp4", {"weight_scale_2": None}, "without weight_scale_2"),
        ("mxfp8", {"weight_scale": (torch.float32, (128, 16))}, "weight_scale is float32"),
        ("int4-rot", {"weight_scale": (torch.float32, (64, 2))}, "weight_scale shape"),
    ):
        qw = quantize_weight(heavy(64, 512, seed=2), name)
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in qw.tensors.items()}
        for k, v in bad.items():
            if v is None:
                del shapes[k]
            else:
                shapes[k] = v
        problems = qw.fmt.validate("L", qw.comfy_quant, shapes, (64, 512))
        assert problems and why in problems[0], (name, problems)
    e8m0 = quantize_weight(heavy(64, 512, seed=2), "mxfp8")
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in e8m0.tensors.items()}
    shapes["weight_scale"] = (torch.float8_e8m0fnu, shapes["weight_scale"][1])  # ComfyUI's own dtype for them
    assert e8m0.fmt.validate("L", e8m0.comfy_quant, shapes, (64, 512)) == []


@pytest.mark.parametrize(("name", "k", "options", "reason"), [
    ("nvfp4", 200, {}, "in_features 200 is not a multiple of its scale block 16"),
    ("mxfp8", 208, {}, "in_features 208 is not a multiple of its scale block 32"),
    ("int4-rot", 96, {}, "in_features 96 is not a multiple of 64"),
    ("int4-rot", 512, {"convrot_groupsize": 1024}, "not a multiple of the convrot group 1024"),
    ("int4-rot", 512, {"convrot_groupsize": 128}, "not a power of 4"),
    ("int4-rot", 512, {"linear_dtype": "fp4"}, "linear_dtype must be one of int4, int8"),
])
def test_shapes_the_formats_cannot_take(name: str, k: int, options: dict[str, Any], reason: str) -> None:
    with pytest.raises(FormatShapeError, match=reason):
        quantize_weight(torch.randn(32, k), name, **options)
