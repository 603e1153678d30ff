"""``runtime.sdpa_choice``: the faster of two exact attention kernels per call shape. On the CPU the two candidates
are real attention implementations (SDPA's and a float64 softmax reference) whose cost a fake clock sets, so the
decision logic runs on real outputs: cuDNN kept only where it agrees with the stock kernel and wins by the margin,
rounds sized to the call, choices written to and read back from the cache file. The CUDA path (the direct cuDNN
op bit-equal to SDPA's cuDNN backend, choices on real shapes): ``benchmarks/check_sdpa_choice_gpu.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comfyquant.runtime import sdpa_choice
from comfyquant.runtime.kernels.measured import ChoiceCache, Decision


class Clock:
    """A clock that moves only when a timed candidate runs (by its cost)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.calls: dict[str, int] = {}

    def __call__(self) -> float:
        return self.t

    def costing(self, name: str, us: float, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            self.t += us * 1e-6
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn()

        return run


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))  # type: ignore[return-value]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    s = (q.double() @ k.double().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def _decide(stock_us: float, other_us: float, other: Callable[..., torch.Tensor] = _reference) -> tuple[Decision,
                                                                                                          Clock]:
    q, k, v = _qkv()
    clock = Clock()
    d = sdpa_choice.decide(clock.costing("stock", stock_us, lambda: F.scaled_dot_product_attention(q, k, v)),
                           clock.costing("cudnn", other_us, lambda: other(q, k, v)), clock=clock, sync=lambda: None)
    return d, clock


def test_the_faster_kernel_is_kept_only_past_the_margin() -> None:
    d, clock = _decide(100.0, 50.0)
    assert d.backend == sdpa_choice.CUDNN and d.us == pytest.approx({"stock": 100.0, "cudnn": 50.0})
    assert float(d.notes["relative_difference"]) < 1e-5  # the two exact kernels agree to float32 rounding
    # rounds of ROUND_S: 200 calls of 100 µs capped at 50 a round, 3 rounds, after one sizing call and one compare
    assert clock.calls == {"stock": 2 + 3 * 50, "cudnn": 2 + 3 * 50}
    near, _ = _decide(100.0, 96.0)  # 4% faster: inside the 5% margin, a near-tie stays on the stock kernel
    assert near.backend == sdpa_choice.STOCK and near.us["cudnn"] == pytest.approx(96.0)
    slower, _ = _decide(100.0, 180.0)
    assert slower.backend == sdpa_choice.STOCK


