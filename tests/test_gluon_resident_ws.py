"""The warp-specialized resident W8A8 kernel (``kernels.gluon_resident_ws``) compiled for sm_90 here, without a
GPU, from the arguments its launcher builds: int8 wgmma on the codes it holds, the weight by TMA, its mbarrier
protocol and register hand-over, no spills, and shared memory within the model's bound and a block's limit. Its
output is checked bit for bit against the two-launch path on a GPU (``check_gemm_gpu.check_resident_ws``)."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from test_gluon_gemm import _assert_no_spills, _gluon_compile  # noqa: E402

from comfyquant.runtime.kernels.configs import HOPPER_SMEM  # noqa: E402

H200_SMS = 132
# SDXL attention 640, CLIP attention, SDXL attention 1,280 (64-wide tiles: 128-wide ones leave no 3-deep ring)
SHAPES = [(16384, 640, 640), (4096, 768, 768), (1024, 640, 640), (4096, 1280, 1280)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_compiles_for_sm90_with_wgmma_tma_barriers_and_no_spills(m: int, n: int, k: int, bias: bool) -> None:
    from comfyquant.runtime.kernels import gluon_resident_ws as ws

    cfg = ws.resident_ws_config(m, n, k, H200_SMS)
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    w = torch.zeros(n, k, dtype=torch.int8)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    grid, args = ws.launch_args(x, ws.weight_descriptor(w, cfg), out, torch.ones(n),
                                torch.zeros(n, dtype=torch.bfloat16) if bias else None, cfg)
    assert grid == (-(-m // 128), cfg.splits)
    ck = _gluon_compile(ws.w8a8_resident_ws, args, ws.WARPS, aligned=True)
    ptx = ck.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.s32\.s8\.s8)", ptx)) == {
        f"m64n{cfg.block_n}k32.s32.s8.s8"}
    assert "cp.async.bulk.tensor" in ptx  # the weight tiles by TMA (and the output's stores)
    assert "cp.async.bulk.tensor.2d.global.shared" in ptx  # the TMA store of the output
    assert "mbarrier.try_wait.parity" in ptx and "mbarrier.arrive" in ptx and "setmaxnreg" in ptx
    assert "fence.proxy.async" in ptx  # the quantizer's codes made visible to wgmma
    assert ck.metadata.shared <= ws.resident_ws_smem(cfg.block_n, cfg.block_k, cfg.stages, k) <= HOPPER_SMEM
    _assert_no_spills(ptx)


@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (77, 768, 768), (11264, 640, 640), (256, 1024, 1024),
                                           (5000, 1000, 1024), (300, 64, 192), (16384, 1280, 1280),
                                           (77, 1280, 1280)])
def test_config_gives_every_split_a_tile_and_about_one_program_per_sm(m: int, n: int, k: int) -> None:
    from comfyquant.runtime.kernels import gluon_resident_ws as ws

    cfg = ws.resident_ws_config(m, n, k, H200_SMS)
    assert cfg is not None and cfg.block_m == 128
    assert ws.resident_ws_smem(cfg.block_n, cfg.block_k, cfg.stages, k) <= HOPPER_SMEM
    tiles, rows = -(-n // cfg.block_n), -(-m // 128)
    per = -(-tiles // cfg.splits)
    assert 1 <= cfg.splits <= tiles and (cfg.splits - 1) * per < tiles  # the last split has a column tile
    programs = rows * cfg.splits
    assert programs <= max(H200_SMS, rows)  # one per SM (more only where the row blocks alone are more)
    assert programs >= min(H200_SMS, rows * tiles) // 2


def test_refuses_what_it_cannot_run_with_one_line() -> None:
    from comfyquant.runtime.kernels import gluon_resident_ws as ws

    w = torch.zeros(64, 640, dtype=torch.int8)
    assert ws.refusal(torch.zeros(4, 640, dtype=torch.bfloat16), w, torch.bfloat16) is None
    assert ws.refusal(torch.zeros(4, 640, dtype=torch.float16), w, torch.float16) is None
    assert ws.refusal(torch.zeros(4, 1280, dtype=torch.bfloat16), torch.zeros(64, 1280, dtype=torch.int8),
                      torch.bfloat16) is None  # SDXL attention 1,280
    wide = ws.refusal(torch.zeros(4, 1536, dtype=torch.bfloat16), torch.zeros(64, 1536, dtype=torch.int8),
                      torch.bfloat16)
    fp32 = ws.refusal(torch.zeros(4, 640), w, torch.float32)
    for why in (wide, fp32):
        assert why and "\n" not in why
    assert "1280" in wide and "1536" in wide and "float32" in fp32
    assert ws.resident_ws_config(4096, 1536, 1536, H200_SMS) is None
    with pytest.raises(ValueError, match="1280 wide"):  # refused before any device is asked
        ws.resident_ws_w8a8(torch.zeros(2, 1536, dtype=torch.bfloat16), torch.zeros(8, 1536, dtype=torch.int8),
                            torch.ones(8), None)


@pytest.mark.parametrize(("m", "n", "k"), [(4096, 640, 640), (16384, 768, 768), (1024, 1280, 1280)])
def test_bench_times_launches_that_fit_beside_the_default(monkeypatch: pytest.MonkeyPatch, m: int, n: int,
                                                          k: int) -> None:
    """``bench_resident.py --ws --ws-configs``: the default launch (the runtime's) and alternatives of both tile
    widths on rings of at least 3 stages, every split keeping a column tile and every launch within a block's
    shared memory, so a device call spends its time timing launches, not failing to compile them."""
    from pathlib import Path

    from comfyquant.runtime.kernels import gluon_resident_ws as ws

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_resident

    assert bench_resident.ws_configs_for(m, n, k, H200_SMS, False) == {
        "resident_ws": ws.resident_ws_config(m, n, k, H200_SMS)}
    cfgs = bench_resident.ws_configs_for(m, n, k, H200_SMS, True)
    assert cfgs["resident_ws"] == ws.resident_ws_config(m, n, k, H200_SMS) and len(cfgs) >= 3
    assert len(set(cfgs.values())) == len(cfgs)  # no launch timed twice
    for c in cfgs.values():
        tiles = -(-n // c.block_n)
        assert c.block_m == 128 and c.stages >= ws.WS_MIN_STAGES and 1 <= c.splits <= tiles
        assert (c.splits - 1) * -(-tiles // c.splits) < tiles  # the last split has a column tile
        assert ws.resident_ws_smem(c.block_n, c.block_k, c.stages, k) <= HOPPER_SMEM
    assert {c.block_n for c in cfgs.values()} == ({64} if k > 1024 else {64, 128})


def test_plan_output_descriptors_are_copies_of_the_checked_one() -> None:
    """``plan_resident_ws`` makes the output's descriptor for each new buffer as a copy of the first one's (checks
    skipped): the copy over a buffer equals what ``output_descriptor`` makes for it, layout and boxes included."""
    from comfyquant.runtime.kernels import gluon_resident_ws as ws
    from comfyquant.runtime.kernels.triton_plans import desc_maker

    a, b = torch.zeros(300, 640, dtype=torch.bfloat16), torch.ones(300, 640, dtype=torch.bfloat16)
    for block_n in (64, 128):
        make = desc_maker(ws.output_descriptor(a, block_n))
        got, want = make(b), ws.output_descriptor(b, block_n)
        assert got.base is b and vars(got) == vars(want) and make(a).base is a


def test_no_plan_before_a_call_compiled_the_kernel_or_for_what_it_refuses() -> None:
    """A plan fires into an already compiled kernel: before any launch (here: no GPU) there is none, and none for
    a call the kernel refuses or for x without contiguous rows, so the caller keeps the general launch."""
    from comfyquant.runtime.kernels import gluon_resident_ws as ws

    w, s = torch.zeros(640, 640, dtype=torch.int8), torch.ones(640)
    x = torch.zeros(256, 640, dtype=torch.bfloat16)
    assert ws.plan_resident_ws(x, w, s, None, torch.bfloat16) is None
    assert ws.plan_resident_ws(x.float(), w, s, None, torch.float32) is None
    assert ws.plan_resident_ws(torch.zeros(640, 256, dtype=torch.bfloat16).t(), w, s, None, torch.bfloat16) is None


def test_backend_is_pinned_only_and_refuses_what_it_cannot_run() -> None:
    """``int8``'s ``triton_resident_ws`` backend: callable by name (a sweep column, a check), never a cost-model
    candidate nor timed by measured dispatch until a GPU has run it; refused off sm_90 with its reason, and
    refusing rotated weights, 32-bit activations and rows past 1,280 with one line each."""
    from comfyquant.errors import UserError
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels import gluon_resident_ws as ws
    from comfyquant.runtime.kernels.registry import backends_for, kernel_kind

    assert "triton_resident_ws" in backends_for("int8")
    b = kernel_kind("int8").backends["triton_resident_ws"]
    assert not b.timed and b.plan is not None
    for args in ((0, 0, True), (0, 0, False), (256, 0, True), (0, 16, True)):
        assert "triton_resident_ws" not in {name for _, name in builtin.int8_paths(*args)}, args
    assert "CUDA" in b.requires(torch.device("cpu"))
    w = torch.zeros(64, 1280, dtype=torch.int8)
    x = torch.zeros(4, 1280, dtype=torch.bfloat16)
    builtin._resident_refusal(w, (0,), x, torch.bfloat16, "triton_resident_ws", ws.refusal)  # takes it
    for w_, opts, x_, odt, match in ((w, (256,), x, torch.bfloat16, "'triton_resident_ws' has no rotation"),
                                     (w, (0,), x.float(), torch.float32, "bf16 / fp16"),
                                     (torch.zeros(64, 1536, dtype=torch.int8), (0,),
                                      torch.zeros(4, 1536, dtype=torch.bfloat16), torch.bfloat16, "1280 wide")):
        with pytest.raises(UserError, match=match) as got:
            builtin._int8_resident_ws(x_, w_, (torch.ones(64),), None, opts, odt)
        assert "\n" not in str(got.value)
