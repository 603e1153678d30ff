"""Who this process is in a distributed job: an explicit, frozen :class:`DistConfig`.

The library never reads environment variables: the command line reads torchrun's (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE``) at its edge with
:func:`from_torchrun_env` and passes the result down; Python callers build a ``DistConfig`` themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from comfyquant.errors import UserError

DEFAULT_TIMEOUT_S = 1800.0  # longest silence between ranks before the job is declared hung (torch's default)


@dataclass(frozen=True)
class DistConfig:
    """One rank of a job of ``world_size`` processes.

    ``master_addr:master_port`` is the rendezvous store (torchrun's agent hosts it when ``agent_store``,
    else rank 0 does); ``timeout_s`` bounds every wait on another rank, so a hung rank fails the job instead
    of hanging it (a dead rank is noticed at once, see ``comfyquant.distributed.session``).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    agent_store: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UserError(f"distributed: rank {self.rank} is not in a world of {self.world_size} process(es)")
        if self.local_rank < 0:
            raise UserError(f"distributed: LOCAL_RANK {self.local_rank} is negative")
        if not 0 < self.master_port < 65536:
            raise UserError(f"distributed: MASTER_PORT {self.master_port} is not a TCP port")
        if self.timeout_s <= 0:
            raise UserError(f"distributed: timeout {self.timeout_s} s must be positive")

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    raw = env.get(key, default)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"distributed: environment variable {key}={raw!r} is not an integer "
                        "(launch with torchrun, which sets it)") from None


def from_torchrun_env(env: Mapping[str, str], timeout_s: float = DEFAULT_TIMEOUT_S) -> DistConfig | None:
    """The job torchrun (or any launcher following its variables) started this process in, or None when the
    process runs alone (no ``WORLD_SIZE``, or a world of one: then the single-process path runs unchanged)."""
    if "WORLD_SIZE" not in env:
        return None
    world = _int(env, "WORLD_SIZE")
    if world == 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise UserError(f"distributed: WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                        "torchrun --nproc-per-node N -m comfyquant ...")
    return DistConfig(rank=_int(env, "RANK"), world_size=world, local_rank=_int(env, "LOCAL_RANK", "0"),
                      master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"),
                      agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", timeout_s=timeout_s)