class Device:
    """A host clock and a GPU queue: a call costs its host time on the clock and queues its GPU time behind the work
    already queued; a sync waits for the queue to drain."""

    def __init__(self) -> None:
        self.t = self.gpu_free = 0.0

    def __call__(self) -> float:
        return self.t

    def sync(self) -> None:
        self.t = max(self.t, self.gpu_free)

    def costing(self, host_us: float, gpu_us: float, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            self.t += host_us * 1e-6
            self.gpu_free = max(self.gpu_free, self.t) + gpu_us * 1e-6
            return fn()

        return run


def _costed(stock: tuple[float, float], cudnn: tuple[float, float]) -> tuple[Callable[[], torch.Tensor], ...]:
    """``decide``'s first four arguments: the two kernels costing (host µs, GPU µs) a call on one :class:`Device`,
    its clock and its sync (``decide(*_costed(...))``)."""
    q, k, v = _qkv()
    dev = Device()
    return (dev.costing(*stock, lambda: F.scaled_dot_product_attention(q, k, v)),
            dev.costing(*cudnn, lambda: _reference(q, k, v)), dev, dev.sync)  # type: ignore[return-value]


def _decide_on(stock: tuple[float, float], cudnn: tuple[float, float]) -> Decision:
    """The decision for kernels of (host µs, GPU µs) a call."""
    return sdpa_choice.decide(*_costed(stock, cudnn))


def test_a_kernel_must_save_the_host_time_it_adds() -> None:
    """cuDNN's direct op costs more host time a call than SDPA's FlashAttention call (6-18 µs timed alone, runs 114 /
    116; ~30 µs a call in SDXL's step, run 113, hence the weight of 4):
    kept where its GPU saving covers that (SDXL's 4,096-token self-attention), not where a host-bound model would
    pay more than it saves (its 1,024-token calls), however large the GPU ratio."""
    long_call = _decide_on((24.0, 303.0), (32.0, 186.0))  # SDXL's 4,096-token self-attention (run 114)
    assert long_call.backend == sdpa_choice.CUDNN and long_call.us["cudnn"] == pytest.approx(186.0, rel=0.02)
    assert long_call.notes["host_us_stock"] == "24.0" and long_call.notes["host_us_cudnn"] == "32.0"
    short = _decide_on((18.0, 54.0), (24.0, 35.0))  # its 1,024-token one (run 116): 19 µs saved, 4 x 6 added
    assert short.backend == sdpa_choice.STOCK and short.us["cudnn"] < 0.7 * short.us["stock"]
    why = short.skipped["cudnn"]
    assert why.startswith(("saves 18 µs", "saves 19 µs")) and why.endswith(
        " a call but adds 6 µs of host time (x4): a host-bound model would run slower"), why
    assert sdpa_choice.decide(*_costed((18.0, 54.0), (24.0, 35.0)), host_weight=1.0).backend == sdpa_choice.CUDNN
    host_bound = _decide_on((37.0, 27.0), (67.0, 17.0))  # both host-bound alone: cuDNN is slower outright
    assert host_bound.backend == sdpa_choice.STOCK and host_bound.us["cudnn"] > host_bound.us["stock"]


def test_a_kernel_whose_output_disagrees_is_never_kept_and_not_timed() -> None:
    d, clock = _decide(100.0, 10.0, lambda q, k, v: _reference(q, k, v, scale=0.5))  # a wrong softmax scale
    assert d.backend == sdpa_choice.STOCK and d.us == {} and "differs from the stock kernel's" in d.skipped["cudnn"]
    assert clock.calls == {"stock": 1, "cudnn": 1}
    nan, _ = _decide(100.0, 10.0, lambda q, k, v: torch.full_like(q, float("nan")))
    assert nan.backend == sdpa_choice.STOCK and "nan" in nan.skipped["cudnn"]


def test_a_kernel_that_raises_leaves_the_stock_one_with_the_reason() -> None:
    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cuDNN Frontend error: no valid execution plan")

    d, clock = _decide(100.0, 10.0, broken)
    assert d.backend == sdpa_choice.STOCK and d.us == {}
    assert d.skipped["cudnn"] == "cuDNN's kernel raised RuntimeError: cuDNN Frontend error: no valid execution plan"
    assert clock.calls == {"stock": 1, "cudnn": 1}


def test_rounds_are_sized_to_the_call() -> None:
    clock = Clock()
    fns = {"slow": clock.costing("slow", 30_000.0, lambda: torch.zeros(1)),  # 30 ms: one call a round
           "fast": clock.costing("fast", 1_000.0, lambda: torch.zeros(1))}  # 1 ms: 20 a round
    us, host = sdpa_choice.time_rounds(fns, clock=clock, sync=lambda: None)
    assert us == pytest.approx({"slow": 30_000.0, "fast": 1_000.0}) and host == us  # no GPU: all host time
    assert clock.calls == {"slow": 1 + 3, "fast": 1 + 3 * 20}


def test_relative_difference() -> None:
    b = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    assert sdpa_choice.relative_difference(b, b) == 0.0
    assert sdpa_choice.relative_difference(torch.tensor([3.0, 5.0], dtype=torch.bfloat16), b) == pytest.approx(0.2)
    assert sdpa_choice.relative_difference(b, torch.zeros(2)) == float("inf")
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 3, 50, 8, generator=g, dtype=torch.float64) for _ in range(2))  # one head at a time
    assert sdpa_choice.relative_difference(x, y) == pytest.approx(((x - y).norm() / y.norm()).item(), rel=1e-6)


def test_the_key_names_what_the_choice_depends_on() -> None:
    q, k, v = _qkv()
    key = sdpa_choice.choice_key(q, k, v, None, (0, 1, 2, 3))
    assert "q=[1, 2, 64, 16]:[2048, 1024, 16, 1]" in key and "float32" in key and "order=[0, 1, 2, 3]" in key
    assert "cudnn=" in key and "scale=None" in key
    # a layout with the heads interleaved (ComfyUI's reshape + transpose of [B, T, H * D]) is another key
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert sdpa_choice.choice_key(qt, k, v, None, (0, 1, 2, 3)) != key
    assert sdpa_choice.choice_key(q, k, v, 0.3, (0, 1, 2, 3)) != key
    assert sdpa_choice.choice_key(q, k, v, None, None) != key
    # the stock call timed without the backend-order scope (its host time as the lean path pays it) is another key
    assert sdpa_choice.choice_key(q, k, v, None, (0, 1, 2, 3), scoped=False) == key.replace(
        "order=[0, 1, 2, 3]", "order=[0, 1, 2, 3]:unscoped")


