"""File digests: the sha256 of a file read in blocks (checkpoints are many GiB; never read whole)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """Hex sha256 of the file at ``path``, read ``block`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
