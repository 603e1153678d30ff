"""Helpers for the distributed tests: ranks started as torchrun would start them, bounded by timeouts.

``launch_cli`` starts one ``python -m comfyquant`` process per rank with torchrun's environment variables
(the contract torchrun implements); ``run_forked`` forks ranks of this test process that call a function
with a joined :class:`Session` (no interpreter start-up per rank: the equality tests stay fast).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from comfyquant.distributed import DistConfig, Session

TIMEOUT_S = 240  # a hang fails the test instead of hanging CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(world: int, rank: int, port: int) -> dict[str, str]:
    """torchrun's variables for one rank of a one-machine job (one thread per rank, as torchrun sets)."""
    return {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal (background shells ignore SIGINT)


def launch_cli(world: int, args: list[str], cwd: Path) -> list[subprocess.Popen[str]]:
    """One ``python -m comfyquant ARGS`` per rank; stderr is piped (each rank's announcement is its first line)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "comfyquant", *args], cwd=cwd, env=rank_env(world, r, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint) for r in range(world)]


def finish(procs: list[subprocess.Popen[str]], timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """Each rank's (exit status, stderr); ranks still running after ``timeout`` are killed and the test fails."""
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {procs.index(p)} still running after {timeout} s (hung)") from None
        out.append((p.returncode, err))
    return out


def _child(cfg: DistConfig, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # one thread per rank (and no OpenMP pool inherited across fork)
    try:
        with Session(cfg, "test") as s:
            fn(s, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def run_forked(world: int, fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT_S,
               dist_timeout: float | None = None, expect: list[int] | None = None, resume: bool = False) -> None:
    """Run ``fn(session, *args)`` on ``world`` forked ranks within ``timeout``; each rank's exit status must be
    ``expect`` (default: all 0; a rank whose ``fn`` raises exits 1). ``dist_timeout``: the job's timeout;
    ``resume``: once rank 0 has ended, send SIGCONT to every rank (for ranks that stopped themselves)."""
    port = free_port()
    ctx = mp.get_context("fork")
    cfgs = [DistConfig(r, world, master_port=port, timeout_s=dist_timeout or timeout) for r in range(world)]
    procs = [ctx.Process(target=_child, args=(cfg, fn, args)) for cfg in cfgs]
    for p in procs:
        p.start()
    for i, p in enumerate(procs):
        p.join(timeout)
        if i == 0 and resume:
            for q in procs:
                if q.is_alive():
                    os.kill(q.pid, signal.SIGCONT)
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"rank(s) {alive} hung past {timeout} s"
    codes = [p.exitcode for p in procs]
    assert codes == (expect or [0] * world), f"exit codes {codes}"
