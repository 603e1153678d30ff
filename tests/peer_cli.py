"""Run the peer, convert_to_quant 1.3.4 from PyPI, inside the test venv, for side-by-side checks of its flags.

Its wheel is fetched with ``pip download`` (checked against a pinned SHA-256) into a cache outside the
repository and put on ``PYTHONPATH``; it is never vendored. It runs on the CPU with ``--simple`` (round to
nearest) and ``--optimizer original`` (which spares it the Prodigy package its default optimizer imports even
when nothing is optimized). Its INT8 path imports Triton at module level without running a kernel on the CPU,
so a stand-in ``triton`` package is put first on its path: importing works, running any kernel raises. One
subprocess runs a whole batch of command lines, so torch is imported once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

PEER = "convert_to_quant==1.3.4"
WHEEL = "convert_to_quant-1.3.4-py3-none-any.whl"
SHA256 = "4630805c136070eb6c72c1e0f0af0e52b23d0f307bf326a2880a1f7a8e10f753"
CACHE = Path.home() / ".cache" / "comfyquant" / "peer-src-1.3.4"
# Every peer conversion: comfy_quant output, round-to-nearest, CPU, fixed seed, quiet.
COMMON = ("--comfy_quant", "--simple", "--optimizer", "original", "--device", "cpu", "--manual_seed", "0",
          "--verbose", "MINIMAL")
_STUB = """
def _refuse(*args, **kwargs):
    raise RuntimeError("triton stand-in of comfyquant's peer tests: the peer tried to run a Triton kernel")


class _Kernel:
    def __init__(self, fn=None):
        self.fn = fn

    def __getitem__(self, grid):
        return _refuse

    __call__ = _refuse


def jit(fn=None, **kwargs):
    return _Kernel(fn) if fn is not None else _Kernel


def autotune(*args, **kwargs):
    return lambda fn: fn


heuristics = autotune


class Config:
    def __init__(self, *args, **kwargs):
        pass


def __getattr__(name):
    return _refuse
"""
_STUB_FILES = {"triton/__init__.py": _STUB, "triton/language/__init__.py": "constexpr = object\n" + _STUB,
               "triton/language/extra/__init__.py": "libdevice = None\n"}
# The peer calls gc.collect() several times per layer, 0.3 s each with torch imported: a no-op here (it only
# frees memory) keeps a batch at seconds.
_DRIVER = """
import gc, json, sys
gc.collect = lambda generation=2: 0
from convert_to_quant.cli.main import get_parser, run_conversion
for argv in json.loads(sys.argv[1]):
    run_conversion(get_parser().parse_args(argv))
"""


def peer_source(cache: Path = CACHE) -> Path:
    """The unpacked peer package folder (downloaded and verified on first use; atomic rename into place)."""
    if (cache / "convert_to_quant" / "__init__.py").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PEER, "-d", tmp], check=True)
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SHA256:
            raise RuntimeError(f"{WHEEL}: sha256 {digest}, expected {SHA256}")
        unpacked = Path(tmp) / "src"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        if not cache.exists():
            os.replace(unpacked, cache)
    return cache


def _stubs(cache: Path) -> Path:
    stubs = cache.parent / "peer-stubs"
    for rel, text in _STUB_FILES.items():
        f = stubs / rel
        if not f.is_file() or f.read_text() != text:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, f)
    return stubs


def run_peer(runs: Sequence[Sequence[str]], src: Path | None = None, timeout: float = 900) -> None:
    """Run each command line (``COMMON`` appended) through the peer's own parser and conversion."""
    src = src or peer_source()
    argvs = [[str(x) for x in argv] + list(COMMON) for argv in runs]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_stubs(src)), str(src)])}
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError("the peer failed:\n" + "\n".join((p.stdout + p.stderr).splitlines()[-20:]))
