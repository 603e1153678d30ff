"""Conversion and calibration across processes (torch.distributed, gloo on the CPU).

The files must be those of one process (round to nearest and optimizers on the same calibration file: byte
for byte; GPTQ on distributed calibration: layer outputs within 1e-3), and a killed, failing or interrupted
rank must end every rank with exit 2 and leave no file. Ranks are started as torchrun starts them: by
torchrun itself, by the same environment variables, or forked from this process for the equality tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from convert_helpers import leftovers, sha256, write
from dist_helpers import TIMEOUT_S, finish, free_port, launch_cli, rank_env, run_forked
from safetensors.torch import load_file

from comfyquant.calibration import CalibrationConfig, CalibrationFile, calibrate, calibrate_to_file, merge_all
from comfyquant.calibration.collector import linear_modules, plan_groups
from comfyquant.convert.api import convert, convert_options
from comfyquant.convert.plan import PlanOptions, build_plan
from comfyquant.distributed.assign import greedy_owners, plan_owners
from comfyquant.distributed.calibrate import SEED_STRIDE, calibrate_to_file_distributed
from comfyquant.distributed.config import DistConfig, from_torchrun_env
from comfyquant.distributed.convert import convert_distributed
from comfyquant.distributed.session import PeerLost
from comfyquant.distributed.transport import receive
from comfyquant.errors import UserError
from comfyquant.eval.calibration_sources import dit_source, shard_of
from comfyquant.eval.dit import DigitsDiT, DiTConfig
from comfyquant.formats import dequantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.io.reader import CheckpointReader
from comfyquant.optimize.config import OptimizerConfig
from comfyquant.testing.synthetic import write_synthetic_checkpoint

DIT = Path(__file__).resolve().parents[1] / "comfyquant" / "eval" / "assets" / "digits_dit.safetensors"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny Flux.1 layout (real key names and shapes of every block kind), heavy-tailed bf16 weights."""
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    write_synthetic_checkpoint(path, "flux", "tiny", seed=3)
    return path


@pytest.fixture(scope="module")
def dit_calibration(tmp_path_factory):
    """One process's calibration of the digits DiT: one image per class, 4 sampling steps (cond + uncond)."""
    path = tmp_path_factory.mktemp("calib") / "single.safetensors"
    src = dit_source(per_class=1, steps=4)
    calibrate_to_file(src.model, src.run, path, config=CalibrationConfig(), meta=src.meta)
    return path


def _convert_rank(session, inp: str, out: str, options: dict) -> None:
    report = convert_distributed(inp, out, convert_options(out, **options), session, announce=False)
    assert (report is None) == (session.rank != 0)
    if report is not None:
        report.to_json(out + ".json")


def _same_layers(got: dict, ref) -> None:
    """Rank 0's JSON report lists every layer as one process reports it; error statistics computed on another
    rank (with another thread count) may differ in the last bits of their float64 sums."""
    want = [x.to_dict() for x in ref.layers]
    assert [x["name"] for x in got["layers"]] == [x["name"] for x in want]
    for a, b in zip(got["layers"], want, strict=True):
        floats = ("sqnr_db", "rel_mse", "max_abs_err", "optimizer_gain_db")
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        for k in floats:
            assert a[k] == (b[k] if b[k] is None else pytest.approx(b[k], rel=1e-9)), (a["name"], k)


