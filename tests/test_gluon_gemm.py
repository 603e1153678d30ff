"""The warp-specialized Gluon W8A8 GEMM (``kernels.gluon_gemm``) compiled for sm_90 here, without a GPU: the
launch arguments the runtime builds (``triton_int8._ws_launch``) match the kernel's parameters, the PTX has the
int8 wgmma and the register hand-over between warp groups, and ptxas finds no spills at the picked tile. Its
results are checked on an H200 (``check_kernels_gpu.check_ws_gemm``: bit-equal to the Triton kernels)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")


def _compile(m: int, n: int, k: int, bias: bool, dtype: torch.dtype = torch.int8, pingpong: bool = False,
             low_rank: int = 0) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import WS_W8A8
    from comfyquant.runtime.kernels.gluon_gemm import w8a8_ws

    q, w_q = torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
    s_x, sb = torch.ones(m, 1), torch.ones(n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16) if bias else None
    assert ti.on_ws(WS_W8A8, out)
    fk, grid, args, _ = ti._ws_launch(q, s_x, w_q, sb, b, out, WS_W8A8)
    assert fk.fn is w8a8_ws and grid == (min(132, -(-m // 128) * -(-n // 128)),)
    names = list(w8a8_ws.arg_names)
    if pingpong or low_rank:  # not runtime picks yet: the variant's own arguments in place of the runtime's
        from comfyquant.runtime.kernels.gluon_gemm import descriptors, fit_stages, lr_descriptors

        by_name = dict(zip(names, args, strict=True))
        if pingpong:  # the C descriptor spans whole tiles
            by_name["c_desc"] = descriptors(q, w_q, out, 128, WS_W8A8.block_n, WS_W8A8.block_k, pingpong=True)[2]
            by_name["PINGPONG"] = True
        if low_rank:
            h, up = torch.zeros(m, low_rank, dtype=torch.bfloat16), torch.zeros(low_rank, n, dtype=torch.bfloat16)
            rows = by_name["c_desc"].block_shape[0]
            by_name["h_desc"], by_name["u_desc"] = lr_descriptors(h, up, rows, WS_W8A8.block_n)
            by_name["HAS_LR"] = True
        by_name["STAGES"] = fit_stages(WS_W8A8.stages, WS_W8A8.block_n, WS_W8A8.block_k, pingpong, bool(low_rank))
        args = tuple(by_name[nm] for nm in names)
    assert len(args) == len(names)  # every parameter, constexprs included, in order
    const = {p.name for p in w8a8_ws.params if p.is_constexpr}
    sig = {nm: ("constexpr" if nm in const else mangle_type(a)) for nm, a in zip(names, args, strict=True)}
    consts = {nm: a for nm, a in zip(names, args, strict=True) if nm in const}
    return triton.compile(GluonASTSource(w8a8_ws, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": WS_W8A8.warps})


@pytest.mark.parametrize(("m", "n", "k", "bias"), [(4608, 3072, 3072, True), (1000, 520, 15360, False)])
def test_compiles_for_sm90_with_wgmma_and_no_spills(m: int, n: int, k: int, bias: bool) -> None:
    kern = _compile(m, n, k, bias)
    ptx = kern.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.s32\.s8\.s8)", ptx)) == {"m64n128k32.s32.s8.s8"}
    assert "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx  # register hand-over; TMA loads and stores
    assert kern.metadata.shared <= 227 * 1024
    _assert_no_spills(ptx)


def _assert_no_spills(ptx: str) -> None:
    """ptxas (Triton's own, for sm_90a) reports no register spills for ``ptx``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        rep = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    finally:
        os.unlink(f.name)
    report = rep.stdout + rep.stderr
    assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, report[-500:]


def test_the_gluon_kernel_takes_only_16_bit_outputs_with_aligned_rows() -> None:
    """``on_ws``: its epilogue stores bf16 / fp16 tiles through TMA, so a float32 output (ComfyUI's T5 runs float32
    activations: a batch of prompts reaches 1,024 rows) or a row stride TMA cannot store stays on the Triton
    kernel; a non-Gluon config never takes it."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import PERSISTENT_W8A8, WS_W8A8

    assert ti.on_ws(WS_W8A8, torch.empty(1024, 4096, dtype=torch.bfloat16))
    assert ti.on_ws(WS_W8A8, torch.empty(1024, 4096, dtype=torch.float16))
    assert not ti.on_ws(WS_W8A8, torch.empty(1024, 4096, dtype=torch.float32))
    assert not ti.on_ws(WS_W8A8, torch.empty(1024, 4100, dtype=torch.bfloat16)[:, :4093])  # 8200-byte rows
    assert not ti.on_ws(PERSISTENT_W8A8, torch.empty(1024, 4096, dtype=torch.bfloat16))


def test_fp8_operands_compile_to_fp8_wgmma_with_float32_promotion() -> None:
    """The same kernel on e4m3 operands (not picked by the runtime yet): fp8 wgmma into a float32 accumulator,
    no spills."""
    kern = _compile(4608, 3072, 3072, True, torch.float8_e4m3fn)
    ptx = kern.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.f32\.\w+\.\w+)", ptx)) == {
        "m64n128k32.f32.e4m3.e4m3"}
    assert "s32.s8.s8" not in ptx
    _assert_no_spills(ptx)


def test_ping_pong_variant_compiles_with_order_barriers_and_no_spills() -> None:
    """The ping-pong variant (each consumer warp group whole 128-row tiles in turns; not picked yet): it compiles
    for sm_90, both groups issue int8 wgmma, and a 128x128 int32 accumulator per group fits without spills."""
    kern = _compile(4608, 3072, 3072, True, pingpong=True)
    ptx = kern.asm["ptx"]
    assert "m64n128k32.s32.s8.s8" in ptx and kern.metadata.shared <= 227 * 1024
    _assert_no_spills(ptx)


def test_only_a_triton_with_the_gluon_api_it_was_written_for_picks_it() -> None:
    """Triton 3.4 / 3.5 (torch 2.8-2.10) have an earlier Gluon: the Triton kernels keep those layers."""
    from comfyquant.runtime.kernels.triton_int8 import ws_available, ws_supported

    assert ws_supported("3.6.0") and ws_supported("3.7.1") and ws_supported("4.0.0+git1234")
    assert not ws_supported("3.5.1") and not ws_supported("3.4.0") and not ws_supported("2.3.1")
    assert ws_available() is ws_supported(triton.__version__)


@pytest.mark.parametrize("pingpong", [False, True])
def test_low_rank_epilogue_compiles_with_a_16_bit_wgmma_and_no_spills(pingpong: bool) -> None:
    """A dynamic LoRA's ``h @ up`` in the Gluon epilogue (not picked yet): h and up tiles by TMA during the main
    loop, one bf16 wgmma per tile into a float32 accumulator whose layout change to the int8 one is free (no
    shared memory round trip); no spills; shared memory within the 227 KB a block gets (4 stages with it)."""
    from comfyquant.runtime.kernels.configs import WS_W8A8

    kern = _compile(4608, 3072, 3072, True, low_rank=32, pingpong=pingpong)
    ptx = kern.asm["ptx"]
    assert "m64n128k32.s32.s8.s8" in ptx and re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.bf16", ptx)
    assert kern.metadata.shared <= 227 * 1024, (kern.metadata.shared, WS_W8A8.stages)
    _assert_no_spills(ptx)


def test_stages_fit_shared_memory_with_each_variant() -> None:
    """``fit_stages`` keeps the picked tile's 5 stages where they fit (ping-pong's two 128-row output buffers
    included) and cuts them where the variant's buffers need the room: 4 with a low-rank term, 3 for both."""
    from comfyquant.runtime.kernels.gluon_gemm import fit_stages

    assert fit_stages(5, 128, 128) == 5
    assert fit_stages(5, 128, 128, low_rank=True) == 4
    assert fit_stages(5, 128, 128, pingpong=True) == 5
    assert fit_stages(5, 128, 128, pingpong=True, low_rank=True) == 3
    assert fit_stages(3, 256, 128) == 3
