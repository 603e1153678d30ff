"""The one-launch resident W8A8 kernel (``kernels.gluon_resident``) compiled for sm_90 here, without a GPU, from
the arguments its launcher builds: every configuration ``resident_config`` gives the narrow layers fits a block's
shared memory (the model's byte count bounds the compiled kernel's), runs the int8 wgmma on the codes it holds,
quantizes with one reciprocal a row (no per-element division) and has no spills. Its output is checked bit for
bit against the two-launch path on a GPU (``benchmarks/bench_resident.py``)."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from test_gluon_gemm import _assert_no_spills, _gluon_compile  # noqa: E402

from comfyquant.runtime.kernels.configs import HOPPER_SMEM, resident_smem  # noqa: E402

H200_SMS = 132
# (M, N, K): SDXL attention 640 / 1,280, CLIP attention and fc2, Flux's proj (the widest K the codes fit)
NARROW = [(4096, 640, 640), (16384, 1280, 1280), (1024, 768, 768), (4096, 768, 3072), (256, 3072, 3072)]


def _launch(m: int, n: int, k: int, bias: bool = True, cfg: object = None) -> tuple[object, tuple, dict, tuple]:
    """(config, grid, keyword arguments, positional arguments) of the launch ``resident_w8a8`` makes."""
    from comfyquant.runtime.kernels import gluon_resident as gr

    cfg = cfg or gr.resident_config(m, n, k, H200_SMS)
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    w = torch.zeros(n, k, dtype=torch.int8)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    grid, args, kw = gr.launch_args(x, gr.weight_descriptor(w, cfg), out, torch.ones(n),
                                    torch.zeros(n, dtype=torch.bfloat16) if bias else None, cfg)
    return cfg, grid, kw, args


@pytest.mark.parametrize(("m", "n", "k"), NARROW)
def test_configs_fit_shared_memory_and_fill_the_gpu(m: int, n: int, k: int) -> None:
    from comfyquant.runtime.kernels import gluon_resident as gr

    cfg = gr.resident_config(m, n, k, H200_SMS)
    assert cfg is not None
    assert resident_smem(cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, k) <= HOPPER_SMEM
    tiles = -(-n // cfg.block_n)
    _, grid, _, args = _launch(m, n, k, cfg=cfg)
    splits = args[-1]
    assert 1 <= splits <= tiles and (splits - 1) * -(-tiles // splits) < tiles  # every split has a column tile
    assert grid == (-(-m // cfg.block_m) * splits,)
    # programs: every SM at least once where the row blocks times the column tiles allow it
    assert grid[0] >= min(H200_SMS, -(-m // cfg.block_m) * tiles) // 2


def test_rows_too_wide_for_shared_memory_are_refused() -> None:
    from comfyquant.runtime.kernels import gluon_resident as gr

    assert gr.resident_config(4096, 1280, 5120, H200_SMS) is None  # SDXL ff2: 64 x 5,120 codes do not fit
    assert gr.resident_config(4096, 1280, 1000, H200_SMS) is None  # K not a multiple of 16 (TMA rows)
    with pytest.raises(ValueError, match="3072 wide"):  # refused before any device is asked
        gr.resident_w8a8(torch.zeros(2, 5120, dtype=torch.bfloat16), torch.zeros(8, 5120, dtype=torch.int8),
                         torch.ones(8), None)


@pytest.mark.parametrize(("m", "n", "k"), [NARROW[0], NARROW[3]])
def test_compiles_for_sm90_with_wgmma_one_reciprocal_a_row_and_no_spills(m: int, n: int, k: int) -> None:
    from comfyquant.runtime.kernels import gluon_resident as gr

    cfg, _, kw, args = _launch(m, n, k)
    fn = gr.w8a8_resident
    # aligned as a GPU launch specializes it: without the marks the row loads are not vectorized and spill
    ck = _gluon_compile(fn, (*args, *(kw[nm] for nm in fn.arg_names[len(args):])), kw["num_warps"], aligned=True)
    ptx = ck.asm["ptx"]
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.s32\.s8\.s8)", ptx)) == {
        f"m64n{cfg.block_n}k32.s32.s8.s8"}
    assert "cp.async.bulk.tensor" in ptx  # the weight tiles by TMA
    # the scale and its reciprocal: two correctly rounded divisions per row a thread holds, none per element
    assert len(re.findall(r"\bdiv\.rn\.f32\b", ptx)) <= 2 * cfg.block_m // (4 * cfg.warps)
    assert ck.metadata.shared <= resident_smem(cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, k)
    _assert_no_spills(ptx)


def test_bench_refuses_an_unknown_shape_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_resident

    monkeypatch.setattr(sys, "argv", ["bench_resident.py", "--out", str(tmp_path), "--shapes",
                                      "sdxl.attn640,flux.nope"])
    assert bench_resident.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flux.nope" in err[0]
    # the alternatives the bench times beside the default all fit shared memory and include the default
    from comfyquant.runtime.kernels import gluon_resident as gr

    cfgs = bench_resident.configs_for(4096, 640, 640, H200_SMS)
    assert cfgs["resident"] == gr.resident_config(4096, 640, 640, H200_SMS) and len(cfgs) > 4
    assert all(resident_smem(c.block_m, c.block_n, c.block_k, c.stages, 640) <= HOPPER_SMEM for c in cfgs.values())


def test_backend_is_a_candidate_where_it_runs_and_refuses_what_it_cannot_run() -> None:
    """``int8``'s ``triton_resident`` backend: a cost-model candidate (and timed by measured dispatch) on devices
    that run it, for unrotated layers without a low-rank term only; refused off sm_90 with its reason, and
    refusing rotated weights, 32-bit activations and rows too wide for its shared memory with one line each."""
    from comfyquant.errors import UserError
    from comfyquant.runtime.kernels import builtin
    from comfyquant.runtime.kernels.registry import backends_for, kernel_kind

    assert "triton_resident" in backends_for("int8")
    b = kernel_kind("int8").backends["triton_resident"]
    assert b.timed and builtin.RESIDENT_PATH == ("resident", "triton_resident")
    assert builtin.RESIDENT_PATH in builtin.int8_paths(0, 0, resident=True)
    for args in ((0, 0, False), (0, 16, True), (256, 0, True), (256, 16, True)):  # off-device, a LoRA term, rotated
        assert "triton_resident" not in {name for _, name in builtin.int8_paths(*args)}, args
    assert not builtin.resident_runs(torch.zeros(2, 640, dtype=torch.bfloat16))  # the CPU
    assert "CUDA" in b.requires(torch.device("cpu"))
    w = torch.zeros(64, 640, dtype=torch.int8)
    x = torch.zeros(4, 640, dtype=torch.bfloat16)
    builtin._resident_refusal(w, (0,), x, torch.bfloat16)  # takes it
    for w_, opts, x_, odt, match in ((w, (256,), x, torch.bfloat16, "no rotation"),
                                     (w, (0,), x.float(), torch.float32, "bf16 / fp16"),
                                     (torch.zeros(64, 5120, dtype=torch.int8), (0,),
                                      torch.zeros(4, 5120, dtype=torch.bfloat16), torch.bfloat16, "3072 wide")):
        with pytest.raises(UserError, match=match):
            builtin._resident_refusal(w_, opts, x_, odt)


def test_measured_dispatch_never_times_a_pinned_only_backend(tmp_path) -> None:
    """A backend marked ``timed=False`` is not among measured dispatch's candidates, even where the policy's
    allow list names every backend (the node pack's does), and can still be pinned by name."""
    from comfyquant.runtime.kernels.dispatch import DispatchPolicy, bind_linear
    from comfyquant.runtime.kernels.registry import (
        KernelBackend,
        KernelKind,
        register_kernel_kind,
        unregister_kernel_kind,
    )

    calls: list[str] = []

    def make(name):
        def impl(x, w, scales, bias, opts, out_dtype):
            calls.append(name)
            return (x.double() @ (w.double() * scales[0].double()).t()).to(out_dtype)
        return impl

    register_kernel_kind(KernelKind("test_untimed", {"ref": make("ref"), "a": make("a"), "b": make("b"),
                                                     "new": KernelBackend(make("new"), timed=False)}))
    try:
        w = torch.randint(-100, 100, (32, 64), dtype=torch.int8)
        s = torch.rand(32, 1) * 0.01
        x = torch.randn(8, 64, dtype=torch.float64)
        policy = DispatchPolicy(measure=True, measure_cache=str(tmp_path), allow=("ref", "a", "b", "new"))
        bind_linear("test_untimed", w, (s,), None, backend=policy)(x)
        assert "new" not in calls and {"a", "b"} <= set(calls)
        calls.clear()
        bind_linear("test_untimed", w, (s,), None, backend="new")(x)
        assert calls == ["new"]
    finally:
        unregister_kernel_kind("test_untimed")


def test_bench_plot_reads_speedups_from_recorded_rows(tmp_path, monkeypatch) -> None:
    """The bench's plot groups: one per shape and row count, each column's eager speed-up over bf16 and the
    fastest alternative configuration; a PNG is written."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_resident

    from comfyquant.bench.plot import plot_bars

    rows = [{"shape": "sdxl.attn640", "m": 4096, "us": {"bf16": 20.0, "auto": 25.0, "fused": 40.0, "resident": 16.0,
                                                       "r128x128s3p1": 12.5, "r64x64s4p2": 50.0}}]
    g = bench_resident.speedup_groups(rows)
    assert g == {"sdxl.attn640 M=4096": {"auto": 0.8, "fused": 0.5, "resident": 1.25, "best config": 1.6}}
    assert plot_bars(g, tmp_path / "r.png", "t", target=0.97).stat().st_size > 1000
    assert "bench_resident" in sys.modules


def test_float32_activations_never_get_the_resident_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model run in float32 (ComfyUI's ``--force-fp32``) on an sm_90 GPU: the kernel takes 16-bit activations
    only, so it must not be a candidate there, or the first narrow layer would fail on its refusal."""
    from comfyquant.runtime.kernels import builtin

    monkeypatch.setattr(builtin, "_resident_requires", lambda device: None)  # as on an sm_90 GPU with Gluon
    assert builtin.resident_runs(torch.zeros(2, 640, dtype=torch.bfloat16))
    assert builtin.resident_runs(torch.zeros(2, 640, dtype=torch.float16))
    assert not builtin.resident_runs(torch.zeros(2, 640, dtype=torch.float32))


def test_plan_operands_of_both_kernels_and_what_they_refuse() -> None:
    """``plan_operands``: what a plan of either resident kernel is built on (x as rows, the launch the kernel's
    own config picks or the one given, float weight scales, the weight's descriptor in the launch's boxes, an
    output of the call's shape and dtype); None for a refused call, x without contiguous rows, no rows."""
    from comfyquant.runtime.kernels import gluon_resident as gr
    from comfyquant.runtime.kernels import gluon_resident_ws as grw

    w, s = torch.zeros(640, 640, dtype=torch.int8), torch.ones(640, 1, dtype=torch.float16)
    x = torch.zeros(2, 300, 640, dtype=torch.bfloat16)
    for refuse, config in ((gr.refusal, gr.resident_config), (grw.refusal, grw.resident_ws_config)):
        x2d, cfg, sb, desc, out0 = gr.plan_operands(x, w, s, torch.float16, refuse, config, None)
        assert x2d.shape == (600, 640) and x2d.data_ptr() == x.data_ptr()
        assert cfg == config(600, 640, 640, H200_SMS) and sb.dtype == torch.float32 and sb.shape == (640,)
        assert list(desc.block_shape) == [cfg.block_n, cfg.block_k] and desc.base is w
        assert out0.shape == (600, 640) and out0.dtype == torch.float16
        given = gr.ResidentConfig(cfg.block_m, 64, 128, 3, 1)
        assert gr.plan_operands(x, w, s, torch.float16, refuse, config, given)[1] == given
        for args in ((x.float(), w, s, torch.float32), (x[:, :, :320], w[:, :320], s, torch.float16),
                     (torch.zeros(0, 640, dtype=torch.bfloat16), w, s, torch.bfloat16),
                     (x.transpose(0, 1), w, s, torch.bfloat16)):
            assert gr.plan_operands(*args, refuse, config, None) is None


def test_a_plan_is_checked_once_per_compiled_kernel(caplog: pytest.LogCaptureFixture) -> None:
    """``FastKernel.direct_agrees`` (every plan's check of its direct launch: the W8A8 plans' and both resident
    kernels'): the direct launch's output against Triton's launch's, once per key; a disagreement keeps the general
    path for that key and is said once."""
    import logging

    from comfyquant.runtime.kernels.launch import FastKernel

    fk = FastKernel(lambda: None)
    calls = []

    def out(v: float):
        return lambda: calls.append(v) or torch.full((2,), v)

    assert fk.direct_agrees(("a",), out(1.0), out(1.0), "test plan for N=8 K=16")
    assert fk.direct_agrees(("a",), out(1.0), out(2.0), "test plan for N=8 K=16") and len(calls) == 2  # not re-run
    with caplog.at_level(logging.WARNING, logger="comfyquant.runtime"):
        assert not fk.direct_agrees(("b",), out(1.0), out(2.0), "test kernel plan for N=8 K=16")
        assert not fk.direct_agrees(("b",), out(1.0), out(1.0), "test kernel plan for N=8 K=16")
    said = [r.getMessage() for r in caplog.records if "test kernel" in r.getMessage()]
    assert len(said) == 1 and "N=8 K=16" in said[0]