# -- configuration and layer assignment (pure) --------------------------------------------------------------
def test_torchrun_variables_make_the_config():
    assert from_torchrun_env({}) is None
    assert from_torchrun_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process: the plain path
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert from_torchrun_env(env, 60.0) == DistConfig(2, 4, 2, "10.0.0.1", 29400, True, 60.0)
    with pytest.raises(UserError, match="RANK, MASTER_ADDR"):
        from_torchrun_env({"WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        from_torchrun_env({"WORLD_SIZE": "two"})
    with pytest.raises(UserError, match="rank 4 is not in a world of 4"):
        from_torchrun_env({**env, "RANK": "4"})


def test_greedy_owners_balance_in_file_order():
    assert greedy_owners([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    assert greedy_owners([1.0] * 6, 3) == [0, 1, 2, 0, 1, 2]  # equal work interleaves
    assert greedy_owners([None, 2, None, 2], 2) == [0, 0, 0, 1]  # pinned items stay on the writer
    # the writer is charged for every item it writes, so it quantizes less
    assert greedy_owners([1.0] * 4, 2, writer_costs=[0.6] * 4) == [1, 1, 0, 1]


def test_bias_follows_its_weight_under_bias_correction(flux):
    plan = build_plan(CheckpointReader(flux).infos, PlanOptions("int8", "flux"))
    owners = plan_owners(plan, 3, optimizing=True, follow_bias=True)
    by_name = {e.name: owners[i] for i, e in enumerate(plan.entries)}
    weights = [e for e in plan.entries if e.action == "quantize"]
    assert {by_name[e.name] for e in weights} == {0, 1, 2}
    for e in weights:
        if f"{e.layer}.bias" in by_name:
            assert by_name[f"{e.layer}.bias"] == by_name[e.name]
    kept = [by_name[e.name] for e in plan.entries if e.action == "keep" and not e.name.endswith(".bias")]
    assert set(kept) == {0}


def test_shards_cover_the_data_once():
    items = list(range(10))
    parts = [shard_of(items, (r, 3)) for r in range(3)]
    assert [x for p in parts for x in p] == items and [len(p) for p in parts] == [3, 3, 4]
    assert shard_of(items, None) == items and shard_of(range(2), (2, 3)) == [1]


# -- the same files as one process ----------------------------------------------------------------------------
@pytest.mark.parametrize(("world", "fmt"), [(2, "int8"), (3, "fp8")])
def test_rtn_is_byte_identical_to_one_process(flux, tmp_path, world, fmt):
    single, dist = tmp_path / "single.safetensors", tmp_path / "dist.safetensors"
    ref = convert(flux, single, format=fmt, model="flux", progress=False)
    run_forked(world, _convert_rank, str(flux), str(dist), {"format": fmt, "model": "flux", "progress": False})
    assert sha256(dist) == sha256(single)
    _same_layers(json.loads(Path(str(dist) + ".json").read_text()), ref)  # every rank's reports reach rank 0
    assert leftovers(tmp_path) == []


def test_optimizers_with_one_calibration_file_are_byte_identical(dit_calibration, tmp_path):
    """GPTQ + SmoothQuant + bias correction on the digits DiT, 3 ranks: the same math per layer, so the same
    bytes; SmoothQuant's producer edits (written by rank 0) and bias corrections (on the weight's owner)
    must agree with the layers' owners."""
    calib = dit_calibration
    opt = OptimizerConfig(method="gptq", smoothquant=True, bias_correction=True)
    single, dist = tmp_path / "single.safetensors", tmp_path / "dist.safetensors"
    ref = convert(DIT, single, progress=False, optimizer=opt, calibration=calib)
    assert sum(x.optimizer == "gptq" for x in ref.layers) >= 10
    run_forked(3, _convert_rank, str(DIT), str(dist), {"progress": False, "optimizer": opt,
                                                        "calibration": str(calib)})
    assert sha256(dist) == sha256(single)
    _same_layers(json.loads(Path(str(dist) + ".json").read_text()), ref)


def _small_dit():
    torch.manual_seed(0)
    model = DigitsDiT(DiTConfig(hidden=128, depth=1, depth_single=1, context_dim=32, vec_dim=16)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def _dit_data(shard):
    def run(m):
        g = torch.Generator().manual_seed(1)
        x, lab = torch.randn(6, 16, 8, 8, generator=g), torch.arange(6) % 4
        part = torch.tensor(shard_of(range(6), shard), dtype=torch.long)
        for t in (0.9, 0.4):
            if len(part):
                m.velocity(x[part], torch.full((len(part),), t), lab[part])
    return run


def _calibrate_rank(session, out: str, max_bytes: int) -> None:
    cfg = CalibrationConfig(reservoir=16, max_bytes=max_bytes)
    assert len(plan_groups({n: m.in_features for n, m in linear_modules(_small_dit()).items()}, cfg,
                           torch.float64)) >= 2
    summary = calibrate_to_file_distributed(_small_dit(), _dit_data((session.rank, session.world)), out, session,
                                            config=cfg, meta={"source": "test"})
    assert (summary is None) == (session.rank != 0)


def test_calibration_reduces_every_layer_onto_its_owner(tmp_path):
    """3 ranks, each running a third of the inputs, statistics collected in several groups (a memory budget):
    the file holds exactly the merge of what each rank's share gives in one process (Hessians up to the
    order of the additions), reservoir included."""
    cfg = CalibrationConfig(reservoir=16, max_bytes=4_000_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same activations, bit for bit
    try:
        parts = [calibrate(_small_dit(), _dit_data((r, 3)), config=replace(cfg, seed=SEED_STRIDE * r))
                 for r in range(3)]
    finally:
        torch.set_num_threads(threads)
    ref = merge_all(parts)
    dist = tmp_path / "dist.safetensors"
    run_forked(3, _calibrate_rank, str(dist), cfg.max_bytes)
    got = CalibrationFile(dist)
    assert list(got) == list(ref) and got.meta["processes"] == 3 and got.meta["source"] == "test"
    for name in ref:
        x, y = ref[name], got.layer(name)
        assert x.count == y.count > 0
        assert torch.equal(x.absmax, y.absmax)
        torch.testing.assert_close(y.hessian, x.hessian, rtol=1e-12, atol=1e-12 * float(x.hessian.abs().max()))
        torch.testing.assert_close(y.col_sum, x.col_sum, rtol=1e-12, atol=1e-12 * float(x.col_sum.abs().max()))
        assert torch.equal(y.keys, x.keys) and torch.equal(y.sample, x.sample)  # the same uniform sample


def _output_error(w_ref: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """Relative error of the layer outputs ``X W^T`` over the calibration inputs (``H = X^T X``)."""
    e = (w - w_ref).double()
    return float(((e @ h) * e).sum() / ((w_ref.double() @ h) * w_ref.double()).sum()) ** 0.5


@pytest.mark.cpu_int8  # the ranks' int8 forward passes
def test_calibrate_cli_on_two_ranks_then_gptq_within_bound(dit_calibration, tmp_path):
    """``comfyquant calibrate digits-dit`` on 2 ranks (each samples half the images), then GPTQ on 2 ranks
    with that file: every layer's outputs within 1e-3 of one process calibrating and converting alone."""
    c1, c2 = dit_calibration, tmp_path / "c2.safetensors"
    codes = finish(launch_cli(2, ["calibrate", "digits-dit", "--samples", "1", "--steps", "4", "-o", str(c2)],
                              tmp_path))
    assert [c for c, _ in codes] == [0, 0], codes
    a, b = CalibrationFile(c1), CalibrationFile(c2)
    assert list(a) == list(b) and b.meta["processes"] == 2
    for name in a:  # half the images each, batched differently: the activations agree to float32 rounding
        x, y = a.layer(name), b.layer(name)
        assert x.count == y.count > 0
        torch.testing.assert_close(y.absmax, x.absmax, rtol=1e-4, atol=1e-6 * float(x.absmax.max()))
    g1, g2 = tmp_path / "g1.safetensors", tmp_path / "g2.safetensors"
    convert(DIT, g1, progress=False, optimizer="gptq", calibration=c1)
    run_forked(2, _convert_rank, str(DIT), str(g2), {"progress": False, "optimizer": OptimizerConfig("gptq"),
                                                      "calibration": str(c2)})
    s1, s2 = load_file(str(g1)), load_file(str(g2))
    assert s1.keys() == s2.keys()
    layers = [k[: -len(".comfy_quant")] for k in s1 if k.endswith(".comfy_quant")]
    assert len(layers) >= 10
    for layer in layers:
        conf = decode_comfy_quant(s1[f"{layer}.comfy_quant"])
        w1, w2 = (dequantize_weight({"weight": s[f"{layer}.weight"], "weight_scale": s[f"{layer}.weight_scale"]},
                                    conf) for s in (s1, s2))
        assert _output_error(w1, w2, a.layer(layer).hessian_mean()) <= 1e-3, layer


def _hang_on_rank_1(session, stamp: str) -> None:
    if session.rank == 1:
        time.sleep(TIMEOUT_S)  # alive but silent: a hung rank (ended by rank 0's ABORT, not by this sleep)
        return
    start = time.monotonic()
    with pytest.raises(PeerLost, match="receiving from rank 1: no answer within the --dist-timeout"):
        receive(1)
    Path(stamp).write_text(str(time.monotonic() - start))
    raise RuntimeError("the job failed as it should")  # leave the session failing: ABORT to rank 1


def test_a_hung_rank_fails_the_job_after_the_timeout(tmp_path):
    stamp = tmp_path / "waited"
    start = time.monotonic()
    run_forked(2, _hang_on_rank_1, str(stamp), dist_timeout=3.0, expect=[1, 2])
    assert 3.0 <= float(stamp.read_text()) < 60
    assert time.monotonic() - start < TIMEOUT_S / 2  # rank 1 was ended by rank 0, not by its own sleep


def _stop_rank_1(session) -> None:
    if session.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # every thread stopped, the connections open: nothing answers
        time.sleep(TIMEOUT_S)
        return
    receive(1)  # times out; the failing session cannot settle with rank 1 and exits 2 itself


def test_a_stopped_rank_fails_the_job_and_rank_0_still_exits_2(tmp_path):
    """A rank whose watcher cannot answer either (SIGSTOP): rank 0 times out, reports and exits 2 instead of
    waiting on it (or aborting in gloo at exit); once resumed, the stopped rank sees rank 0's ABORT."""
    run_forked(2, _stop_rank_1, dist_timeout=3.0, expect=[2, 2], resume=True)


# -- the real command lines -----------------------------------------------------------------------------------
def test_torchrun_convert_writes_the_single_process_file(tmp_path):
    single, dist, rep = tmp_path / "single.safetensors", tmp_path / "dist.safetensors", tmp_path / "r.json"
    convert(DIT, single, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "comfyquant", "convert", str(DIT), "-o", str(dist),
           "--report", str(rep)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sha256(dist) == sha256(single)
    assert r.stdout.count(f"wrote {dist}") == 1  # rank 0 prints the table, the others stay quiet
    assert "[rank 0/2]" in r.stderr and "[rank 1/2]" in r.stderr
    assert len(json.loads(rep.read_text())["layers"]) == len(load_file(str(DIT)))


def _learned_forever(flux: Path, out: Path) -> list[str]:
    """A conversion every rank spends a long time in: learned rounding with a million steps per layer."""
    return ["convert", str(flux), "-o", str(out), "--model", "flux", "--optimizer", "learned", "--num-iter",
            "1000000", "--calibration", "synthetic"]


def _started(procs) -> list[str]:
    """Each rank's first stderr line: the announcement it prints right before its first layer."""
    lines = [p.stderr.readline() for p in procs]
    assert all("quantized layer(s) here" in x for x in lines), lines
    return lines


def test_a_killed_rank_ends_every_rank(flux, tmp_path):
    out = tmp_path / "out.safetensors"
    procs = launch_cli(3, _learned_forever(flux, out), tmp_path)
    _started(procs)
    assert leftovers(tmp_path), "rank 0 opens its temporary file before it announces"
    procs[1].kill()  # as the OOM killer would
    (c0, e0), (c1, _), (c2, e2) = finish(procs)
    assert (c0, c1, c2) == (2, -signal.SIGKILL, 2), (e0, e2)
    assert "rank 1 stopped (connection lost: it was killed or crashed)" in e0
    assert "[rank 2/3]: error: rank 0 ended the job" in e2
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_ends_every_rank(flux, tmp_path):
    out = tmp_path / "out.safetensors"
    procs = launch_cli(2, _learned_forever(flux, out), tmp_path)
    _started(procs)
    for p in procs:  # a terminal's Ctrl-C reaches every process of the job
        p.send_signal(signal.SIGINT)
    codes = finish(procs)
    assert [c for c, _ in codes] == [2, 2], codes
    assert all(e.strip().splitlines()[-1].count("error:") == 1 for _, e in codes), codes
    assert not out.exists() and leftovers(tmp_path) == []


class _SlowAfter:
    """A stderr whose write pauses after a text containing ``marker``, so that another thread's line written
    in that pause would join it (as a loaded machine may schedule the two threads)."""

    def __init__(self, path: str, marker: str) -> None:
        self.f, self.marker = open(path, "a"), marker  # closed by os._exit with the process

    def write(self, s: str) -> int:
        n = self.f.write(s)
        self.f.flush()
        if self.marker in s:
            time.sleep(1.0)
        return n

    def flush(self) -> None:
        self.f.flush()


def _interrupted_while_ending(session, log: str) -> None:
    """Rank 1 fails once rank 0's stderr is the slow one (before that, a loaded machine let rank 0's watcher
    print the failure to the real stderr: CI, stop 22); rank 0 is interrupted while its watcher is printing why
    the job ends."""
    ready = Path(log + ".ready")
    if session.rank == 1:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("rank 1's own failure")
    sys.stderr = _SlowAfter(log, "rank 1 failed")
    ready.touch()
    deadline = time.monotonic() + 60
    while session._state != "failing" and time.monotonic() < deadline:
        time.sleep(0.01)
    raise KeyboardInterrupt


def test_an_interrupt_while_a_watcher_ends_the_job_prints_one_line(tmp_path):
    """CI failure (stop 16): Ctrl-C reached rank 0 while its watcher was printing the peer's failure; both
    threads printed, and their lines were joined into one with two "error:". A rank prints one error line."""
    log = tmp_path / "rank0.err"
    run_forked(2, _interrupted_while_ending, str(log), dist_timeout=20.0, expect=[2, 1])
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].count("error:") == 1, lines
    assert "rank 1 failed (see its error); no output written" in lines[0]


def test_a_failing_rank_ends_every_rank(tmp_path):
    """A NaN weight on rank 1 (no --force): rank 1 names it and exits 2, rank 0 writes nothing and exits 2."""
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.linear.weight": torch.randn(64, 64, generator=g) for i in range(4)}
    plan = build_plan(CheckpointReader(write(tmp_path / "probe.safetensors", sd)).infos, PlanOptions("int8", "none"))
    owners = plan_owners(plan, 2, optimizing=False, follow_bias=False)
    bad = next(e.name for e, o in zip(plan.entries, owners, strict=True) if o == 1)
    sd[bad][3, 5] = float("nan")
    inp = write(tmp_path / "nan.safetensors", sd)
    out = tmp_path / "out.safetensors"
    (c0, e0), (c1, e1) = finish(launch_cli(2, ["convert", str(inp), "-o", str(out), "--model", "none"], tmp_path))
    assert (c0, c1) == (2, 2), (e0, e1)
    assert f"layer '{bad}' holds NaN/Inf" in e1 and "rank 1 failed" in e0
    assert not out.exists() and leftovers(tmp_path) == []


def test_torchrun_refuses_format_auto_in_one_line(tmp_path):
    """--format auto plans all layers together in one process: under torchrun every rank says so in one line,
    exits 2 and writes nothing."""
    out = tmp_path / "auto.safetensors"
    args = ["convert", str(DIT), "-o", str(out), "--format", "auto", "--budget", "size=0.5"]
    (c0, e0), (c1, e1) = finish(launch_cli(2, args, tmp_path))
    assert (c0, c1) == (2, 2), (e0, e1)
    for err in (e0, e1):
        assert "run it without torchrun" in err and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_refusals_come_before_joining_the_job(tmp_path):
    """Rank 1 alone (no rank 0 will ever come): the refusal is said at once, without waiting to join a job,
    so no rank can first see a faster rank's abort and say that instead (CI saw it once)."""
    args = [sys.executable, "-m", "comfyquant", "convert", str(DIT), "-o", str(tmp_path / "a.safetensors"),
            "--format", "auto", "--budget", "size=0.5"]
    p = subprocess.run(args, cwd=tmp_path, env=rank_env(2, 1, free_port()), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "run it without torchrun" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert leftovers(tmp_path) == []
