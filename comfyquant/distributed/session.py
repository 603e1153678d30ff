"""One rank's membership of a distributed job: the process group, its device, and fail-stop failure handling.

Data moves on the default process group (gloo for CPU tensors; NCCL for CUDA tensors when the job runs on
GPUs). Beside it, a small gloo *watch* group carries one status word per rank pair, and a watcher thread per
peer waits on it for the whole job: a peer that is killed closes its sockets, so its watcher sees the
error at once, even while this rank is deep inside a long layer. The protocol:

- a rank (other than 0) that finished sends DONE to rank 0, then waits for rank 0's verdict (OK: the
  output file was committed; ABORT: it was not);
- rank 0 commits the output only after every peer sent DONE (so a rank lost mid-job never leaves a file);
- a rank whose own work fails sends FAILED (rank 0: ABORT to every peer) and exits 2 through the CLI;
- a watcher that sees FAILED/ABORT, or a lost connection, while this rank is still working ends the job
  here: one error line, the registered temporary files removed, ABORT passed on by rank 0, and the process
  exits 2 at once (``os._exit``: the main thread may be inside a long computation or a blocked receive).

Every wait is bounded by ``DistConfig.timeout_s``, so a hung (not dead) rank fails the job too.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from comfyquant.distributed.config import DistConfig
from comfyquant.errors import UserError
from comfyquant.exits import one_line, report, say

DONE, FAILED, OK, ABORT = 1, 2, 3, 4
EXIT_FAILED = 2  # the CLI's exit status for a failed job (same as a user error or Ctrl-C)
_FOREVER = datetime.timedelta(days=30)
SETTLE_S = 30.0  # how long a failing rank waits for the other ranks' watchers to acknowledge  # the watch group's receives wait for the whole job


class PeerLost(UserError):
    """Another rank died, failed, hung past the timeout, or ended the job."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def rank_device(device: str, cfg: DistConfig) -> str:
    """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) in a job; an explicit index would put several
    ranks on one GPU, so it is refused. ``cpu`` stays ``cpu``."""
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device}: under torchrun pass --device cuda; each rank then uses "
                            "cuda:LOCAL_RANK")
        return f"cuda:{cfg.local_rank}"
    return device


