"""The activation kernels and the split weight-only GEMM compiled for sm_90 here, without a GPU, from the
arguments the runtime builds (``triton_quant.launch_for``, ``triton_int8._w8a16_launch``): every variant the
runtime launches compiles, the quantizers divide once per row (a reciprocal; the per-element ``div.rn`` made
the row kernel issue-bound: H200 run 35), and the split kernel releases its partials with an acq_rel atomic.
Their results are checked on an H200 (``check_kernels_gpu``)."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")


def _compile(fk: object, args: tuple, warps: int, stages: int = 3, aligned: bool = False) -> object:
    """``fk``'s kernel compiled for sm_90 from ``args``; ``aligned``: with the 16-byte divisibility hints a launch
    on a GPU gives aligned tensors and ints that are multiples of 16 (without them loads are not vectorized, so
    nothing is pipelined through cp.async)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    fn = fk.fn
    names = list(fn.arg_names)
    assert len(args) == len(names)  # every parameter, constexprs included, in order
    const = {p.name for p in fn.params if p.is_constexpr}
    free = {p.name for p in fn.params if getattr(p, "do_not_specialize", False)}
    sig = {nm: ("constexpr" if nm in const else mangle_type(a)) for nm, a in zip(names, args, strict=True)}
    consts = {nm: a for nm, a in zip(names, args, strict=True) if nm in const}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (nm, a) in enumerate(zip(names, args, strict=True))
             if aligned and nm not in const and nm not in free
             and (isinstance(a, torch.Tensor) or (type(a) is int and a % 16 == 0))}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _divisions(ptx: str) -> int:
    return len(re.findall(r"\bdiv\.rn\.f32\b", ptx))


# (M, K, rotation group, mode): the block kernel's one-pass, chunked and 4-row shapes, the rotating row and tile
# kernels (convrot 256: the group-rows kernel in one pass and in steps too), static fp8
CASES = [(256, 3072, None, "int8", "auto"), (4096, 12288, None, "int8", "auto"), (4096, 1280, None, "fp8", "auto"),
         (300, 15360, None, "int8", "auto"), (16, 3072, 256, "int8", "auto"), (4096, 3072, 256, "int8", "auto"),
         (64, 5120, None, "fp8_static", "auto"), (64, 5120, None, "fp8_static", "rows"), (8, 12288, None, "fp8", "rows"),
         (4096, 3072, None, "int8", "tiles"), (1024, 12288, 256, "int8", "split"), (300, 5120, 64, "int8", "split"),
         (4096, 15360, 256, "int8", "grows"), (2048, 20480, 256, "int8", "grows"), (1024, 12288, 256, "int8", "tiles")]


@pytest.mark.parametrize(("m", "k", "group", "mode", "kernel"), CASES)
def test_activation_kernels_compile_and_divide_once_per_row(m: int, k: int, group: int | None, mode: str,
                                                            kernel: str) -> None:
    from comfyquant.runtime.kernels import triton_quant as tq

    x = torch.zeros(m, k, dtype=torch.bfloat16)
    fp8 = mode != "int8"
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty(m, 1)
    static = torch.ones(1) if mode == "fp8_static" else None
    code = {"int8": tq.MODE_INT8, "fp8": tq.MODE_FP8, "fp8_static": tq.MODE_FP8_STATIC}[mode]
    launches = tq.launch_for(x, out, scale, static, group, code, 448.0 if fp8 else 127.0, 0, 0, kernel)
    # the one-read rotating kernel launches its two halves apart off a GPU (its synchronized form: the test below)
    held = kernel == "auto" and tq.pick_kernel(x, group, code) == "held"
    assert len(launches) == (2 if kernel == "split" or held else 1)
    for fk, _, args, _, warps, stages in launches:
        assert (fk is tq._ACT_BLOCKS) == (group is None and kernel == "auto") and (fk is tq._ACT_HELD) == held
        ptx = _compile(fk, args, warps, stages).asm["ptx"]
        # the row's scale and its reciprocal (per chunk or tile at most): never one per element (16-32 a thread)
        assert _divisions(ptx) <= 8, (m, k, group, mode, _divisions(ptx))