def test_calls_without_a_choice_run_the_stock_kernel() -> None:
    q, k, v = _qkv()
    chooser = sdpa_choice.SdpaChooser(None)
    assert sdpa_choice.why_not(q, k, v) == "not 4-D CUDA tensors"
    assert chooser(q, k, v) is None and chooser.chosen == 0 and chooser.measured == 0


def test_choices_are_saved_with_their_version_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "attention.json"
    cache = ChoiceCache(path, sdpa_choice.CACHE_VERSION)
    cache.put("sdpa|a", Decision(backend="cudnn", us={"stock": 100.0, "cudnn": 55.0},
                                 notes={"relative_difference": "2.1e-03"}))
    cache.put("sdpa|b", Decision(backend="stock", skipped={"cudnn": "SDPA's cuDNN backend cannot run this call"}))
    data = json.loads(path.read_text())
    assert data["version"] == sdpa_choice.CACHE_VERSION
    assert data["choices"]["sdpa|a"]["notes"] == {"relative_difference": "2.1e-03"}
    assert "notes" not in data["choices"]["sdpa|b"]
    again = ChoiceCache(path, sdpa_choice.CACHE_VERSION)
    assert again.get("sdpa|a") == "cudnn" and again.get("sdpa|b") == "stock" and again.get("sdpa|c") is None
    assert sdpa_choice.cache_path(torch.device("cpu"), tmp_path).name.startswith("attention-v3-cpu-")
    # one reader / writer per file in a process, shared with measured dispatch's; forget() drops the attention ones
    from comfyquant.runtime.kernels.measured import open_cache

    mine = sdpa_choice.cache_path(torch.device("cpu"), tmp_path)
    opened = open_cache(mine, sdpa_choice.CACHE_VERSION)
    other = open_cache(tmp_path / "measured-v2-cpu.json")
    assert open_cache(mine, sdpa_choice.CACHE_VERSION) is opened
    sdpa_choice.forget()
    assert open_cache(mine, sdpa_choice.CACHE_VERSION) is not opened and open_cache(tmp_path / "measured-v2-cpu.json") is other


def test_each_measured_shape_is_logged_and_a_kernel_error_warns(caplog: pytest.LogCaptureFixture) -> None:
    q, k, _ = _qkv()
    caplog.set_level("INFO", logger="comfyquant.runtime")
    sdpa_choice._log(Decision(backend="cudnn", us={"stock": 781.4, "cudnn": 399.0},
                              notes={"host_us_stock": "36.9", "host_us_cudnn": "66.5"}), q, k)
    sdpa_choice._log(Decision(backend="stock", skipped={"cudnn": "cuDNN's kernel raised RuntimeError: x"}), q, k)
    (chosen, failed) = caplog.records
    assert chosen.levelname == "INFO"
    assert chosen.getMessage() == ("comfyquant: attention [1, 2] x 64 keys x 16: cudnn (stock 781 µs (host 36.9); "
                                   "cudnn 399 µs (host 66.5))")
    assert failed.levelname == "WARNING" and "raised RuntimeError" in failed.getMessage()


CHILD_PUT = """
import json, sys
from pathlib import Path
from comfyquant.errors import UserError
from comfyquant.runtime.kernels.measured import ChoiceCache, Decision
path = Path(sys.argv[1])
cache = ChoiceCache(path, 1)
cache.put("small", Decision(backend="cudnn"))
try:
    cache.put("big", Decision(backend="stock", skipped={"cudnn": "x" * 200_000}))
except UserError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.mark.cpu_int8  # its child runs an int8 layer on the CPU
def test_a_full_disk_keeps_the_last_complete_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """The choice file is written to a temporary file renamed when complete (``io.writer.write_small_file``): a
    write past the disk's end (here a 64 KiB file-size limit: EFBIG, as a full disk fails) is one UserError line,
    the previous file stays whole and no temporary file is left."""
    import subprocess
    import sys

    from fs_helpers import file_size_limit

    path = tmp_path / "attention-v1-test.json"
    proc = subprocess.run([sys.executable, "-c", CHILD_PUT, str(path)], capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(64 * 1024), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert "\n" not in error and str(path) in error
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert list(json.loads(path.read_text())["choices"]) == ["small"]