class Session:
    """``with Session(cfg, prog) as s:`` joins the job (process group, watchers, SIGTERM -> KeyboardInterrupt);
    leaving the block with an exception fails the job on every rank. A clean end is explicit: rank 0 calls
    :meth:`wait_peers_done` before committing and :meth:`release` after; other ranks call :meth:`finish`."""

    def __init__(self, cfg: DistConfig, prog: str = "comfyquant", device_type: str = "cpu") -> None:
        self.cfg, self.prog, self.device_type = cfg, prog, device_type
        self.rank, self.world = cfg.rank, cfg.world_size
        self.timeout = datetime.timedelta(seconds=cfg.timeout_s)
        self._lock = threading.Lock()
        self._state = "new"  # running -> (finishing | committing) -> done, or failing
        self._cleanups: list[Path] = []
        self._threads: list[threading.Thread] = []
        self._peers_done: set[int] = set()
        self._all_done = threading.Event()
        self._verdict = threading.Event()
        self._told: set[int] = set()  # peers rank 0 sent its final word to
        self._watch: object = None
        self._claimed = False
        self._old_term: object = None
        self._store: dist.Store | None = None
        self._stopper: threading.Thread | None = None  # the watcher ending the job, once one is

    # -- joining and leaving ------------------------------------------------------------------------------
    def __enter__(self) -> Session:
        if self.device_type == "cuda":
            if not torch.cuda.is_available() or self.cfg.local_rank >= torch.cuda.device_count():
                raise UserError(f"--device cuda needs GPU {self.cfg.local_rank} (LOCAL_RANK), "
                                f"this machine has {torch.cuda.device_count()}")
            torch.cuda.set_device(self.cfg.local_rank)
        backend = "cpu:gloo,cuda:nccl" if self.device_type == "cuda" else "gloo"
        try:
            store = dist.TCPStore(self.cfg.master_addr, self.cfg.master_port, self.world,
                                  is_master=self.rank == 0 and not self.cfg.agent_store, timeout=self.timeout)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world,
                                    timeout=self.timeout)
            self._store = store
            self._watch = dist.new_group(backend="gloo", timeout=_FOREVER)
        except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
            raise UserError(f"cannot join the job at {self.cfg.master_addr}:"
                            f"{self.cfg.master_port}: {one_line(e)[:300]}") from None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._state = "running"
        peers = range(1, self.world) if self.rank == 0 else (0,)
        for p in peers:
            t = threading.Thread(target=self._watch_peer, args=(p,), name=f"comfyquant-watch-{p}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if et is not None:
                self._fail()
                stopper = self._stopper
                if stopper is not None and stopper is not threading.current_thread():
                    # a watcher is already ending the job (its error line printed or being printed, then
                    # os._exit): one error line per rank, so wait for it instead of reporting this one too
                    stopper.join(min(self.cfg.timeout_s, SETTLE_S) + 5.0)
                if any(t.is_alive() for t in self._threads):
                    # a peer neither answered nor closed its connection (hung, or stopped): its watcher stays
                    # blocked inside gloo, and a process ending with such a thread aborts; report and leave now
                    code = report(f"{self.prog} [{self.cfg.label}]", ev)  # type: ignore[arg-type]
                    self._remove_temp_outputs()  # os._exit skips the writers' own cleanup
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]
                self._old_term = None
        if et is None and dist.is_initialized():
            # leave together: a rank that tears its process group down while a peer is still inside its own
            # teardown (or still hosting the store) can make that peer's gloo threads abort the process
            watched(dist.barrier, "leaving the job")
            # the watch group goes with the others, here, while the store is up: a reference kept to the end of
            # the process left its gloo threads to be torn down at interpreter exit (a suspect for a rank's rare
            # SIGABRT after a clean job, seen once in a fresh-clone CI run; not reproduced on demand)
            self._watch = None
            dist.destroy_process_group()
            self._leave_store()

    def _leave_store(self) -> None:
        """After the process groups are gone: every other rank says so through the store, and the rank that
        hosts the store (rank 0 without torchrun's agent) waits for all of them before its process may end.
        Without this, the host could exit while a peer was still tearing down its gloo group, whose threads
        then found the store gone and aborted that peer's process (SIGABRT, "terminate called without an
        active exception"; 1 in 5-8 two-rank runs under load)."""
        store, self._store = self._store, None
        if store is None or self.world == 1:
            return
        if self.rank != 0:
            store.set(f"comfyquant/left/{self.rank}", "1")
        elif not self.cfg.agent_store:
            keys = [f"comfyquant/left/{r}" for r in range(1, self.world)]
            try:
                store.wait(keys, datetime.timedelta(seconds=min(self.cfg.timeout_s, SETTLE_S)))
            except RuntimeError as e:  # the job's result is already committed: say so, do not fail it
                print(f"{self.prog} [{self.cfg.label}]: note: a rank did not confirm leaving the job "
                      f"({one_line(e)[:200]})", file=sys.stderr, flush=True)

    def claim(self) -> None:
        """Start this session's one job (its watchers end with it): a second job needs a new Session."""
        if self._claimed or self._state != "running":
            raise RuntimeError("a distributed Session runs one job; open a new Session for the next")
        self._claimed = True

    def on_abort(self, path: Path) -> None:
        """Remove ``path`` (a temporary output) if the job is ended from another rank."""
        self._cleanups.append(Path(path))

    # -- clean end ----------------------------------------------------------------------------------------------
    def wait_peers_done(self) -> None:
        """Rank 0: return once every peer finished its part (call before committing the output)."""
        if not self._all_done.wait(self.cfg.timeout_s) and self.world > 1:
            missing = sorted(set(range(1, self.world)) - self._peers_done)
            raise PeerLost(f"rank(s) {missing} did not finish within {self.cfg.timeout_s:g} s after rank 0 "
                           "received their last result")
        with self._lock:
            self._state = "committing"

    def release(self) -> None:
        """Rank 0, after committing: tell every peer the job succeeded."""
        with self._lock:
            self._state = "done"
        for p in range(1, self.world):
            self._tell(p, OK)

    def finish(self) -> None:
        """A rank other than 0, after its last result was sent: report DONE and wait for rank 0's verdict."""
        with self._lock:
            self._state = "finishing"
        watched(lambda: self._send(0, DONE), "reporting to rank 0")
        if not self._verdict.wait(self.cfg.timeout_s):
            raise PeerLost(f"rank 0 did not confirm the output within {self.cfg.timeout_s:g} s")
        with self._lock:
            self._state = "done"

    # -- failure ------------------------------------------------------------------------------------------------
    def _fail(self) -> None:
        """This rank's own work failed: tell the others, wait (bounded) for the watchers to settle."""
        with self._lock:
            already = self._state == "failing"
            self._state = "failing"
        if already:
            return
        words = [(p, ABORT) for p in range(1, self.world)] if self.rank == 0 else [(0, FAILED)]
        self._threads.append(self._tell_in_thread(words))
        deadline = time.monotonic() + min(self.cfg.timeout_s, SETTLE_S)
        for t in self._threads:  # the peers answer ABORT/FAILED at once (or their connection closes)
            t.join(max(0.0, deadline - time.monotonic()))

    def _tell(self, peer: int, code: int) -> None:
        if peer in self._told:
            return
        self._told.add(peer)
        try:
            self._send(peer, code)
        except RuntimeError:
            pass  # the peer is already gone: its connection error is what ended the job

    def _remove_temp_outputs(self) -> None:
        """Remove the temporary outputs registered with :meth:`on_abort` (before leaving with ``os._exit``)."""
        for path in self._cleanups:
            path.unlink(missing_ok=True)

    def _tell_in_thread(self, words: list[tuple[int, int]]) -> threading.Thread:
        """Send final status words from a daemon thread: a send to a peer that was stopped before it posted its
        receive can block for good (the watch group has no timeout). Callers wait for it at most a bounded time
        and leave with ``os._exit`` if it is still blocked."""
        teller = threading.Thread(target=lambda: [self._tell(p, c) for p, c in words], name="comfyquant-tell",
                                  daemon=True)
        teller.start()
        return teller

    def _send(self, peer: int, code: int) -> None:
        dist.send(torch.tensor([code], dtype=torch.int64), peer, group=self._watch)  # type: ignore[arg-type]

    def _watch_peer(self, peer: int) -> None:
        """Watcher thread: wait for ``peer``'s status word (or the loss of its connection)."""
        buf = torch.zeros(1, dtype=torch.int64)
        try:
            dist.recv(buf, peer, group=self._watch)  # type: ignore[arg-type]
        except RuntimeError:  # the only news a killed peer can send: its closed connection
            self._stop(f"rank {peer} stopped (connection lost: it was killed or crashed)")
            return
        code = int(buf[0])
        if code == DONE:
            self._peers_done.add(peer)
            if len(self._peers_done) == self.world - 1:
                self._all_done.set()
        elif code == OK:
            self._verdict.set()
        elif code == FAILED:
            self._stop(f"rank {peer} failed (see its error)")
        elif code == ABORT:
            self._stop("rank 0 ended the job without writing the output (the error is in rank 0's output or the "
                       "failed rank's)")

    def _stop(self, reason: str) -> None:
        """End the job from a watcher thread, unless this rank is already failing or past its commit."""
        with self._lock:
            if self._state not in ("running", "finishing"):
                return
            self._state = "failing"
            self._stopper = threading.current_thread()
        say(f"{self.prog} [{self.cfg.label}]: error: {reason}; no output written")
        if self.rank == 0:
            self._tell_in_thread([(p, ABORT) for p in range(1, self.world)]).join(min(self.cfg.timeout_s, SETTLE_S))
        # last, right before leaving: the main thread may still be opening its output while the peers are told
        self._remove_temp_outputs()
        sys.stdout.flush()
        os._exit(EXIT_FAILED)


def watched(fn: Callable[[], object], what: str) -> object:
    """Run one data-channel operation, turning a broken or timed-out connection into :class:`PeerLost`."""
    try:
        return fn()
    except RuntimeError as e:
        msg = str(e)
        if "timed out" in msg.lower() or "timeout" in msg.lower():
            why = "no answer within the --dist-timeout (a rank is hung or stopped)"
        elif "closed" in msg.lower() or "reset by peer" in msg.lower():
            why = "connection lost (a rank was killed or crashed)"
        else:
            why = one_line(msg)[:200]
        raise PeerLost(f"{what}: {why}") from None
