"""The kernels the runtime launches fit the shared memory of the GPUs ComfyUI users run, checked on the CPU:
every W8A8 / weight-only / one-launch / rotated / W4A8 / fp8 launch of Flux, SDXL, Wan, T5 and CLIP layers at
1-4,096 rows, and the int8 attention's, is compiled by Triton for an A100, a B200 and RTX 3090 / 4090 / 4060 /
5090 cards (``comfyquant.testing.kernel_targets``). Before the tile tables read the device's shared memory, the RTX cards' 99 KB
were exceeded by the weight-only kernel's 16 x 128 x 256 tile at 4 stages (120 KB), the per-tile one-launch
kernel's 64 x 128 x 128 (104 KB) and, on the RTX 5090, the W8A8 GEMM's Hopper tile 256 x 128 x 128 (144 KB):
Triton refuses such launches (``OutOfResources``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from comfyquant.runtime.kernels import triton_int8 as ti
from comfyquant.runtime.kernels.acts import ModulatedNorm
from comfyquant.runtime.kernels.configs import TileConfig, cdiv, fit_stages, rows_shape
from comfyquant.testing import kernel_targets as kt

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(kt.TARGETS))
def test_every_launch_fits_the_shared_memory_of_the_gpu(name: str) -> None:
    target = kt.TARGETS[name]
    with kt.recorded_launches(target) as launches:
        kt.drive(target)
    kernels = {la.fn.__name__ for la in launches}
    # (every GEMM path and the attention were reached)
    assert {"w8a8", "w8a16", "fused", "fused_rows", "w4a8", "dequant", "_attn_int8"} <= kernels, kernels
    over = [(kt.describe(la), b) for la in kt.distinct(launches)
            if (b := kt.shared_bytes(la, target.cc)) > target.smem]
    assert not over, f"{name}: {over} over {target.smem} bytes"


def test_consumer_gpus_take_the_ampere_tiles_and_hopper_keeps_its_own() -> None:
    """The RTX 5090 (compute capability 12, 99 KB) takes the Ampere tile table and no persistent grid; the H100 /
    H200 (and the CPU interpreter, which stands for one) keep the Hopper tiles and their stages."""
    with kt.recorded_launches(kt.TARGETS["RTX 5090 (sm_120)"]):
        cfg, small = ti.pick_w8a8(4096, 3072, 3072, torch.device("cpu"), True)
        assert not small and cfg.block_k == 64 and not cfg.persistent
    hopper, _ = ti.pick_w8a8(4096, 3072, 3072, torch.device("cpu"), True)
    assert hopper.block_k == 128
    tile = TileConfig(16, 128, 256, 4, 4, 1)
    assert fit_stages(tile, 2, 1).stages == 4  # Hopper: 4 x 40 KB within 200 KB
    assert fit_stages(tile, 2, 1, smem=101376, major=8).stages == 2  # 99 KB, cp.async: stages - 1 tiles resident
    assert fit_stages(tile, 2, 1, smem=166912, major=8).stages == 4


def test_a_launch_the_gpu_refuses_for_shared_memory_runs_with_fewer_stages(caplog: pytest.LogCaptureFixture) -> None:
    """A GPU whose limit the tables did not foresee: Triton's ``OutOfResources`` at the first launch makes
    ``FastKernel`` launch the same tile with fewer stages (said once), keep that kernel under the requested stages
    for later launches and plans, and re-raise where even one stage does not fit."""
    from triton.runtime.errors import OutOfResources

    from comfyquant.runtime.kernels.launch import FastKernel

    class Compiled:
        def __init__(self, stages: int) -> None:
            self.stages, self.run, self.function, self.packed_metadata = stages, lambda *a: None, None, None

    class Jit:
        __name__, params = "toy", []

        def __init__(self, fits: int) -> None:
            self.fits, self.tried = fits, []

        def __getitem__(self, grid: tuple) -> object:
            def launch(*args: object, num_warps: int, num_stages: int) -> Compiled:
                self.tried.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(40960 * num_stages, 101376, "shared memory")
                return Compiled(num_stages)
            return launch

    fn = Jit(fits=2)
    fk = FastKernel(fn)
    with caplog.at_level("WARNING", logger="comfyquant.runtime"):
        fk((4,), (1.5,), torch.device("cpu"), num_warps=4, num_stages=4, key=("k",))
    assert fn.tried == [4, 3, 2] and fk._compiled[(4, 4, ("k",))].stages == 2
    assert fk.prepared((4,), (1.5,), num_warps=4, num_stages=4, key=("k",)) is not None
    assert len([r for r in caplog.records if "2 pipeline stages, not its tile table's 4" in r.getMessage()]) == 1
    with pytest.raises(OutOfResources):
        FastKernel(Jit(fits=0))((4,), (1.5,), torch.device("cpu"), num_warps=4, num_stages=3, key=("k",))


def test_a_row_blocks_programs_fit_a_small_gpu_at_once() -> None:
    """The row-block one-launch kernel's programs of a row block wait for each other, so all must be resident at
    once: on a 24-SM card (RTX 4060) no launch has more than a quarter of the SMs' column tiles (32 of them would
    spin forever), while an H200 keeps its 32. A modulated norm meant for that kernel runs in torch before the
    per-tile kernel there, instead of refusing the call."""
    small = kt.TARGETS["RTX 4060 (sm_89, 24 SMs)"]
    assert rows_shape(1024, 4096, 4096) and not rows_shape(1024, 4096, 4096, sms=small.sms)
    with kt.recorded_launches(small) as launches:
        kt.drive(small, layers=[(4096, 4096), (3072, 3072), (1280, 1280), (640, 640)], rows=(64, 256, 1024, 4096))
    rows = [la for la in launches if la.fn.__name__ == "fused_rows"]
    assert rows
    names = rows[0].fn.arg_names
    tiles = {cdiv(la.args[names.index("N")], la.args[names.index("BLOCK_N")]) for la in rows}
    assert max(tiles) <= small.sms // 4, tiles
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 4096, generator=g).bfloat16(), torch.randint(-127, 128, (4096, 4096), dtype=torch.int8)
    mod = torch.randn(2, 2 * 4096, generator=g).bfloat16()
    with kt.recorded_launches(small) as launches:
        ti.fused_linear(x, w, torch.rand(4096) + 1e-3, None, torch.bfloat16, norm=ModulatedNorm(mod, 1e-6, 128))
    assert [la.fn.__name__ for la in launches] == ["fused"]
    assert launches[0].args[launches[0].fn.arg_names.index("NORM")] == 0  # (applied in torch first)


def test_the_report_tables_and_plots_each_kernels_largest_launch(tmp_path: object) -> None:
    """``benchmarks/kernel_targets_report.py`` writes its table (KB per kernel and target, the limits) and plot from
    the measured dict (measured by the same functions as the tests above)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import kernel_targets_report as rep

    report = {"date": "2026-12-05", "triton": "3.6.0", "command": "x", "targets": {
        "RTX 4090 (sm_89)": {"limit": 101376, "kernels": {"w8a16": 73728, "_attn_int8": 81920}},
        "B200 (sm_100)": {"limit": 232448, "kernels": {"w8a16": 147456, "w8a8": 196608}}}}
    md = rep.to_markdown(report)
    assert "| w8a16 | 72 | 144 |" in md and "| w8a8 | - | 192 |" in md and "| **limit** | **99** | **227** |" in md
    png = rep.plot(report, Path(str(tmp_path)) / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_fp8_e4m3_is_never_handed_to_triton_on_gpus_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6 has no fp8 e4m3 type before sm_89 (the compile for an RTX 3090 / A100 fails: "fp8e4nv not
    supported in this architecture"). There an fp8 layer's dequantize runs in torch and the int8 attention keeps p
    and v in 16 bits; int8 storage and e5m2 keep Triton's kernel; sm_89+ takes e4m3 as before."""
    from types import SimpleNamespace

    from triton.compiler.errors import CompilationError

    from comfyquant.errors import UserError
    from comfyquant.runtime import attention
    from comfyquant.runtime.kernels import builtin

    t = kt.TARGETS["RTX 3090 (sm_86)"]
    with kt.recorded_launches(t) as launches:
        ti.dequantize_weight(torch.randn(64, 256).to(torch.float8_e4m3fn), torch.rand(64), torch.bfloat16)
    with pytest.raises(CompilationError, match="fp8e4nv not supported"):
        kt.shared_bytes(launches[0], t.cc)  # (what the runtime must not launch there)
    cuda = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(builtin, "triton_available", lambda: True)
    for cap, e4m3 in (((8, 6), False), ((8, 0), False), ((8, 9), True), ((12, 0), True)):
        monkeypatch.setattr(builtin, "device_capability", lambda device, cap=cap: cap)
        monkeypatch.setattr(attention, "device_capability", lambda device, cap=cap: cap)
        assert builtin._fast_dequant(cuda, torch.float8_e4m3fn) is e4m3
        assert builtin._fast_dequant(cuda, torch.int8) and builtin._fast_dequant(cuda, torch.float8_e5m2)
        assert attention.pv_fp8(attention.AttentionPolicy(pv_fp8=True), cuda.device) is e4m3
        assert not attention.pv_fp8(attention.AttentionPolicy(pv_fp8=False), cuda.device)
        if not e4m3:  # a pinned (or measured) weight-only backend refuses with a reason instead of failing to compile
            with pytest.raises(UserError, match="no e4m3 type before sm_89"):
                builtin._fp8_w8a16(cuda, torch.empty(8, 16, dtype=torch.float8_e4m3fn), (None,), None, (), None)


def test_the_devices_shared_memory_is_read_from_torch_else_triton_else_the_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``launch.device_smem`` on a CUDA device (faked here): torch's ``shared_memory_per_block_optin`` where it has
    one, else what Triton's driver reports, else the compute capability's entry of ``configs.SMEM_BY_CC``; and
    ``hopper_class`` only with Hopper's 227 KB at sm_90+."""
    from types import SimpleNamespace

    from comfyquant.runtime.kernels import launch

    def props(**kw: int) -> SimpleNamespace:
        return SimpleNamespace(multi_processor_count=128, major=kw.pop("major", 8), minor=kw.pop("minor", 9), **kw)

    cuda = torch.device("cuda", 0)
    for p, want in ((props(shared_memory_per_block_optin=101376), 101376),
                    (props(major=12, minor=0), 101376),  # (Triton's driver raises here: no GPU) -> the table
                    (props(major=9, minor=0), 232448)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=p: p)
        launch._device_smem.cache_clear()
        launch._device_facts.cache_clear()
        assert launch.device_smem(cuda) == want
        assert launch.hopper_class(cuda) is (p.major >= 9 and want >= 232448)
    launch._device_smem.cache_clear()
    launch._device_facts.cache_clear()


def test_the_device_line_says_which_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``launch.describe_device`` (logged by the adapter for a CUDA model): an RTX 4090 gets the Ampere tiles with
    fp8, an RTX 3090 the Ampere tiles without fp8, an H200 the Hopper tiles and the Gluon GEMM."""
    from types import SimpleNamespace

    from comfyquant.runtime.kernels import launch

    cuda = torch.device("cuda", 0)
    lines = {}
    for name, major, minor, smem in (("RTX 4090", 8, 9, 101376), ("RTX 3090", 8, 6, 101376), ("H200", 9, 0, 232448)):
        p = SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=128,
                            shared_memory_per_block_optin=smem)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=p: p)
        launch._device_smem.cache_clear()
        launch._device_facts.cache_clear()
        lines[name] = launch.describe_device(cuda)
    launch._device_smem.cache_clear()
    launch._device_facts.cache_clear()
    assert lines["RTX 4090"] == ("RTX 4090: sm_89, 128 SMs, 99 KB shared memory a block: Ampere tiles with the stages "
                                 "that fit, fp8 matrix units")
    assert lines["RTX 3090"].endswith("no fp8 (fp8 weights dequantize in torch)")
    assert lines["H200"].endswith("Hopper tiles, persistent grid, TMA, Gluon GEMM")
    assert launch.describe_device(torch.device("cpu")).startswith("cpu: reference kernels")
