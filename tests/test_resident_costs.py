"""The resident one-launch kernel as a cost-model path (CPU): its fitted GPU time against the configurations H100
run 149 timed, the launch ``configs.resident_config`` picks against that run's fastest, and the picks the model
makes with it on the recorded H100 sweeps (runs 141-142): only the layers the run measured it faster on move."""

from __future__ import annotations

import dataclasses
import math

import pytest
from recorded_results import recorded

from comfyquant.runtime.kernels import costs as cm
from comfyquant.runtime.kernels.builtin import int8_paths
from comfyquant.runtime.kernels.configs import ResidentConfig, resident_config

RUN149 = "resident_run149_h100_2026-12-07.json"
H100 = 132


def _table(run: int, resident: bool = True) -> cm.DeviceCosts:
    meta = recorded(f"sweep_run{run}_h100_2026-12-07.json")["meta"]
    return dataclasses.replace(cm.DeviceCosts.from_json(meta["costs"]), resident=resident)


def test_fitted_gpu_time_tracks_every_configuration_run_149_timed_up_to_k_768() -> None:
    """GPU time (CUDA-graph replay) of 127 configurations of SDXL attn 640, CLIP attn and CLIP fc1 at 1,024-16,384
    rows: the model within 12% in geometric mean and 40% on every one; wider K is not priced."""
    c = _table(141)
    errs = []
    for row in recorded(RUN149)["rows"]:
        m, k, n = row["m"], row["k"], row["n"]
        for name, cfg in row["configs"].items():
            got = cm.resident_us(m, n, k, c, ResidentConfig(**cfg))
            if k > cm.RESIDENT_PRICED_MAX_K:
                assert got == math.inf
                continue
            errs.append(abs(math.log(got / row["graph_us"][name])))
    assert len(errs) == 127
    assert math.exp(sum(errs) / len(errs)) < 1.12 and math.exp(max(errs)) < 1.40


def test_not_priced_on_devices_that_do_not_run_it_nor_for_rotated_layers() -> None:
    on, off = _table(141), _table(141, resident=False)
    assert cm.gpu_us("resident", 16384, 640, 640, on) < cm.gpu_us("triton", 16384, 640, 640, on)
    assert cm.gpu_us("resident", 16384, 640, 640, off) == math.inf
    assert cm.gpu_us("resident", 16384, 640, 640, on, group=128) == math.inf
    assert cm.DeviceCosts.from_json(on.to_json()) == on and cm.DeviceCosts.from_json(off.to_json()) == off
    # tables written before the flag existed read as devices that do not run it
    old = on.to_json()
    del old["resident"]
    assert not cm.DeviceCosts.from_json(old).resident


@pytest.mark.parametrize(("m", "stages", "splits"), [(1024, 8, 5), (4096, 8, 2), (16384, 3, 1)])
def test_launch_follows_the_fastest_configurations_run_149_timed(m: int, stages: int, splits: int) -> None:
    """SDXL attn 640: splits until the programs are one per SM, a deep ring where they are one wave, else three
    stages so two programs share an SM (run 149's fastest: 5 splits at 1,024 rows, 9.7 against 14.5 µs for 2;
    the 8-deep ring at 4,096, 13.7 against 15.3 µs; 3 stages and 1 split at 16,384)."""
    assert resident_config(0, 640, 640, H100) == resident_config(1, 640, 640, H100)  # an empty batch has a launch
    cfg = resident_config(m, 640, 640, H100)
    assert (cfg.block_m, cfg.block_n, cfg.stages, cfg.splits) == (64, 128, stages, splits)
    row = next(r for r in recorded(RUN149)["rows"] if r["shape"] == "sdxl.attn640" and r["m"] == m)
    timed = {ResidentConfig(**row["configs"][name]): us for name, us in row["graph_us"].items() if name in row["configs"]}
    assert cfg in timed and timed[cfg] <= 1.05 * min(timed.values())  # the run timed it: within 5% of its fastest


def test_h100_sweep_replays_move_only_the_layers_it_was_measured_faster_on() -> None:
    """With the resident path priced, the eager picks on the recorded H100 sweeps change on SDXL attn 640 and
    CLIP attn at 1,024-16,384 rows only: the layers where run 149 measured it ahead of the default path (eager,
    4,096-16,384 rows: 0.77-1.00x -> 0.87-1.14x bf16), and nowhere else of the 114 rows."""
    for run in (141, 142):
        c_off, c_on = _table(run, resident=False), _table(run)
        moved = set()
        for row in recorded(f"sweep_run{run}_h100_2026-12-07.json")["rows"]:
            m, k, n = row["m"], row["k"], row["n"]
            old = cm.decide(tuple(p for p, _ in int8_paths(0)), m, n, k, c_off, "eager")[0]
            new = cm.decide(tuple(p for p, _ in int8_paths(0, 0, True)), m, n, k, c_on, "eager")[0]
            if new != old:
                assert new == "resident"
                moved.add((row["model"], row["layer"], m))
        assert moved == {(model, layer, m) for model, layer in (("sdxl", "attn640"), ("clip_l", "attn"))
                         for m in (1024, 4096, 16384)}
