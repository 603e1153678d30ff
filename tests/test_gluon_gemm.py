"""The warp-specialized Gluon W8A8 GEMM (``kernels.gluon_gemm``) compiled for sm_90 here, without a GPU: the
launch arguments the runtime builds (``triton_int8._ws_launch``) match the kernel's parameters, the PTX has the
int8 wgmma and the register hand-over between warp groups, and ptxas finds no spills at the picked tile. Its
results are checked on an H200 (``check_gemm_gpu.check_ws_gemm``: bit-equal to the Triton kernels)."""

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

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import WS_W8A8
    from comfyquant.runtime.kernels.gluon_gemm import w8a8_ws

    q, w_q = torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
    s_x, sb = torch.ones(m, 1), torch.ones(n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16) if bias else None
    lr = None
    if low_rank:  # a LoRA's term as the runtime passes it: h = x @ down^T by cuBLAS, up [R, N]
        x = torch.zeros(m, k, dtype=torch.bfloat16)
        term = (torch.zeros(low_rank, k, dtype=torch.bfloat16), torch.zeros(low_rank, n, dtype=torch.bfloat16), 24)
        lr = ti._low_rank_args(term, x, sb)
    assert ti.on_ws(WS_W8A8, out, lr)
    fk, grid, args, _ = ti._ws_launch(q, s_x, w_q, sb, b, out, WS_W8A8, lr)
    assert fk.fn is w8a8_ws and grid == (min(132, -(-m // 128) * -(-n // 128)),)
    names = list(w8a8_ws.arg_names)
    by_name = dict(zip(names, args, strict=True))
    if low_rank:
        assert by_name["HAS_LR"] and by_name["h_desc"].base is lr[0][0] and by_name["u_desc"].base is lr[0][1]
    if pingpong:  # not a runtime pick yet: the variant's own arguments in place of the runtime's
        from comfyquant.runtime.kernels.gluon_gemm import descriptors, fit_stages, lr_descriptors

        # the C descriptor spans whole tiles, and so do the low-rank term's h boxes
        by_name["c_desc"] = descriptors(q, w_q, out, 128, WS_W8A8.block_n, WS_W8A8.block_k, pingpong=True)[2]
        by_name["PINGPONG"] = True
        if low_rank:
            by_name["h_desc"], by_name["u_desc"] = lr_descriptors(*ti.ws_low_rank(lr), 128, WS_W8A8.block_n)
        by_name["STAGES"] = fit_stages(WS_W8A8.stages, WS_W8A8.block_n, WS_W8A8.block_k, pingpong, bool(low_rank))
        args = tuple(by_name[nm] for nm in names)
    return _gluon_compile(w8a8_ws, args, WS_W8A8.warps)


def _gluon_compile(fn: object, args: tuple, warps: int, aligned: bool = False) -> object:
    """Gluon kernel ``fn`` compiled for sm_90 from every argument of a launch, constexprs included, in order;
    ``aligned``: as a GPU launch specializes it, tensors 16-byte aligned and the ints that are multiples of 16
    marked so (not the ``do_not_specialize`` ones)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = list(fn.arg_names)
    assert len(args) == len(names)
    const = {p.name for p in fn.params if p.is_constexpr}
    free = {p.name for p in fn.params if getattr(p, "do_not_specialize", False)}
    sig = {nm: ("constexpr" if nm in const else mangle_type(a)) for nm, a in zip(names, args, strict=True)}
    consts = {nm: a for nm, a in zip(names, args, strict=True) if nm in const}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (nm, a) in enumerate(zip(names, args, strict=True))
             if aligned and nm not in const and nm not in free
             and (isinstance(a, torch.Tensor) or (type(a) is int and a % 16 == 0))}
    return triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


@pytest.mark.parametrize(("m", "n", "k", "bias"), [(4608, 3072, 3072, True), (1000, 520, 15360, False)])
def test_compiles_for_sm90_with_wgmma_and_no_spills(m: int, n: int, k: int, bias: bool) -> None:
    kern = _compile(m, n, k, bias)
    ptx = kern.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.s32\.s8\.s8)", ptx)) == {"m64n128k32.s32.s8.s8"}
    assert "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx  # register hand-over; TMA loads and stores
    assert kern.metadata.shared <= 227 * 1024
    _assert_no_spills(ptx)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_operands_keep_the_wgmma_pipeline(dtype: torch.dtype) -> None:
    """fp8 x fp8 (``configs.WS_FP8``): fp8 wgmma into float32 partials, and ptxas keeps the wgmma pipeline. The
    compiler's own promotion (``max_num_imprecise_acc`` across the K step) read partial sums still in flight, so
    ptxas serialized every wgmma of the kernel (its C7514 note; run 27 ran 1.14-1.35x bf16 for 1.44-1.97x of
    cuBLAS fp8); ``_mainloop_promoted`` reads a step's sums once its wgmma is waited for."""
    kern = _compile(4608, 3072, 3072, True, dtype=dtype)
    ptx = kern.asm["ptx"]
    op = "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.\S+)", ptx)) == {f"m64n128k32.f32.{op}.{op}"}
    report = _assert_no_spills(ptx)
    assert "serialized" not in report and "C7514" not in report, report[-800:]


def test_the_launch_key_tells_the_operand_dtypes_apart() -> None:
    """The Gluon launch's specialization key (``triton_int8._ws_launch``: the compiled kernel is looked up by it)
    differs between int8, e4m3 and e5m2 operands of one shape. H200 run 49 caught it without the dtype: a layer's
    fp8 call ran the int8 kernel an earlier int8 layer of the same shape had compiled (errors of 0.9-11x)."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import WS_W8A8

    m, k, n = 4096, 3072, 3072
    out, sb, s_x = torch.empty(m, n, dtype=torch.bfloat16), torch.ones(n), torch.ones(m, 1)
    keys = set()
    for dt in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        q, w_q = torch.zeros(m, k, dtype=dt), torch.zeros(n, k, dtype=dt)
        key = ti._ws_launch(q, s_x, w_q, sb, None, out, WS_W8A8, ti._low_rank_args(None, q, sb))[3]
        keys.add(key)
    assert len(keys) == 3


def test_int8_operands_keep_the_wgmma_pipeline() -> None:
    """The int8 kernel, the runtime's pick since run 23: no wgmma serialized either."""
    report = _assert_no_spills(_compile(4608, 3072, 3072, True).asm["ptx"])
    assert "serialized" not in report and "C7514" not in report, report[-800:]


def _assert_no_spills(ptx: str) -> str:
    """ptxas (Triton's own, for sm_90a) reports no register spills for ``ptx``; returns its report."""
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
    return report


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
    """The same kernel on e4m3 operands (measured slower than cuBLAS fp8 in run 27: not picked): fp8 wgmma into a float32 accumulator,
    no spills."""
    kern = _compile(4608, 3072, 3072, True, torch.float8_e4m3fn)
    ptx = kern.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.f32\.\w+\.\w+)", ptx)) == {
        "m64n128k32.f32.e4m3.e4m3"}
    assert "s32.s8.s8" not in ptx
    _assert_no_spills(ptx)


