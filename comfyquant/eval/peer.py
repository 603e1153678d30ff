"""The peer converter, ``convert_to_quant`` 1.3.4 from PyPI, in its own virtual environment.

Shared by the quality eval and the speed benchmarks: :func:`ensure_peer_venv` builds the venv once
(under ``~/.cache/comfyquant/peer-venv``, torch pinned to the CPU build so pip never pulls CUDA),
:func:`run_peer` runs its CLI, :func:`peer_args` maps a comfyquant format to the peer's flags.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from comfyquant.errors import UserError

PEER_VERSION = "1.3.4"
TORCH_PIN = "torch==2.13.0"
# Undeclared imports of convert_to_quant 1.3.4 (it declares only prodigy-plus-schedule-free); triton is
# imported by its int8 path even on a CPU.
EXTRA_DEPS = ("safetensors", "tqdm", "numpy", "scipy", "triton")
VENV = Path.home() / ".cache" / "comfyquant" / "peer-venv"

# comfyquant format -> the peer's flags for the same on-disk format (all with --comfy_quant).
PEER_FORMAT_FLAGS: dict[str, tuple[str, ...]] = {
    "int8": ("--int8", "--scaling-mode", "row"),
    "int8-tensor": ("--int8", "--scaling-mode", "tensor"),
    "int8-rot": ("--int8", "--convrot", "--scaling-mode", "row"),  # without row: a plain per-tensor file
    "fp8": (),  # the peer's default format: fp8 e4m3 with a per-tensor scale
}
# The peer's settings measured: its plain round-to-nearest and its default optimizer (learned rounding
# with Prodigy). Its README's `--optimizer quip` does not exist in 1.3.4 (argparse rejects it).
PEER_SETTINGS: dict[str, tuple[str, ...]] = {"simple": ("--simple",), "default": ()}


def _marker(venv: Path) -> Path:
    return venv / f".comfyquant-peer-{PEER_VERSION}"


def ensure_peer_venv(venv: Path = VENV) -> Path:
    """Create the venv and install the peer if not done yet; returns the venv's python."""
    py = venv / "bin" / "python"
    if _marker(venv).exists():
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pkgs = [f"convert_to_quant=={PEER_VERSION}", TORCH_PIN, *EXTRA_DEPS]
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)
    _marker(venv).write_text(" ".join(pkgs) + "\n")
    return py


def run_peer(args: Sequence[str], venv: Path | None = VENV, timeout: float | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """Run ``convert_to_quant ARGS`` in the peer venv (``venv=None``: in this interpreter's environment, where
    the peer was installed from carried wheels, e.g. on an offline GPU machine); raises ``CalledProcessError``
    with its output on failure."""
    if venv is None:
        cmd = [sys.executable, "-c", "import sys; from convert_to_quant.convert_to_quant import main; "
                                     "sys.argv[0] = 'convert_to_quant'; sys.exit(main())", *args]
    else:
        cmd = [str(ensure_peer_venv(venv).parent / "convert_to_quant"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=tail)
    return proc


def peer_args(src: Path, dst: Path, fmt: str, setting: str = "simple", extra: Sequence[str] = ()) -> list[str]:
    """The peer command line converting ``src`` to ``dst`` in comfyquant format ``fmt``."""
    if fmt not in PEER_FORMAT_FLAGS:
        raise UserError(f"no peer equivalent for format '{fmt}'; choose one of: {', '.join(PEER_FORMAT_FLAGS)}")
    if setting not in PEER_SETTINGS:
        raise UserError(f"unknown peer setting '{setting}'; choose one of: {', '.join(PEER_SETTINGS)}")
    return ["-i", str(src), "-o", str(dst), "--comfy_quant", "--device", "cpu", "--manual_seed", "0",
            "--verbose", "MINIMAL", *PEER_FORMAT_FLAGS[fmt], *PEER_SETTINGS[setting], *extra]