def test_split_weight_only_gemm_compiles_with_an_acq_rel_counter() -> None:
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import w8a16_config

    m, k, n = 1, 12288, 3072
    cfg = w8a16_config(m, n, k, 132)
    assert cfg.split_k == 4 and cfg.block_n == 64
    x, w, sb = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    bufs = (torch.empty(cfg.split_k * m * n), torch.zeros(64, dtype=torch.int32))
    grid, args, _ = ti._w8a16_launch(x, w, out, sb, None, cfg, ti._low_rank_args(None, x, sb), 0, bufs)
    assert grid == (n // 64, 4)
    ptx = _compile(ti._W8A16, args, cfg.warps).asm["ptx"]
    assert re.search(r"atom\.[a-z.]*acq_rel[a-z.]*\.add", ptx), "the tile counter's atomic is not acq_rel"
    assert "ld.global.cg" in ptx  # the partials are read from L2, not a stale L1


@pytest.mark.parametrize(("m", "k", "n"), [(1, 12288, 3072), (16, 3072, 9216), (1, 3072, 21504), (16, 5120, 13824)])
def test_weight_only_gemm_on_packed_int4_compiles_without_spills(m: int, k: int, n: int) -> None:
    """``int4_rot``'s weight-only path (``packed=True``) on the configurations ``w8a16_config`` gives at 1-16 rows
    (split K on the narrow down projections, 32-128 columns on wide layers): compiles for sm_90, no spills."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import w8a16_config

    cfg = w8a16_config(m, n, k, 132)
    x, w, sb = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k // 2, dtype=torch.int8), torch.ones(n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    bufs = (torch.empty(cfg.split_k * m * n), torch.zeros(64, dtype=torch.int32)) if cfg.split_k > 1 else None
    _, args, _ = ti._w8a16_launch(x, w, out, sb, None, cfg, ti._low_rank_args(None, x, sb), 0, bufs, packed=True)
    ptx = _compile(ti._W8A16, args, cfg.warps, cfg.stages, aligned=True).asm["ptx"]
    _assert_no_spills(ptx)


def test_one_launch_w8a8_compiles_and_divides_once_per_row() -> None:
    """The one-launch W8A8 kernel quantizes its A tiles with the activation quantizer's codes (so its output is
    the two-launch path's, bit for bit: ``check_fused`` under the interpreter, ``check_linear`` on the GPU):
    a reciprocal per row and an FMA correction, not a division per element."""
    from comfyquant.runtime.kernels import triton_int8 as ti

    m, k, n = 16, 3072, 3072
    x, w, sb = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    cfg = ti.fused_config(m, n, k, x.device)
    _, args, _ = ti._fused_launch(x, w, out, sb, None, cfg, ti._low_rank_args(None, x, sb), 0)
    ptx = _compile(ti._FUSED, args, cfg.warps).asm["ptx"]
    # the tile's row scales and their reciprocals (a [BLOCK_M] vector each, at most every row in every thread)
    assert "fma.rn.f32" in ptx and _divisions(ptx) <= 2 * cfg.block_m, (_divisions(ptx), cfg)


@pytest.mark.parametrize(("m", "k", "n", "wide"), [(1024, 1280, 1280, False), (256, 5120, 1280, False),
                                                   (4096, 640, 640, False), (300, 15360, 3072, False),
                                                   (256, 1280, 10240, True), (1024, 3072, 9216, True)])
def test_row_block_w8a8_compiles_with_release_acquire_counters(m: int, k: int, n: int, wide: bool) -> None:
    """The row-block one-launch W8A8 kernel (``fused_rows``), as the runtime launches it on a GPU (phase 0:
    quantization and GEMM synchronized): its arrival is released and its wait acquires, at GPU scope, and the
    int8 rows other programs wrote are read from L2 (a stale L1 line would give old codes); ``wide``: a layer of
    more column tiles than quantizing programs (SDXL ff0, Flux qkv), whose other programs only wait."""
    from comfyquant.runtime.kernels.configs import rows_config, rows_shape

    x, w, sb = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    cfg = rows_config(m, n)
    assert rows_shape(m, n, k, cfg, wide=wide) and rows_shape(m, n, k, cfg) == (not wide)
    ck = _rows_kernel(x, w, sb)
    ptx = ck.asm["ptx"]
    assert re.search(r"atom\.global\.gpu\.release\.add", ptx), "the arrival is not a release"
    assert re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx), "the wait does not acquire"
    # the int8 rows come from L2 (cp.async.cg), pipelined over the config's stages, multiplied by wgmma
    assert "cp.async.cg.shared.global" in ptx and "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx
    stage = cfg.block_k * (cfg.block_m + cfg.block_n)
    assert ck.metadata.shared >= (cfg.stages - 1) * stage, (ck.metadata.shared, cfg)
    assert "fma.rn.f32" in ptx and _divisions(ptx) <= 8  # the activation kernel's codes: a reciprocal per row


@pytest.mark.parametrize(("rows", "held", "warps"), [(16, 2, 4), (16, 1, 4), (64, 1, 8), (64, 2, 8)])
def test_one_read_rotating_kernel_compiles_without_spills_and_waits_with_acquire(rows: int, held: int,
                                                                                  warps: int) -> None:
    """The one-read rotating kernel (``triton_quant.held_launch``, the form a GPU launches: synchronized) for
    sm_90 in the configurations ``bench_rotation.py --held`` times: its chunk held in registers without spills
    (64 rows x 2 groups on 4 warps spill: not among them), its part released before the wait, the wait's reads
    acquire, the parts read past L1, a counter reset by the last ticket and the last departure."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_quant as tq

    m, k = 4096, 12288
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    out, scale, sync = torch.empty(m, k, dtype=torch.int8), torch.empty(m, 1), torch.zeros(8192, dtype=torch.int32)
    grid, args, _, w = tq.held_launch(x, out, scale, sync, 127.0, 0, 0, rows, held, warps, phase=0)
    assert grid == (m // rows * tq.held_parts(k, held),) and args[4] is sync
    ptx = _compile(tq._ACT_HELD, args, w, 1, aligned=True).asm["ptx"]
    _assert_no_spills(ptx)
    release = ptx.index("atom.global.gpu.release.add")
    assert "ld.global.gpu.acquire" in ptx[release:] and "ld.global.cg" in ptx[release:]
    assert len(re.findall(r"atom\.global\.gpu\.relaxed\.exch", ptx)) == 2
    assert _divisions(ptx) <= 8


@pytest.mark.parametrize(("m", "bm", "bn", "warps", "stages"), [(4096, 128, 128, 8, 3), (16, 16, 128, 4, 4)])
def test_swapped_w4a8_feeds_the_unpacked_weight_to_wgmma_from_registers(m: int, bm: int, bn: int, warps: int,
                                                                       stages: int) -> None:
    """The W4A8 GEMM with the operands swapped (``triton_gemm.w4a8_swapped``, from the runtime's launch arguments):
    Hopper's wgmma takes the unpacked int4 weight as its register operand, so no shared-memory store of the weight
    remains (the other order writes it every K step: st.shared, then a descriptor operand), and at 16 rows it still
    runs wgmma (m64n16) where the other order falls back to mma.sync. No spills."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import TileConfig

    n, k = 3072, 3072
    q, p = torch.empty(m, k, dtype=torch.int8), torch.empty(n, k // 2, dtype=torch.int8)
    out, sa, sb = torch.empty(m, n, dtype=torch.bfloat16), torch.empty(m, 1), torch.empty(n)
    cfg = TileConfig(bm, bn, 128, warps, stages, 8)
    _, args, _ = ti._w4a8_launch(q, sa, p, sb, None, out, cfg, ti._low_rank_args(None, q, sb))
    ptx = {}
    for name, fk in (("swapped", ti._W4A8_SWAPPED), ("plain", ti._W4A8)):
        ptx[name] = _compile(fk, args, warps, stages, aligned=True).asm["ptx"]
    first = next(line for line in ptx["swapped"].splitlines() if "wgmma.mma_async" in line)
    assert first.split("}", 1)[1].lstrip().startswith(", {"), first  # the first operand: registers
    if bm == 16:  # the other order on mma.sync (both operands from registers, Ampere's instruction)
        assert "mma.sync" in ptx["plain"] and "wgmma" not in ptx["plain"] and "m64n16k32" in ptx["swapped"]
    else:  # the other order stores the unpacked weight to shared memory for wgmma's descriptor operand
        assert not re.search(r"\bst\.shared", ptx["swapped"]) and re.search(r"\bst\.shared", ptx["plain"])
    _assert_no_spills(ptx["swapped"])


@pytest.mark.parametrize(("m", "n"), [(4096, 9216), (256, 3072), (256, 1280)])
def test_joined_w4a8_runs_one_register_operand_mma_per_k_step(m: int, n: int) -> None:
    """The W4A8 kernel the runtime takes from 64 rows (``triton_gemm.w4a8_joined`` on ``w4a8_config``'s tile):
    the two nibble planes joined and reshaped are wgmma's register operand as loaded (no layout conversion or
    shared-memory store in the K loop) and one MMA group covers the whole K step, where the swapped order issues
    two (Triton waits on each wgmma whose operand is in registers, so the joined order halves the waits). No
    spills on the 64-weight-row tiles the rule picks."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_int8 as ti

    k = 3072
    q, p = torch.empty(m, k, dtype=torch.int8), torch.empty(n, k // 2, dtype=torch.int8)
    out, sa, sb = torch.empty(m, n, dtype=torch.bfloat16), torch.empty(m, 1), torch.empty(n)
    cfg = ti.w4a8_config(m, n, k, torch.device("cpu"))  # off CUDA: an H100/H200-sized grid
    assert ti.w4a8_order(m) == "joined" and cfg.block_n == 64 and cfg.warps == 4
    _, args, _ = ti._w4a8_launch(q, sa, p, sb, None, out, cfg, ti._low_rank_args(None, q, sb))
    asm = {name: _compile(fk, args, cfg.warps, cfg.stages, aligned=True).asm
           for name, fk in (("joined", ti._W4A8_JOINED), ("swapped", ti._W4A8_SWAPPED))}
    loops = {name: a["ttgir"][a["ttgir"].index("scf.for"):a["ttgir"].index("scf.yield")] for name, a in asm.items()}
    assert loops["joined"].count("ttng.warp_group_dot ") == 1 and loops["swapped"].count("ttng.warp_group_dot ") == 2
    assert "convert_layout" not in loops["joined"] and "local_store" not in loops["joined"]
    ptx = asm["joined"]["ptx"]
    first = next(line for line in ptx.splitlines() if "wgmma.mma_async" in line)
    assert first.split("}", 1)[1].lstrip().startswith(", {"), first  # the first operand: registers
    _assert_no_spills(ptx)  # (the epilogue may still convert the output through shared memory, outside the loop)


@pytest.mark.parametrize(("m", "n", "k"), [(4096, 3072, 64), (16, 3072, 64), (300, 1280, 320)])
def test_w4a8_takes_64_column_k_steps(m: int, n: int, k: int) -> None:
    """K a multiple of 64 but not of 128 (Flux's img_in, SD 1.5's 320 / 960): the runtime's order and tile for it
    (``w4a8_block_k`` 64) compile for sm_90 without spills, on wgmma from 64 rows and mma.sync below."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_int8 as ti

    q, p = torch.empty(m, k, dtype=torch.int8), torch.empty(n, k // 2, dtype=torch.int8)
    out, sa, sb = torch.empty(m, n, dtype=torch.bfloat16), torch.empty(m, 1), torch.empty(n)
    cfg = ti.w4a8_config(m, n, k, torch.device("cpu"))
    assert cfg.block_k == 64
    _, args, _ = ti._w4a8_launch(q, sa, p, sb, None, out, cfg, ti._low_rank_args(None, q, sb))
    ptx = _compile(ti.W4A8_KERNELS[ti.w4a8_order(m)], args, cfg.warps, cfg.stages, aligned=True).asm["ptx"]
    assert ("wgmma.mma_async" in ptx) == (m >= ti.SMALL_M) and ("mma.sync" in ptx) == (m < ti.SMALL_M)
    _assert_no_spills(ptx)


def _spill_bytes(ptx: str) -> int:
    """ptxas's spill stores for ``ptx`` (sm_90a), in bytes."""
    from test_gluon_gemm import _assert_no_spills

    try:
        _assert_no_spills(ptx)
    except AssertionError as e:
        found = re.search(r"(\d+) bytes spill stores", str(e))
        assert found is not None, str(e)[-300:]
        return int(found.group(1))
    return 0


def _rows_kernel(x: torch.Tensor, w: torch.Tensor, sb: torch.Tensor, norm: object = None,
                 counters: int = 64) -> object:
    """The row-block one-launch W8A8 kernel compiled for sm_90 (aligned) as the runtime launches it on a GPU for
    ``x`` against ``w`` (phase 0), ``norm`` folded; its tile config is ``rows_config``'s."""
    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels.configs import rows_config

    (m, k), n = x.shape, w.shape[0]
    cfg = rows_config(m, n)
    bufs = (torch.empty(m, k, dtype=torch.int8), torch.empty(m, 1), torch.zeros(counters, dtype=torch.int32))
    _, args, _ = ti._rows_launch(x, w, torch.empty(m, n, dtype=torch.bfloat16), sb, None, cfg,
                                 ti._low_rank_args(None, x, sb), 0, bufs, 0, norm)
    return _compile(ti._FUSED_ROWS, args, cfg.warps, cfg.stages, aligned=True)


@pytest.mark.parametrize(("m", "k", "n"), [(256, 4096, 12288), (300, 15360, 3072)])
def test_a_folded_norm_compiles_into_the_row_block_and_block_kernels_without_spills(m: int, k: int, n: int) -> None:
    """An RMSNorm folded into the quantizer (``acts.RowNorm``): the row-block one-launch W8A8 kernel and the block
    activation kernel compile for sm_90 with the norm's weight load and sum of squares, no register spills, and a
    reciprocal square root per row (the rest of the norm is in the row scale the epilogue applies); the per-tile
    one-launch kernel spills at most a line more than without the norm."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_int8 as ti
    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    x, w, sb = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    norm = RowNorm(torch.ones(k, dtype=torch.bfloat16), 1e-6)
    ptx = _rows_kernel(x, w, sb, norm).asm["ptx"]
    _assert_no_spills(ptx)
    assert "rsqrt.approx" in ptx and "wgmma.mma_async" in ptx
    # the per-tile one-launch kernel (under 64 rows) with the norm in both of its passes: it spills on some of its
    # tiles without a norm already (4,238 bytes at 128 columns, these compile flags); the norm adds at most a line
    small = x[:16]
    out16 = torch.empty(16, n, dtype=torch.bfloat16)
    cfg16 = ti.fused_config(16, n, k, x.device)
    spills = []
    for nm in (None, norm):
        _, args, _ = ti._fused_launch(small, w, out16, sb, None, cfg16, ti._low_rank_args(None, small, sb), 0,
                                      False, nm)
        ptx = _compile(ti._FUSED, args, cfg16.warps).asm["ptx"]
        spills.append(_spill_bytes(ptx))
    assert "rsqrt.approx" in ptx and spills[1] <= spills[0] + 128, spills
    q, s = torch.empty(m, k, dtype=torch.int8), torch.empty(m, 1)
    rows, chunk, warps = tq.block_config(m, k)
    _, args, _, warps = tq.block_launch(x, q, s, None, tq.MODE_INT8, 127.0, 0, 0, rows, chunk, warps, norm)
    ptx = _compile(tq._ACT_BLOCKS, args, warps).asm["ptx"]
    _assert_no_spills(ptx)
    assert "rsqrt.approx" in ptx


@pytest.mark.parametrize(("m", "k", "n", "mode"), [(4608, 3072, 9216, "int8"), (1536, 5120, 15360, "fp8"),
                                                   (512, 1536, 6144, "int8"), (300, 8192, 4096, "int8")])
def test_a_modulated_norm_compiles_into_the_block_and_row_block_kernels_without_spills(m: int, k: int, n: int,
                                                                                        mode: str) -> None:
    """A DiT block's modulated LayerNorm folded into the quantizer (``acts.ModulatedNorm``: Flux's 3,072-wide,
    Wan's 5,120, SD3's 1,536 rows, and the widest a quantizer holds): the block activation kernel (one pass, rows in
    registers, whatever chunk its configuration would take), the row-block one-launch W8A8 kernel and the rotating
    row kernel compile for sm_90 without register spills, with one reciprocal square root per row and the
    division once per row."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import ModulatedNorm

    x = torch.zeros(m, k, dtype=torch.bfloat16)
    norm = ModulatedNorm(torch.zeros(2, 2 * k, dtype=torch.bfloat16), 1e-6, m // 2)
    fp8 = mode == "fp8"
    q, s = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8), torch.empty(m, 1)
    (fk, _, args, _, warps, stages), = tq.launch_for(x, q, s, None, None, tq.MODE_FP8 if fp8 else tq.MODE_INT8,
                                                   448.0 if fp8 else 127.0, 0, 0, "auto", norm)
    assert fk is tq._ACT_BLOCKS and args[11] == 1  # the block kernel, one pass
    ptx = _compile(fk, args, warps, stages).asm["ptx"]
    _assert_no_spills(ptx)
    assert "rsqrt.approx" in ptx and _divisions(ptx) <= 8
    if fp8:
        return
    ptx = _rows_kernel(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n), norm, 256).asm["ptx"]
    _assert_no_spills(ptx)
    assert "rsqrt.approx" in ptx and "wgmma.mma_async" in ptx
    # rotated (int8-rot, int4-rot): the row kernel normalizes and modulates the row, then rotates it (convrot 256),
    # int8 codes and the weight-only paths' rotation alone
    for code, dt in ((tq.MODE_INT8, torch.int8), (tq.MODE_FLOAT, torch.bfloat16)):
        (fk, _, args, _, warps, stages), = tq.launch_for(x, torch.empty(m, k, dtype=dt), s, None, 256, code, 127.0,
                                                       0, 0, "auto", norm)
        assert fk is tq._ACT and args[9] == 1  # the row kernel, the row in one block
        ptx = _compile(fk, args, warps, stages).asm["ptx"]
        _assert_no_spills(ptx)
        assert "rsqrt.approx" in ptx


@pytest.mark.parametrize(("m", "k", "group", "mode", "dtype"), [(256, 4096, 256, "int8", torch.bfloat16),
                                                                  (256, 10240, 256, "int8", torch.float32),
                                                                  (16, 4096, 256, "float", torch.bfloat16),
                                                                  (8, 10240, 64, "float", torch.float32)])
def test_a_folded_norm_compiles_into_the_rotating_row_kernel_without_spills(m: int, k: int, group: int, mode: str,
                                                                           dtype: torch.dtype) -> None:
    """A convrot layer's norm folded into the row kernel (what ``launch_for`` runs for a rotation with a norm, in
    place of the tile / split / one-read kernels): its codes (the W8A8 path) and the rotation alone (the
    weight-only path's pass), rows in registers (K <= 8,192) and in chunks (T5's 10,240-wide down projection,
    fp32 rows as ComfyUI runs its text encoders): sm_90, no spills, one reciprocal square root per row."""
    from test_gluon_gemm import _assert_no_spills

    from comfyquant.runtime.kernels import triton_quant as tq
    from comfyquant.runtime.kernels.acts import RowNorm

    x = torch.zeros(m, k, dtype=dtype)
    code = tq.MODE_INT8 if mode == "int8" else tq.MODE_FLOAT
    out = torch.empty(m, k, dtype=torch.int8 if mode == "int8" else torch.bfloat16)
    norm = RowNorm(torch.ones(k, dtype=dtype), 1e-6)
    launches = tq.launch_for(x, out, torch.empty(m, 1), None, group, code, 127.0, 0, 0, "auto", norm)
    assert len(launches) == 1 and launches[0][0] is tq._ACT
    fk, _, args, _, warps, stages = launches[0]
    ptx = _compile(fk, args, warps, stages).asm["ptx"]
    _assert_no_spills(ptx)
    assert len(re.findall(r"\brsqrt\.approx", ptx)) >= 1 and _divisions(ptx) <= 8
