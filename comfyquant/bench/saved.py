"""Saved benchmark results read back. ``benchmarks/results`` keeps its result JSON over 20 KB gzip-compressed
(``<name>.json.gz``, written with ``gzip -9 -n``) to keep the working tree that a device call copies small, so a
reader of a saved result takes either form: the name as saved (``.json``) or its ``.gz``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def saved_path(path: str | Path) -> Path:
    """``path`` where it is there, else ``path`` + ``.gz`` where only the compressed form is (else ``path``)."""
    p = Path(path)
    gz = p.with_name(p.name + ".gz")
    return gz if not p.exists() and gz.exists() else p


def read_saved_text(path: str | Path) -> str:
    """The text of the saved result ``path`` (see :func:`saved_path`), decompressed where its name ends ``.gz``
    (utf-8). Raises ``OSError`` (``gzip.BadGzipFile`` among them) or ``EOFError`` (a truncated ``.gz``)."""
    p = saved_path(path)
    return gzip.decompress(p.read_bytes()).decode("utf-8") if p.name.endswith(".gz") else p.read_text()


def read_saved_json(path: str | Path) -> Any:
    """The saved result ``path`` (``.json`` or ``.json.gz``, see :func:`saved_path`), parsed."""
    return json.loads(read_saved_text(path))
