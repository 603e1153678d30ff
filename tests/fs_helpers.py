"""Real full and read-only file systems for tests, without needing root.

A command runs inside a private user + mount namespace (``unshare --user --map-root-user --mount``): there it
may mount a small tmpfs (a disk that really fills up: ENOSPC from write(2)) or bind a folder onto itself
read-only (EROFS from open/unlink, even for root, which a chmod cannot give: root ignores permission bits).
The mounts vanish with the process and nothing on the host changes. Where user namespaces are not allowed,
:func:`namespaces_available` is False and callers fall back to ``RLIMIT_FSIZE`` (EFBIG from write(2) at a
fixed size, the same failure path) or to permission bits with capabilities dropped.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

UNSHARE = shutil.which("unshare")


@functools.cache
def namespaces_available() -> bool:
    """True when this process may mount a tmpfs and a read-only bind inside an unprivileged namespace."""
    if UNSHARE is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        script = f"mount -t tmpfs -o size=64k tmpfs {d} && mount --bind {d} {d} && mount -o remount,bind,ro {d}"
        try:
            r = subprocess.run([UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                               capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def in_namespace(argv: Sequence[str], *, tmpfs: tuple[Path, int] | None = None,
                 read_only: Sequence[Path] = ()) -> list[str]:
    """``argv`` wrapped to run with a tmpfs of ``size`` bytes mounted at ``tmpfs[0]`` and each ``read_only``
    folder bound onto itself read-only (only where :func:`namespaces_available`)."""
    steps = []
    if tmpfs is not None:
        steps.append(f"mount -t tmpfs -o size={tmpfs[1]} tmpfs {shlex.quote(str(tmpfs[0]))}")
    for d in read_only:
        q = shlex.quote(str(d))
        steps += [f"mount --bind {q} {q}", f"mount -o remount,bind,ro {q}"]
    steps.append('exec "$@"')
    assert UNSHARE is not None
    return [UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c", " && ".join(steps), "sh", *map(str, argv)]


def file_size_limit(limit: int):
    """A ``preexec_fn`` that makes every write past ``limit`` bytes fail with EFBIG, as a full disk fails."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def drop_dac_capabilities() -> None:
    """In the child: without CAP_DAC_OVERRIDE even root obeys directory permissions."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