def test_ping_pong_variant_compiles_with_order_barriers_and_no_spills() -> None:
    """The ping-pong variant (each consumer warp group whole 128-row tiles in turns; no faster in run 27: not picked): it compiles
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
    """A dynamic LoRA's ``h @ up`` in the Gluon epilogue, with the launch arguments the runtime builds (ping-pong:
    not picked): h and up tiles by TMA during the main loop, one bf16 wgmma per tile into a float32 accumulator
    whose layout change to the int8 one is free (no shared memory round trip); no spills; shared memory within the
    227 KB a block gets (4 stages with it)."""
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


def test_a_lora_term_takes_the_gluon_kernel_only_where_its_epilogue_holds_it() -> None:
    """``ws_low_rank`` / ``on_ws`` / ``ws_eligible``: a 16-bit term of rank <= 64 runs in the Gluon epilogue; a
    float32 one (ComfyUI's T5 runs float32 activations), a wider one, or mixed dtypes keep the Triton kernel's
    fused term; and the automatic pick follows (the Gluon tile with an eligible term, the Triton one without)."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import PERSISTENT_W8A8, WS_FP8, WS_LOW_RANK, WS_W8A8

    m, k, n = 4096, 3072, 3072
    out, sb = torch.empty(m, n, dtype=torch.bfloat16), torch.ones(n)

    def lr(r: int, dt: torch.dtype = torch.bfloat16, up_dt: torch.dtype | None = None) -> tuple:
        term = (torch.zeros(r, k, dtype=dt), torch.zeros(r, n, dtype=up_dt or dt), r)
        return ti._low_rank_args(term, torch.zeros(m, k, dtype=dt), sb)

    assert WS_LOW_RANK
    for r in (16, 32, 64):
        assert ti.ws_low_rank(lr(r)) is not None and ti.on_ws(WS_W8A8, out, lr(r))
        assert ti.ws_eligible(torch.int8, False, lr(r)) and not ti.persistent_eligible(torch.int8, False, lr(r))
    for bad in (lr(80), lr(32, torch.float32), lr(32, torch.bfloat16, torch.float16)):
        assert ti.ws_low_rank(bad) is None and not ti.on_ws(WS_W8A8, out, bad)
        assert not ti.ws_eligible(torch.int8, False, bad)
    assert not ti.ws_eligible(torch.int8, True, lr(32))  # the raw int32 accumulator: the Triton kernels
    # fp8 operands take it too (configs.WS_FP8: the kernel promotes each K step's sums itself), a term included
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert ti.ws_eligible(fp8, False, lr(32)) == WS_FP8 and not ti.ws_eligible(fp8, False, lr(80))
        none = ti._low_rank_args(None, torch.zeros(m, k), sb)
        assert ti.ws_eligible(fp8, False, none) == WS_FP8 and not ti.persistent_eligible(fp8, False, none)
    cpu = torch.device("cpu")  # device_facts: an sm_90-sized grid off CUDA
    if ti.ws_available():
        assert ti.pick_w8a8(m, n, k, cpu, False, True)[0] == WS_W8A8
    # not Gluon-eligible and not persistent-eligible (an fp8 or float32 term): the table's own tile, never the
    # persistent Triton kernel (unchecked with a low-rank term)
    plain = ti.pick_w8a8(m, n, k, cpu, False, False)[0]
    assert plain.persistent == 0 and plain != PERSISTENT_W8A8
    assert ti.pick_w8a8(m, n, k, cpu, True)[0] == (WS_W8A8 if ti.ws_available() else PERSISTENT_W8A8)


def test_the_direct_plan_launch_lays_out_the_launchers_flat_arguments() -> None:
    """``triton_plans._tma_run`` (the eager plan that expands TMA descriptors itself): the flat argument list it
    hands the C launcher equals every argument of the launch expanded in place, per-call buffers (the
    quantized activation, the output, the row scales, a LoRA's ``h = x @ down^T``) substituted, with and without
    a term, whether the output and ``h`` are tensors (the Triton kernel) or descriptors (the Gluon kernel)."""
    from comfyquant.runtime.kernels import triton_plans as tp

    class Desc:  # a host tensor descriptor: what matters is its base tensor
        def __init__(self, base: torch.Tensor) -> None:
            self.base = base

    def expand(d: Desc, i: int) -> list:  # the launcher's flat form of argument i: its base, then two fields
        return [d.base, ("shape", i, tuple(d.base.shape)), ("strides", i)]

    def flat_of(args: list) -> list:
        return [v for i, a in enumerate(args) for v in (expand(a, i) if isinstance(a, Desc) else [a])]

    x, down = torch.randn(4, 8), torch.randn(2, 8)
    q, s, w, out0, h0, up = (torch.zeros(4, 8), torch.ones(4, 1), torch.zeros(6, 8), torch.empty(4, 6),
                             torch.zeros(4, 2), torch.zeros(2, 6))
    for gluon in (False, True):
        for with_lr in (False, True):
            wrap = Desc if gluon else (lambda t: t)
            head = [Desc(q), Desc(w), wrap(out0), s, "sb", "bias", 4, 6, 8, True]
            args = head + ([wrap(h0), wrap(up)] if with_lr else [None, None]) + [with_lr, "const"]
            hi = len(head) if with_lr else None
            fired: list = []
            q2, s2 = torch.zeros(4, 8), torch.ones(4, 1)
            makers = {0: Desc, 2: Desc if gluon else None, hi: Desc if gluon else None}
            run = tp._tma_run((lambda st, *flat, fired=fired: fired.append(flat), expand),
                              lambda xx, q2=q2, s2=s2: (7, q2, s2), makers, tuple(args), hi,
                              down if with_lr else None, torch.float32, (4, 6))
            got = run(x)
            flat = list(fired[0])
            want = list(args)
            want[0], want[2], want[3] = Desc(q2), wrap(got), s2
            if with_lr:
                n_before = len(flat_of(want[:hi]))
                h = flat[n_before]  # made per call: its value, then it stands in the expected list
                assert torch.equal(h, torch.nn.functional.linear(x, down))
                want[hi] = wrap(h)
            want_flat = flat_of(want)
            assert len(flat) == len(want_flat)
            for a, b in zip(flat, want_flat, strict=True):
                assert a is b if isinstance(b, torch.Tensor) else a == b, (gluon, with_lr, a, b)
