"""Error types that separate a user's mistake (exit 2, one line) from a bug (exit 1, traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or usage: the CLI prints ``str(err)`` on one line and exits with status 2."""


class CorruptFileError(UserError):
    """A file that is not a valid safetensors file (truncated, bad header, pickle, empty)."""


class NonFiniteWeightError(UserError):
    """A tensor holds NaN or Inf values; the message names the layer."""
